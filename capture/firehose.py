"""SOURCE=firehose: messages as the broker's tracer reports them, turned back into the message.

With tracing on, RabbitMQ publishes a copy of every message published in the vhost to
`amq.rabbitmq.trace` with routing key `publish.<exchange>`: the body unchanged, and in its
headers the exchange (`exchange_name`), the routing keys (`routing_keys`) and the basic
properties as a field table (`properties`, the message's own header table nested inside with
its field types). That includes publishes to the default exchange and unroutable messages,
which no binding can see.
"""

from archive.amqp_codec import CodecError, FieldValue, Properties, decode_properties, encode_properties

TRACE_EXCHANGE = "amq.rabbitmq.trace"
PUBLISH_EVENTS = "publish.#"

_SHORTSTRS = (
    "content_type",
    "content_encoding",
    "correlation_id",
    "reply_to",
    "expiration",
    "message_id",
    "type",
    "user_id",
    "app_id",
    "cluster_id",
)


def _text(value: FieldValue) -> bytes | None:
    letter, payload = value
    return payload if letter in ("S", "x") and isinstance(payload, bytes) else None


def original_message(trace_properties_raw: bytes) -> tuple[bytes, bytes, bytes] | None:
    """(exchange, routing key, property bytes) of the traced message; None when it is not a trace."""
    try:
        headers = decode_properties(trace_properties_raw).headers or []
    except CodecError:
        return None
    fields = {key: value for key, value in headers}
    exchange = _text(fields.get(b"exchange_name", ("V", None)))
    keys = fields.get(b"routing_keys", ("V", None))
    properties = fields.get(b"properties", ("V", None))
    if exchange is None or keys[0] != "A" or properties[0] != "F":
        return None
    routing_key = _text(keys[1][0]) if keys[1] else b""
    props = Properties()
    for key, value in properties[1]:
        name = key.decode("ascii", "replace")
        if name in _SHORTSTRS:
            setattr(props, name, _text(value))
        elif name == "headers" and value[0] == "F":
            props.headers = value[1]
        elif name in ("delivery_mode", "priority", "timestamp") and isinstance(value[1], int):
            setattr(props, name, int(value[1]))
    try:
        return exchange, routing_key or b"", encode_properties(props)
    except CodecError:
        return None
