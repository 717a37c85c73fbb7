"""The replay headers: an archived message's exact property bytes plus the replay tags (README "Replaying").

Pure logic. Every original property and header keeps its bytes and AMQP type; the tags
are appended to the header table (replacing earlier tags of the same name, so that a
replay of a replay carries one set), timestamps typed as AMQP timestamps, ids as longs.
"""

import functools
import struct
from dataclasses import dataclass

from rabbit_archive.archive.amqp_codec import (
    FieldValue,
    Table,
    decode_properties,
    encode_properties,
    encode_table,
)

REPLAY_ID = b"x-replay-id"
REPLAY_ARCHIVE_ID = b"x-replay-archive-id"
REPLAYED_AT = b"x-replayed-at"
ORIGINAL_EXCHANGE = b"x-original-exchange"
ORIGINAL_ROUTING_KEY = b"x-original-routing-key"
ORIGINAL_CAPTURED_AT = b"x-original-captured-at"
REPLAY_REASON = b"x-replay-reason"
REPLAY_OF = b"x-replay-of"

_TAGS = frozenset(
    (
        REPLAY_ID,
        REPLAY_ARCHIVE_ID,
        REPLAYED_AT,
        ORIGINAL_EXCHANGE,
        ORIGINAL_ROUTING_KEY,
        ORIGINAL_CAPTURED_AT,
        REPLAY_REASON,
        REPLAY_OF,
    )
)


@dataclass(frozen=True, slots=True)
class Tag:
    """What one replay adds to each message it republishes."""

    replay_id: str
    reason: str | None = None


def tagged_properties(
    properties_raw: bytes,
    tag: Tag,
    *,
    archive_id: int,
    replayed_at: int,
    original_exchange: bytes,
    original_routing_key: bytes,
    captured_at: int,
    new_message_id: str | None = None,
) -> bytes:
    """The property bytes to publish: the original ones plus the replay headers.

    A message that is itself a replay keeps its x-original-* values: they name where and when
    it was first published and captured, which a consumer's idempotency key (rabbit_archive.inbox)
    and an operator tracing it both need, not where the earlier replay sent it.
    Raises archive.amqp_codec.CodecError when the stored bytes cannot be decoded.
    """
    props = decode_properties(properties_raw)  # validates, and raises CodecError for garbage
    if new_message_id is None and not any(key in _REPLACED for key, _ in props.headers or ()):
        # The common case: the tags appended to the table's bytes, nothing re-encoded.
        entries = _fresh_tags(
            tag, archive_id, replayed_at, original_exchange, original_routing_key, captured_at
        )
        spliced = None if entries is None else _append_entries(properties_raw, entries)
        if spliced is not None:
            return spliced
    earlier = dict(props.headers or ())
    first: dict[bytes, FieldValue] = {
        ORIGINAL_EXCHANGE: ("S", original_exchange),
        ORIGINAL_ROUTING_KEY: ("S", original_routing_key),
        ORIGINAL_CAPTURED_AT: ("T", captured_at),
    }
    if REPLAY_ID in earlier:
        for key, value in first.items():
            found = earlier.get(key)
            if found is not None and found[0] == value[0]:  # a value of another type is not ours
                first[key] = found
    added: list[tuple[bytes, FieldValue]] = [
        (REPLAY_ID, ("S", tag.replay_id.encode())),
        (REPLAY_ARCHIVE_ID, ("l", archive_id)),
        (REPLAYED_AT, ("T", replayed_at)),
        *first.items(),
    ]
    if tag.reason:
        added.append((REPLAY_REASON, ("S", tag.reason.encode())))
    if new_message_id is not None:
        if props.message_id is not None:
            added.append((REPLAY_OF, ("S", props.message_id)))
        props.message_id = new_message_id.encode()
    # A reason from an earlier replay must not pass for this one's.
    replaced = {key for key, _ in added} | {REPLAY_REASON}
    kept: Table = [entry for entry in props.headers or () if entry[0] not in replaced]
    props.headers = kept + added
    return encode_properties(props)


# Keys a replay sets (or replaces): a table holding one of them is rebuilt, not appended to.
_REPLACED = frozenset(_TAGS - {REPLAY_OF})
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_I64 = struct.Struct(">q")
_U64 = struct.Struct(">Q")


def _key(name: bytes, letter: bytes) -> bytes:
    return bytes((len(name),)) + name + letter


_ARCHIVE_ID_KEY = _key(REPLAY_ARCHIVE_ID, b"l")
_REPLAYED_AT_KEY = _key(REPLAYED_AT, b"T")
_ORIGINAL_EXCHANGE_KEY = _key(ORIGINAL_EXCHANGE, b"S")
_ORIGINAL_ROUTING_KEY_KEY = _key(ORIGINAL_ROUTING_KEY, b"S")
_ORIGINAL_CAPTURED_AT_KEY = _key(ORIGINAL_CAPTURED_AT, b"T")


@functools.lru_cache(maxsize=16)
def _replay_entries(tag: Tag) -> tuple[bytes, bytes]:
    """The encoded x-replay-id entry, and the x-replay-reason entry (or nothing), of a replay."""
    reason = [(REPLAY_REASON, ("S", tag.reason.encode()))] if tag.reason else []
    return encode_table([(REPLAY_ID, ("S", tag.replay_id.encode()))])[4:], encode_table(reason)[4:]


def _fresh_tags(
    tag: Tag, archive_id: int, replayed_at: int, exchange: bytes, routing_key: bytes, captured_at: int
) -> bytes | None:
    """The tags of a message that carries none yet, encoded as table entries (in the order and
    with the types of tagged_properties' list), written without building that list: a tenth of a
    replay's time went to it. None when a number does not fit its field."""
    replay_id, reason = _replay_entries(tag)
    try:
        numbers = (_I64.pack(archive_id), _U64.pack(replayed_at), _U64.pack(captured_at))
    except struct.error:
        return None  # out of range (a malformed export line): the general path says why
    return b"".join(
        (
            replay_id,
            _ARCHIVE_ID_KEY,
            numbers[0],
            _REPLAYED_AT_KEY,
            numbers[1],
            _ORIGINAL_EXCHANGE_KEY,
            _U32.pack(len(exchange)),
            exchange,
            _ORIGINAL_ROUTING_KEY_KEY,
            _U32.pack(len(routing_key)),
            routing_key,
            _ORIGINAL_CAPTURED_AT_KEY,
            numbers[2],
            reason,
        )
    )


_HEADERS_BIT = 1 << 13
_SHORTSTRS_BEFORE_HEADERS = (1 << 15, 1 << 14)  # content_type, content_encoding


def _append_entries(properties_raw: bytes, entries: bytes) -> bytes | None:
    """The property bytes with encoded table entries appended to the header table (None: malformed)."""
    if len(properties_raw) < 2:
        return None
    flags = _U16.unpack_from(properties_raw, 0)[0]
    if flags & 1:
        return None
    position = 2
    for bit in _SHORTSTRS_BEFORE_HEADERS:
        if flags & bit:
            if position >= len(properties_raw):
                return None
            position += 1 + properties_raw[position]
    if position > len(properties_raw):
        return None
    if not flags & _HEADERS_BIT:
        return b"".join(
            (
                _U16.pack(flags | _HEADERS_BIT),
                properties_raw[2:position],
                _U32.pack(len(entries)),
                entries,
                properties_raw[position:],
            )
        )
    if position + 4 > len(properties_raw):
        return None
    length = _U32.unpack_from(properties_raw, position)[0]
    end = position + 4 + length
    if end > len(properties_raw):
        return None
    return b"".join(
        (
            properties_raw[:position],
            _U32.pack(length + len(entries)),
            properties_raw[position + 4 : end],
            entries,
            properties_raw[end:],
        )
    )


def is_tag(key: bytes) -> bool:
    """True for the header names a replay adds."""
    return key in _TAGS
