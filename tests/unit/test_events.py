"""Topology events with any content: the vhost header is read when it is there, nothing else breaks."""

from hypothesis import given
from hypothesis import strategies as st

from rabbit_archive.archive.amqp_codec import Properties, encode_properties
from rabbit_archive.capture.events import event_vhost


@given(st.binary(max_size=300))
def test_any_property_bytes_give_a_vhost_or_none(raw: bytes) -> None:
    assert event_vhost(raw) is None or isinstance(event_vhost(raw), str)


def test_the_vhost_header_is_read_as_text_even_when_it_is_not_utf8() -> None:
    headers = [(b"name", ("S", b"orders")), (b"vhost", ("S", b"caf\xe9"))]
    assert event_vhost(encode_properties(Properties(headers=headers))) == "caf\ufffd"


def test_a_vhost_header_of_another_type_is_ignored() -> None:
    for value in [("l", 5), ("A", []), ("F", []), ("V", None), ("x", b"bytes")]:
        assert event_vhost(encode_properties(Properties(headers=[(b"vhost", value)]))) is None
    assert event_vhost(encode_properties(Properties())) is None
