"""The archive row of a message: which columns the messages table has and how a delivery fills them."""

import functools
import hashlib
import json
import struct
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from rabbit_archive.archive.amqp_codec import (
    PROPERTY_NAMES,
    CodecError,
    decode_properties,
    decode_property_values,
    decode_table_view,
    encode_properties,
    strip_header,
    text_view,
)

# Column order of the COPY into rabbit_archive.messages (id takes its default; capture appends
# captured_at, the time taken after the selection fence: see archive/queries.py).
MESSAGE_COLUMNS = (
    "vhost",
    "exchange",
    "routing_key",
    "exchange_raw",
    "routing_key_raw",
    "redelivered",
    "properties_raw",
    "properties",
    "headers",
    "message_id",
    "correlation_id",
    "body",
    "body_size",
    "replay_id",
)

# A row's id is taken at most this long after its captured_at: a capture transaction that would
# commit later is rolled back and retried (capture/store.py). Selections by time rely on it to
# walk only the ids near their window (replay/selection.py).
CAPTURE_MARGIN = timedelta(seconds=60)

# Added by a quorum queue when it redelivers: a property of the archive queue, not the message.
DELIVERY_COUNT_HEADER = b"x-delivery-count"
REPLAY_ID_HEADER = b"x-replay-id"

_standard_json = json.JSONEncoder(ensure_ascii=False).encode


def _to_json(view: dict[str, Any]) -> str:
    """JSON text of a view, for a jsonb column.

    orjson, because the two views of each message are a fifth of the daemon's time with the standard
    encoder (bench.profile). Views hold no NaN and no lone surrogate (amqp_codec makes them so);
    what orjson still refuses (an integer beyond 64 bits) goes to the standard encoder. The texts
    differ only in spacing, which jsonb does not keep.
    """
    try:
        return orjson.dumps(view).decode()
    except orjson.JSONEncodeError:
        return _standard_json(view)


def name_columns(name: str) -> tuple[str, bytes | None]:
    """Text view and, when the text cannot hold it exactly, the raw bytes of an AMQP short string."""
    if name.isascii() and "\x00" not in name:
        return name, None
    # pamqp decodes short strings as UTF-8; surrogateescape gives back any undecodable bytes.
    raw = name.encode("utf-8", "surrogateescape")
    view = text_view(raw)
    return view, (raw if view != name or "\x00" in name else None)


def timestamp_view(seconds: int) -> str | int:
    """ISO 8601 form of an AMQP timestamp, or the integer when no calendar date can hold it."""
    try:
        return datetime.fromtimestamp(seconds, UTC).isoformat().replace("+00:00", "Z")
    except (OverflowError, OSError, ValueError):
        return seconds


def without_empty_headers(properties_raw: bytes) -> bytes:
    """The property bytes with an empty header table dropped (see fingerprint)."""
    # On the first flag byte: 0x80 content-type, 0x40 content-encoding (the short strings
    # before the table), 0x20 headers; bit 0 of the second marks a second flag word (never sent).
    if len(properties_raw) < 6 or not properties_raw[0] & 0x20 or properties_raw[1] & 1:
        return properties_raw
    position = 2
    if properties_raw[0] & 0x80:
        position += 1 + properties_raw[2]
    if properties_raw[0] & 0x40:
        if position >= len(properties_raw):
            return properties_raw
        position += 1 + properties_raw[position]
    if properties_raw[position : position + 4] != b"\x00\x00\x00\x00":
        return properties_raw
    return (
        bytes((properties_raw[0] & ~0x20, properties_raw[1]))
        + properties_raw[2:position]
        + properties_raw[position + 4 :]
    )


# Bytes of a fingerprint: pending fingerprints are stored end to end (capture/pending.py).
FINGERPRINT_SIZE = 16
_LENGTH = struct.Struct(">I").pack
# SHA-256 runs on this kind of CPU's SHA instructions at 1.6-1.8 GB/s, BLAKE2b at 0.64 GB/s: with
# 16 KB bodies hashing was a quarter of the daemon's time.
_EMPTY_DIGEST = hashlib.sha256()
# What versions before it used: a fingerprint they left pending still matches its redelivery.
_EMPTY_LEGACY_DIGEST = hashlib.blake2b(digest_size=FINGERPRINT_SIZE)


# The names' part of recent fingerprints: a vhost's messages go to few exchanges and routing keys,
# and encoding the three names each time was a quarter of a small message's fingerprint.
_NAMES_PARTS: dict[tuple[str, str, str], bytes] = {}
_NAMES_PARTS_KEPT = 4096


def _names_part(vhost: str, exchange: str, routing_key: str) -> bytes:
    """Each name's length (4 bytes) and bytes, for fingerprint."""
    key = (vhost, exchange, routing_key)
    part = _NAMES_PARTS.get(key)
    if part is None:
        if len(_NAMES_PARTS) >= _NAMES_PARTS_KEPT:
            _NAMES_PARTS.clear()  # unbounded routing keys: start again rather than grow
        vhost_bytes = vhost.encode("utf-8", "surrogateescape")
        exchange_bytes = exchange.encode("utf-8", "surrogateescape")
        routing_key_bytes = routing_key.encode("utf-8", "surrogateescape")
        part = _NAMES_PARTS[key] = b"".join(
            (
                _LENGTH(len(vhost_bytes)),
                vhost_bytes,
                _LENGTH(len(exchange_bytes)),
                exchange_bytes,
                _LENGTH(len(routing_key_bytes)),
                routing_key_bytes,
            )
        )
    return part


def fingerprint(vhost: str, exchange: str, routing_key: str, properties_raw: bytes, body: bytes) -> bytes:
    """A 16-byte digest of everything that makes a message itself, for recognising redeliveries.

    An empty header table counts as none: a quorum queue that redelivers a message with an
    empty table adds x-delivery-count, and once that is removed the two cannot be told apart.
    The first 16 bytes of SHA-256 of each of vhost, exchange, routing key and property bytes
    after its 4-byte length, then the body. Fingerprints pending across an upgrade must still
    match their redeliveries: the value may change only with the old one kept for matching
    (as legacy_fingerprint is).
    """
    return _digest(_EMPTY_DIGEST, vhost, exchange, routing_key, properties_raw, body)


def legacy_fingerprint(
    vhost: str, exchange: str, routing_key: str, properties_raw: bytes, body: bytes
) -> bytes:
    """The fingerprint as versions before SHA-256 computed it: BLAKE2b (16 bytes) of the same parts."""
    return _digest(_EMPTY_LEGACY_DIGEST, vhost, exchange, routing_key, properties_raw, body)


def _digest(
    empty: "hashlib._Hash | hashlib.blake2b",
    vhost: str,
    exchange: str,
    routing_key: str,
    properties_raw: bytes,
    body: bytes,
) -> bytes:
    identity = without_empty_headers(properties_raw)
    # One update for the short parts, one for the body (never copied); a copy of an empty state
    # costs less than parsing the constructor's arguments again.
    digest = empty.copy()
    digest.update(b"".join((_names_part(vhost, exchange, routing_key), _LENGTH(len(identity)), identity)))
    digest.update(body)
    return digest.digest()[:FINGERPRINT_SIZE]


def clean_properties(properties_raw: bytes) -> bytes:
    """The message's own property bytes: the archive queue's x-delivery-count removed."""
    try:
        stripped = strip_header(properties_raw, DELIVERY_COUNT_HEADER)
        if stripped is properties_raw:
            return properties_raw
        props = decode_properties(stripped)
    except CodecError:
        return properties_raw  # undecodable: stored exactly as received
    if props.headers:
        return stripped
    # The queue created the table to hold its counter: the message itself had no headers.
    # (A message published with an explicitly empty table and then redelivered is stored
    # without one; the two are indistinguishable once the queue has added its header.)
    props.headers = None
    return encode_properties(props)


def message_row(
    vhost: str,
    exchange: str,
    routing_key: str,
    redelivered: bool,
    properties_raw: bytes,
    body: bytes,
) -> tuple[Any, ...]:
    """The COPY record for one message, in MESSAGE_COLUMNS order."""
    exchange_text, exchange_raw = name_columns(exchange)
    routing_key_text, routing_key_raw = name_columns(routing_key)
    view: dict[str, Any]
    try:
        values, present = decode_property_values(properties_raw, _HEADERS_VIEW)
    except CodecError as error:
        # The raw bytes are still stored; the views say why they are empty.
        values = _NO_VALUES
        properties_json = json.dumps({"$undecodable": str(error)})
        view = {}
    else:
        # The JSON view of the properties other than headers, keyed by their AMQP spec names
        # (tests/unit/test_records.py holds it equal to the view of a Properties object).
        view = {}
        for index in present:
            value = values[index]
            if type(value) is bytes:
                view[PROPERTY_NAMES[index]] = text_view(value)
            elif index == _TIMESTAMP:
                view["timestamp"] = timestamp_view(value)
            elif index != _HEADERS:
                view[PROPERTY_NAMES[index]] = value
        properties_json = _to_json(view)
    headers_json = None
    replay_id = None
    if values[_HEADERS] is not None:
        headers_view, replay_id_raw = values[_HEADERS]
        headers_json = _to_json(headers_view)
        if replay_id_raw is not None:
            replay_id = text_view(replay_id_raw)
    return (
        vhost,
        exchange_text,
        routing_key_text,
        exchange_raw,
        routing_key_raw,
        redelivered,
        properties_raw,
        properties_json,
        headers_json,
        # The views' texts: decoded once, for the JSON view and these columns alike.
        view.get("message_id"),
        view.get("correlation_id"),
        body,
        len(body),
        replay_id,
    )


_HEADERS, _TIMESTAMP = PROPERTY_NAMES.index("headers"), PROPERTY_NAMES.index("timestamp")
_NO_VALUES: list[Any] = [None] * len(PROPERTY_NAMES)
# The headers as the row needs them: their JSON view and the last bytes value of x-replay-id.
_HEADERS_VIEW = functools.partial(decode_table_view, find=REPLAY_ID_HEADER)
