"""The capture process keeps raw property bytes and survives names that are not valid UTF-8."""

import json
from collections.abc import Iterator

import pytest
from pamqp import commands, exceptions, frame, header

from archive import content_header
from archive.amqp_codec import Properties, decode_properties, encode_properties
from archive.records import MESSAGE_COLUMNS, message_row


@pytest.fixture
def installed() -> Iterator[None]:
    """The capture process's decoders, for this test only."""
    content_header.install()
    try:
        yield
    finally:
        content_header.uninstall()


def deliver_frame(routing_key: bytes) -> bytes:
    """A Basic.Deliver method frame whose routing key holds exactly these bytes."""
    marshalled = frame.marshal(commands.Basic.Deliver("ctag", 1, False, "orders", "PLACEHOLDER"), 1)
    # The placeholder's length byte and text are swapped for arbitrary bytes.
    old = bytes([len(b"PLACEHOLDER")]) + b"PLACEHOLDER"
    new = bytes([len(routing_key)]) + routing_key
    payload = marshalled[7:-1].replace(old, new)
    return marshalled[:3] + len(payload).to_bytes(4, "big") + payload + marshalled[-1:]


@pytest.mark.usefixtures("installed")
def test_invalid_utf8_routing_key_is_decoded_and_stored_with_its_bytes() -> None:
    raw_key = b"orders.\xff\xfe\x00end"
    _, _, deliver = frame.unmarshal(deliver_frame(raw_key))
    assert isinstance(deliver, commands.Basic.Deliver)
    row = dict(
        zip(
            MESSAGE_COLUMNS,
            message_row("/", "orders", deliver.routing_key, False, b"\x00\x00", b""),
            strict=True,
        )
    )
    assert row["routing_key_raw"] == raw_key
    assert "\x00" not in row["routing_key"]
    row["routing_key"].encode("utf-8")  # the text view is valid UTF-8 for the text column


def test_without_the_capture_decoders_pamqp_rejects_such_a_frame() -> None:
    # aiormq turns this into InvalidFrameError and drops the connection: capture would stall.
    with pytest.raises(exceptions.UnmarshalingException):
        frame.unmarshal(deliver_frame(b"\xff"))


@pytest.mark.usefixtures("installed")
def test_content_header_keeps_the_property_bytes_exactly() -> None:
    props = Properties(
        message_id=b"m-1",
        headers=[(b"width", ("l", 7)), (b"ratio", ("d", 0.1)), (b"blob", ("x", b"\x00\x01"))],
    )
    raw = encode_properties(props)
    content = header.ContentHeader(body_size=3)
    wire = frame.marshal(content, 1)
    # Replace pamqp's own property encoding with ours (types pamqp cannot produce).
    payload = wire[7:19] + raw
    data = wire[:3] + len(payload).to_bytes(4, "big") + payload + b"\xce"
    _, _, decoded = frame.unmarshal(data)
    assert content_header.raw_properties(decoded) == raw
    assert decoded.body_size == 3
    assert decode_properties(content_header.raw_properties(decoded)) == props


def test_row_views_are_json_and_raw_is_authoritative() -> None:
    props = Properties(content_type=b"text/plain\x00", headers=[(b"k", ("S", b"\xff"))])
    row = dict(
        zip(MESSAGE_COLUMNS, message_row("/", "ex", "rk", False, encode_properties(props), b"b"), strict=True)
    )
    assert "\\u0000" not in row["properties"]
    assert json.loads(row["headers"])["k"] != ""
    assert row["properties_raw"] == encode_properties(props)


@pytest.mark.usefixtures("installed")
def test_a_routing_key_read_with_surrogate_escapes_is_sent_back_as_the_same_bytes() -> None:
    raw_key = b"bad.\xff\xfe.key\x00x"
    received = raw_key.decode("utf-8", "surrogateescape")
    publish = commands.Basic.Publish(exchange="orders", routing_key=received)
    wire = frame.marshal(publish, 1)
    assert bytes([len(raw_key)]) + raw_key in wire
    # Valid text is encoded exactly as pamqp always did.
    assert b"\x06orders" in wire
