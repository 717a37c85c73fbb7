"""The idempotency key of a received message, by the rule README "Handling replays in your consumers" states.

Pure: no I/O. The rule is meant to be computed the same way by consumers in any language, so the
digest covers only what every AMQP client reports alike: an integer header is an integer whatever
its width (pamqp, under aio-pika, does not say which width was on the wire), a float is its 64-bit
value, a long string and a byte array are their bytes. Every leaf of the canonical form is an
ASCII string, so any JSON writer that adds no whitespace produces the same bytes.
"""

import datetime
import decimal
import hashlib
import json
import math
import struct
from collections.abc import Mapping
from typing import Any

from aio_pika.abc import AbstractIncomingMessage

__all__ = [
    "BROKER_HEADERS",
    "BROKER_HEADER_PREFIXES",
    "DIGEST_PREFIX",
    "REPLAY_HEADERS",
    "canonical_form",
    "is_stripped",
    "message_key",
]

# The first element of the canonical form: a later rule would hash differently, never collide.
RULE = "rabbit-archive.inbox/1"
DIGEST_PREFIX = "sha256:"

# What `rabbit-replay run` adds (replay/tagging.py): not part of the message as first published.
REPLAY_HEADERS = frozenset(
    {
        "x-replay-id",
        "x-replay-archive-id",
        "x-replayed-at",
        "x-original-exchange",
        "x-original-routing-key",
        "x-original-captured-at",
        "x-replay-reason",
        "x-replay-of",
    }
)
# What the broker adds on dead-lettering (x-last-death-* since RabbitMQ 3.13) and a quorum
# queue on redelivery: a message that comes back through a retry loop is still the same message.
BROKER_HEADERS = frozenset({"x-death", "x-delivery-count"})
BROKER_HEADER_PREFIXES = ("x-first-death-", "x-last-death-")

# The content properties, in AMQP order. delivery_mode, priority and expiration are left out:
# they say how to deliver, not what was said; the broker drops expiration when it dead-letters,
# and aio-pika reports an absent delivery_mode or priority as 1 or 0.
CONTENT_PROPERTIES = (
    "content_type",
    "content_encoding",
    "correlation_id",
    "reply_to",
    "message_id",
    "timestamp",
    "type",
    "user_id",
    "app_id",
    "cluster_id",
)

_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
_MICROSECOND = datetime.timedelta(microseconds=1)
_MAX_SECONDS = 0xFFFFFFFF
_CANONICAL_NAN = "7ff8000000000000"
_F64 = struct.Struct(">d")


def message_key(message: AbstractIncomingMessage) -> str:
    """The message's `message_id` when set, else `sha256:` and the hex digest of its canonical form.

    An original and any replay of it (to its exchange or `--to-queue`) get the same key; a replay
    with `--new-message-id` gets a new one. An empty `message_id`, or one holding a NUL character
    (which PostgreSQL text cannot store), counts as unset. Raises ValueError for a value no AMQP
    client decodes to (only hand-built messages hold one).
    """
    message_id = message.message_id
    if message_id and "\x00" not in message_id:
        return message_id
    return DIGEST_PREFIX + hashlib.sha256(canonical_form(message)).hexdigest()


def is_stripped(name: str) -> bool:
    """True for a header the key leaves out: the replay tags and what the broker adds."""
    return name in REPLAY_HEADERS or name in BROKER_HEADERS or name.startswith(BROKER_HEADER_PREFIXES)


def canonical_form(message: AbstractIncomingMessage) -> bytes:
    """The bytes whose SHA-256 is the key of a message without a usable `message_id`.

    A JSON array without whitespace: the rule's name, the exchange and routing key as first
    published (hex), the content properties that are set, the headers that are kept (typed),
    and the SHA-256 of the body (hex).
    """
    headers: Mapping[str, Any] = message.headers or {}
    exchange = _first_name(headers.get("x-original-exchange"), message.exchange)
    routing_key = _first_name(headers.get("x-original-routing-key"), message.routing_key)
    properties: list[list[Any]] = []
    for name in CONTENT_PROPERTIES:
        value = getattr(message, name, None)
        if value is None or value == "":
            continue
        if isinstance(value, datetime.datetime):
            properties.append([name, _milliseconds(value)])
        else:
            properties.append([name, _as_bytes(value).hex()])
    kept = {name: value for name, value in headers.items() if not is_stripped(name)}
    form = [
        RULE,
        exchange.hex(),
        routing_key.hex(),
        properties,
        _entries(kept),
        hashlib.sha256(message.body).hexdigest(),
    ]
    return json.dumps(form, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def _first_name(tagged: Any, delivered: str | None) -> bytes:
    """The name a replay recorded in its x-original-* header, else the one the message came with."""
    if isinstance(tagged, str | bytes | bytearray):
        return _as_bytes(tagged)
    return _as_bytes(delivered or "")


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, str):
        # Names that are not UTF-8 travel in this project as surrogate escapes of their bytes.
        return value.encode("utf-8", "surrogateescape")
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    raise ValueError(f"a property of type {type(value).__name__} has no place in the key")


def _milliseconds(moment: datetime.datetime) -> str:
    """An AMQP timestamp as milliseconds since the epoch.

    pamqp reads a value above 2^32 - 1 as milliseconds and smaller ones as seconds; the rule says
    the same (value x 1000 up to 4294967295, else the value), so every language agrees with it.
    """
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    microseconds = (moment - _EPOCH) // _MICROSECOND
    # Exact for seconds; for milliseconds pamqp went through a float, off by far less than 0.5 ms.
    return str((microseconds + 500) // 1000)


def _entries(table: Mapping[Any, Any]) -> list[list[Any]]:
    """A field table as [key hex, value] pairs in the order of the keys' bytes."""
    pairs = sorted(((_as_bytes(key), value) for key, value in table.items()), key=lambda pair: pair[0])
    return [[key.hex(), _value(value)] for key, value in pairs]


def _value(value: Any) -> list[Any]:
    """One header value as [type, ...]: the types every AMQP client tells apart."""
    if value is None:
        return ["void"]
    if isinstance(value, bool):  # before int: bool is an int in Python
        return ["bool", "true" if value else "false"]
    if isinstance(value, int):
        return ["int", str(value)]
    if isinstance(value, float):
        return ["float", _CANONICAL_NAN if math.isnan(value) else _F64.pack(value).hex()]
    if isinstance(value, str | bytes | bytearray | memoryview):
        return ["bytes", _as_bytes(value).hex()]
    if isinstance(value, decimal.Decimal):
        return ["decimal", *_scale_and_digits(value)]
    if isinstance(value, datetime.datetime):
        return ["timestamp", _milliseconds(value)]
    if isinstance(value, Mapping):
        return ["table", _entries(value)]
    if isinstance(value, list | tuple):
        return ["array", [_value(item) for item in value]]
    raise ValueError(f"a header value of type {type(value).__name__} has no place in the key")


def _scale_and_digits(value: decimal.Decimal) -> tuple[str, str]:
    """An AMQP decimal as its scale and its signed unscaled integer (pamqp keeps both in the exponent)."""
    sign, digits, exponent = value.as_tuple()
    if not isinstance(exponent, int):
        raise ValueError(f"the decimal {value} has no place in the key")
    unscaled = int("".join(map(str, digits)) or "0") * (-1 if sign else 1)
    if exponent > 0:  # never from the wire, where the scale is an octet; only a hand-built value
        return "0", str(unscaled * 10**exponent)
    return str(-exponent), str(unscaled)
