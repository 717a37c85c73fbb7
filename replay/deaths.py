"""The `x-death` header of a dead-lettered message: where and why it died, for the incident filters
(`--dead-lettered-from`, `--death-reason`) and `--to-origin`.

Pure logic over the typed header table (archive.amqp_codec). RabbitMQ keeps one entry per
queue and reason, the most recent first; an entry's `exchange` and `routing-keys` are those the
message had when it reached that queue.
"""

from dataclasses import dataclass

from rabbit_archive.archive.amqp_codec import CodecError, FieldValue, Table, decode_properties

X_DEATH = b"x-death"
# The reasons RabbitMQ writes (README "Incident replays").
REASONS = ("rejected", "expired", "maxlen", "delivery_limit")
ORIGINS = ("queue", "exchange")


@dataclass(frozen=True, slots=True)
class Death:
    """One `x-death` entry: the queue the message died in, why, and where it had been published."""

    queue: bytes
    reason: bytes
    exchange: bytes
    routing_keys: tuple[bytes, ...]


def _text(value: FieldValue | None) -> bytes | None:
    if value is None or value[0] != "S" or not isinstance(value[1], bytes):
        return None
    return value[1]


def _death(value: FieldValue) -> Death | None:
    if value[0] != "F":
        return None
    entry = dict(value[1])
    queue, reason, exchange = (_text(entry.get(key)) for key in (b"queue", b"reason", b"exchange"))
    keys = entry.get(b"routing-keys")
    routing_keys = (
        tuple(key for key in (_text(item) for item in keys[1]) if key is not None)
        if keys is not None and keys[0] == "A"
        else ()
    )
    if queue is None or reason is None or exchange is None:
        return None
    return Death(queue, reason, exchange, routing_keys)


def deaths_of(headers: Table | None) -> list[Death]:
    """The readable `x-death` entries of a header table, most recent first (empty: none)."""
    for key, value in headers or ():
        if key == X_DEATH:
            if value[0] != "A":
                return []
            return [death for death in map(_death, value[1]) if death is not None]
    return []


def deaths(properties_raw: bytes) -> list[Death]:
    """The `x-death` entries of archived property bytes; CodecError when they cannot be decoded."""
    return deaths_of(decode_properties(properties_raw).headers)


def origin(properties_raw: bytes, mode: str) -> tuple[str, str] | None:
    """Exchange and routing key that send the message back where it came from; None without x-death.

    mode "queue": the default exchange and the queue of the most recent death. mode "exchange":
    the exchange and first routing key of the oldest entry, the message's first publish.
    Names that are not UTF-8 keep their bytes as surrogate escapes, like every replayed name.
    """
    try:
        found = deaths(properties_raw)
    except CodecError:
        return None
    if not found:
        return None
    if mode == "queue":
        return "", found[0].queue.decode("utf-8", "surrogateescape")
    first = found[-1]
    key = first.routing_keys[0] if first.routing_keys else b""
    return first.exchange.decode("utf-8", "surrogateescape"), key.decode("utf-8", "surrogateescape")
