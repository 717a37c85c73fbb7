"""The archive's connections keep raw property bytes and survive names that are not valid UTF-8,
without changing how any other client in the process decodes."""

import json

import pytest
from pamqp import commands, exceptions, frame, header

from rabbit_archive.archive import content_header, frames
from rabbit_archive.archive.amqp_codec import Properties, decode_properties, encode_properties
from rabbit_archive.archive.records import MESSAGE_COLUMNS, message_row


def deliver_frame(routing_key: bytes) -> bytes:
    """A Basic.Deliver method frame whose routing key holds exactly these bytes."""
    marshalled = frame.marshal(commands.Basic.Deliver("ctag", 1, False, "orders", "PLACEHOLDER"), 1)
    # The placeholder's length byte and text are swapped for arbitrary bytes.
    old = bytes([len(b"PLACEHOLDER")]) + b"PLACEHOLDER"
    new = bytes([len(routing_key)]) + routing_key
    payload = marshalled[7:-1].replace(old, new)
    return marshalled[:3] + len(payload).to_bytes(4, "big") + payload + marshalled[-1:]


def test_invalid_utf8_routing_key_is_decoded_and_stored_with_its_bytes() -> None:
    raw_key = b"orders.\xff\xfe\x00end"
    _, _, deliver = content_header.unmarshal(deliver_frame(raw_key))
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


def test_pamqp_itself_still_rejects_such_a_frame() -> None:
    # Nothing global changed: other clients in the process decode as pamqp always did.
    with pytest.raises(exceptions.UnmarshalingException):
        frame.unmarshal(deliver_frame(b"\xff"))


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
    _, _, decoded = content_header.unmarshal(data)
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


def test_a_routing_key_read_with_surrogate_escapes_is_sent_back_as_the_same_bytes() -> None:
    raw_key = b"bad.\xff\xfe.key\x00x"
    received = raw_key.decode("utf-8", "surrogateescape")
    wire = frames.publish_frames(1, 0, "orders", received, b"\x00\x00", b"")[0]
    assert bytes([len(raw_key)]) + raw_key in wire
    assert b"\x06orders" in wire


def test_return_and_get_ok_names_are_kept_too() -> None:
    returned = commands.Basic.Return(312, "NO_ROUTE", "orders", "PLACEHOLDER")
    wire = frame.marshal(returned, 1)
    payload = wire[7:-1].replace(b"\x0bPLACEHOLDER", b"\x02\xff\xfe")
    _, _, decoded = content_header.unmarshal(wire[:3] + len(payload).to_bytes(4, "big") + payload + b"\xce")
    assert (decoded.reply_code, decoded.reply_text, decoded.exchange) == (312, "NO_ROUTE", "orders")
    assert decoded.routing_key.encode("utf-8", "surrogateescape") == b"\xff\xfe"
    get_ok = frame.marshal(commands.Basic.GetOk(9, True, "e", "k", 4), 1)
    _, _, decoded = content_header.unmarshal(get_ok)
    assert (decoded.delivery_tag, decoded.redelivered, decoded.exchange, decoded.routing_key) == (
        9,
        True,
        "e",
        "k",
    )
    assert decoded.message_count == 4


def test_other_frames_are_decoded_by_pamqp() -> None:
    qos_ok = frame.marshal(commands.Basic.QosOk(), 3)
    _, channel, decoded = content_header.unmarshal(qos_ok)
    assert channel == 3
    assert isinstance(decoded, commands.Basic.QosOk)
