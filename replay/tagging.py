"""The replay headers: an archived message's exact property bytes plus the tags of PRODUCT.md.

Pure logic. Every original property and header keeps its bytes and AMQP type; the tags
are appended to the header table (replacing earlier tags of the same name, so that a
replay of a replay carries one set), timestamps typed as AMQP timestamps, ids as longs.
"""

from dataclasses import dataclass

from archive.amqp_codec import FieldValue, Table, decode_properties, encode_properties

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

    Raises archive.amqp_codec.CodecError when the stored bytes cannot be decoded.
    """
    props = decode_properties(properties_raw)
    added: list[tuple[bytes, FieldValue]] = [
        (REPLAY_ID, ("S", tag.replay_id.encode())),
        (REPLAY_ARCHIVE_ID, ("l", archive_id)),
        (REPLAYED_AT, ("T", replayed_at)),
        (ORIGINAL_EXCHANGE, ("S", original_exchange)),
        (ORIGINAL_ROUTING_KEY, ("S", original_routing_key)),
        (ORIGINAL_CAPTURED_AT, ("T", captured_at)),
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


def is_tag(key: bytes) -> bool:
    """True for the header names a replay adds."""
    return key in _TAGS
