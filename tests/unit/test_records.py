"""Row building: redelivery fingerprints treat an empty header table as none, and nothing else."""

import dataclasses

from hypothesis import given
from hypothesis import strategies as st

from rabbit_archive.archive.amqp_codec import Properties, encode_properties
from rabbit_archive.archive.records import clean_properties, fingerprint, without_empty_headers

short = st.one_of(st.none(), st.binary(max_size=20))
properties = st.builds(
    Properties,
    content_type=short,
    content_encoding=short,
    headers=st.one_of(st.none(), st.just([]), st.just([(b"k", ("S", b"v"))])),
    message_id=short,
    priority=st.one_of(st.none(), st.integers(0, 9)),
)


@given(properties)
def test_only_an_empty_table_is_dropped(props: Properties) -> None:
    raw = encode_properties(props)
    if props.headers == []:
        assert without_empty_headers(raw) == encode_properties(dataclasses.replace(props, headers=None))
    else:
        assert without_empty_headers(raw) == raw


@given(properties)
def test_a_quorum_redelivery_has_the_fingerprint_of_the_first_delivery(props: Properties) -> None:
    original = encode_properties(props)
    counted = dataclasses.replace(props, headers=[*(props.headers or []), (b"x-delivery-count", ("l", 1))])
    redelivered = clean_properties(encode_properties(counted))
    assert fingerprint("/", "ex", "rk", redelivered, b"b") == fingerprint("/", "ex", "rk", original, b"b")


def test_different_bodies_have_different_fingerprints() -> None:
    raw = encode_properties(Properties(message_id=b"m"))
    assert fingerprint("/", "ex", "rk", raw, b"a") != fingerprint("/", "ex", "rk", raw, b"b")
