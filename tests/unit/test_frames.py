"""The method frames rabbit-archive writes itself: the same bytes as pamqp where pamqp can write
them at all, and every other legal name or argument too."""

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pamqp import body as pamqp_body
from pamqp import commands
from pamqp import frame as pamqp_frame
from pamqp import header as pamqp_header

from rabbit_archive.archive import frames
from rabbit_archive.archive.amqp_codec import decode_table

# The names pamqp accepts (its own check): what the comparison can cover.
PAMQP_NAME = st.text(st.sampled_from("abcXYZ019-_.:@#,/+ "), max_size=127)
ANY_NAME = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=100).filter(
    lambda name: len(name.encode()) <= 255
)
JSON_SCALAR = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
JSON_VALUE = st.recursive(
    JSON_SCALAR,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3),
    max_leaves=10,
)


def wire(method: Any) -> bytes:
    return pamqp_frame.marshal(method, 1)


@given(PAMQP_NAME, PAMQP_NAME, st.text(max_size=60))
def test_queue_bind_matches_pamqp_where_pamqp_can_write_it(queue: str, exchange: str, key: str) -> None:
    ours = frames.queue_bind(queue, exchange, key, {"x-match": "all"})
    theirs = commands.Queue.Bind(
        queue=queue, exchange=exchange, routing_key=key, arguments={"x-match": "all"}
    )
    assert wire(ours) == wire(theirs)


@given(PAMQP_NAME, PAMQP_NAME, st.text(max_size=60))
def test_queue_unbind_matches_pamqp(queue: str, exchange: str, key: str) -> None:
    assert wire(frames.queue_unbind(queue, exchange, key)) == wire(
        commands.Queue.Unbind(queue=queue, exchange=exchange, routing_key=key)
    )


@given(
    PAMQP_NAME,
    st.text(max_size=60),
    st.booleans(),
    st.integers(1, 2**16 - 1),
    st.binary(max_size=300),
    st.sampled_from([0, 9, 10, 17, 64, 4096]),
    st.sampled_from([None, "text/plain"]),
    st.dictionaries(st.sampled_from(["a", "b", "tenant"]), st.text(max_size=10), max_size=3),
)
def test_a_publish_is_the_frames_pamqp_writes(
    exchange: str,
    key: str,
    mandatory: bool,
    channel: int,
    body: bytes,
    frame_max: int,
    content_type: str | None,
    headers: dict[str, str],
) -> None:
    """basic.publish, the content header with the property bytes as given, and the body cut at
    frame_max (which counts each frame's 8 bytes; 0: no limit), as pamqp marshals each of them."""
    properties = commands.Basic.Properties(
        content_type=content_type, headers=headers or None, delivery_mode=2
    )
    ours = b"".join(
        frames.publish_frames(
            channel, frame_max, exchange, key, properties.marshal(), body, mandatory=mandatory
        )
    )
    chunk = frame_max - 8 if frame_max else max(len(body), 1)
    theirs = [
        commands.Basic.Publish(exchange=exchange, routing_key=key, mandatory=mandatory),
        pamqp_header.ContentHeader(body_size=len(body), properties=properties),
        *(pamqp_body.ContentBody(body[start : start + chunk]) for start in range(0, len(body), chunk)),
    ]
    assert ours == b"".join(pamqp_frame.marshal(part, channel) for part in theirs)


@given(PAMQP_NAME, st.booleans(), st.booleans())
def test_declares_and_consume_match_pamqp(name: str, passive: bool, durable: bool) -> None:
    assert wire(
        frames.queue_declare(name, passive=passive, durable=durable, arguments={"x-queue-type": "quorum"})
    ) == (
        wire(
            commands.Queue.Declare(
                queue=name, passive=passive, durable=durable, arguments={"x-queue-type": "quorum"}
            )
        )
    )
    assert wire(frames.exchange_declare(name, "topic", passive=passive, durable=durable)) == wire(
        commands.Exchange.Declare(exchange=name, exchange_type="topic", passive=passive, durable=durable)
    )
    assert wire(frames.basic_consume(name, "tag-1")) == wire(
        commands.Basic.Consume(queue=name, consumer_tag="tag-1")
    )


@given(ANY_NAME, ANY_NAME, ANY_NAME)
def test_every_legal_name_goes_on_the_wire_as_its_utf8_bytes(queue: str, exchange: str, key: str) -> None:
    payload = frames.queue_bind(queue, exchange, key).marshal()
    position = 2
    for name in (queue, exchange, key):
        raw = name.encode()
        assert payload[position] == len(raw)
        assert payload[position + 1 : position + 1 + len(raw)] == raw
        position += 1 + len(raw)


def test_names_that_are_not_utf8_go_back_as_their_bytes() -> None:
    name = b"caf\xe9".decode("utf-8", "surrogateescape")
    method = frames.publish_frames(1, 0, name, "k", b"\x00\x00", b"")[0]
    assert method[7 + 6 : 7 + 11] == b"\x04caf\xe9"


@pytest.mark.parametrize("size", [256, 1000])
def test_a_name_over_255_bytes_is_refused_before_the_wire(size: int) -> None:
    with pytest.raises(frames.NameTooLong):
        frames.queue_bind("q", "é" * (size // 2 + 1), "")


@given(st.dictionaries(st.text(max_size=20), JSON_VALUE, max_size=5))
def test_json_arguments_become_a_table_of_the_same_values(arguments: dict[str, Any]) -> None:
    table = frames.table_from_json(arguments)
    decoded, _ = decode_table(frames.queue_bind("q", "e", "", arguments).marshal()[2 + 2 + 2 + 1 + 1 :])
    assert decoded == table
    assert [key.decode() for key, _ in table] == list(arguments)


@pytest.mark.parametrize("value", [2**63, -(2**63) - 1, 2**80, [1, {"deep": 2**64}]])
def test_integers_beyond_64_bits_are_unrepresentable(value: Any) -> None:
    with pytest.raises(frames.Unrepresentable):
        frames.queue_bind("q", "e", "", {"k": value})


def test_field_types_are_the_ones_rabbitmq_clients_use() -> None:
    assert frames.field_value(True) == ("t", True)
    assert frames.field_value(7) == ("l", 7)
    assert frames.field_value(1.5) == ("d", 1.5)
    assert frames.field_value("é") == ("S", "é".encode())
    assert frames.field_value(None) == ("V", None)
    assert frames.field_value([1]) == ("A", [("l", 1)])
    assert frames.field_value({"a": 1}) == ("F", [(b"a", ("l", 1))])


def test_connection_open_carries_a_vhost_name_pamqp_refuses() -> None:
    vhost = "v" * 200
    with pytest.raises(ValueError, match="virtual_host"):
        commands.Connection.Open(virtual_host=vhost)
    assert frames.connection_open(vhost).marshal() == bytes([200]) + vhost.encode() + b"\x00\x00"
    assert wire(frames.connection_open("/short")) == wire(commands.Connection.Open(virtual_host="/short"))
