"""SOURCE=firehose: messages as the broker's tracer reports them, turned back into the message.

With tracing on, RabbitMQ publishes a copy of every message published in the vhost to
`amq.rabbitmq.trace` with routing key `publish.<exchange>`: the body unchanged, and in its
headers the exchange (`exchange_name`), the routing keys (`routing_keys`) and the basic
properties as a field table (`properties`, the message's own header table nested inside with
its field types). That includes publishes to the default exchange and unroutable messages,
which no binding can see.

That table is not always the properties: RabbitMQ (3.10, measured by publishing raw property
bytes) writes every integer property, `timestamp` included, as a signed 32-bit field (`I`)
holding the low 32 bits of the value. A timestamp of 2**31 arrives as -2**31, 4_102_444_800
(2100-01-01) as -192_522_496, a millisecond timestamp wraps, and 2**32 + 5 arrives as 5 and
2**63 as 0: every 32-bit reading is the reading of infinitely many 64-bit timestamps, so no
timestamp can be recovered from it, not even one that looks ordinary. `delivery_mode` and
`priority` are octets, which a 32-bit field holds whole. A value is therefore taken only when
its field type is at least as wide as the property and the value lies in the property's range;
otherwise the trace copy is stored as it came, flagged with `LOST_HEADER`.
"""

from typing import NamedTuple

from rabbit_archive.archive.amqp_codec import (
    CodecError,
    FieldValue,
    Properties,
    Table,
    decode_properties,
    encode_properties,
)

TRACE_EXCHANGE = "amq.rabbitmq.trace"
PUBLISH_EVENTS = "publish.#"
# Added to the trace copy's own header table when the properties cannot be rebuilt exactly: a
# long string naming the properties the broker's copy lost, comma-separated (`timestamp`).
LOST_HEADER = b"x-rabbit-archive-trace-lost"

_SHORTSTRS = frozenset(
    (
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
)
# Integer properties and their width in bits (both unsigned on the wire).
_INTEGERS = {"delivery_mode": 8, "priority": 8, "timestamp": 64}
# Integer field types and the bits of the value they carry.
_INTEGER_BITS = {"b": 8, "B": 8, "s": 16, "u": 16, "I": 32, "i": 32, "l": 64, "L": 64, "T": 64}


class Traced(NamedTuple):
    """What to store for one trace copy: the message it reports, or (when `lost` names the
    properties the copy lost) the copy itself, as received plus `LOST_HEADER`."""

    exchange: bytes
    routing_key: bytes
    properties_raw: bytes
    lost: str | None = None


def _text(value: FieldValue) -> bytes | None:
    letter, payload = value
    return payload if letter in ("S", "x") and isinstance(payload, bytes) else None


def _exact_integer(value: FieldValue, bits: int) -> int | None:
    """The property's value when the field provably holds all of it, else None.

    A field narrower than the property keeps only the low bits: its reading is also the reading
    of other values, whatever it is. A field at least as wide keeps every value of the property
    unchanged (or, signed and as wide, shows the upper half as negative numbers, which are out of
    range here)."""
    letter, number = value
    width = _INTEGER_BITS.get(letter)
    if width is None or width < bits or type(number) is not int or not 0 <= number < 1 << bits:
        return None
    return number


def _rebuild(table: Table) -> tuple[Properties, list[str]]:
    """The properties the trace table reports, and the names of those it does not hold exactly."""
    props = Properties()
    lost: list[str] = []
    for key, value in table:
        name = key.decode("ascii", "replace")
        if name in _SHORTSTRS:
            text = _text(value)
            if text is None or len(text) > 255:
                lost.append(name)
            else:
                setattr(props, name, text)
        elif name == "headers":
            if value[0] == "F":
                props.headers = value[1]
            else:
                lost.append(name)
        elif name in _INTEGERS:
            number = _exact_integer(value, _INTEGERS[name])
            if number is None:
                lost.append(name)
            else:
                setattr(props, name, number)
        else:
            lost.append(name)
    return props, lost


def _flagged(trace: Properties, exchange: bytes, lost: list[str]) -> Traced:
    """The trace copy as received, its header table extended by `LOST_HEADER`."""
    names = ",".join(dict.fromkeys(lost)).encode("ascii", "replace")
    trace.headers = [*(trace.headers or []), (LOST_HEADER, ("S", names))]
    # The broker's routing key for a publish trace is `publish.<exchange>`.
    return Traced(
        TRACE_EXCHANGE.encode(), b"publish." + exchange, encode_properties(trace), names.decode("ascii")
    )


def original_message(trace_properties_raw: bytes) -> Traced | None:
    """What to store for a trace copy with these property bytes; None when it is not a trace.

    Normally the traced message: (exchange, routing key, property bytes), `lost` None. When the
    trace's property table cannot give back a property exactly (see the module's docstring),
    the trace copy itself, with exchange `amq.rabbitmq.trace`, routing key `publish.<exchange>`,
    its own properties plus the header `LOST_HEADER`, and `lost` naming the properties."""
    try:
        trace = decode_properties(trace_properties_raw)
    except CodecError:
        return None
    fields = {key: value for key, value in trace.headers or []}
    exchange = _text(fields.get(b"exchange_name", ("V", None)))
    keys = fields.get(b"routing_keys", ("V", None))
    properties = fields.get(b"properties", ("V", None))
    if exchange is None or keys[0] != "A" or properties[0] != "F":
        return None
    routing_key = _text(keys[1][0]) if keys[1] else b""
    props, lost = _rebuild(properties[1])
    if not lost:
        try:
            return Traced(exchange, routing_key or b"", encode_properties(props))
        except CodecError:
            # Not expected once every value is checked above; the copy then says what it holds.
            lost = ["properties"]
    return _flagged(trace, exchange, lost)
