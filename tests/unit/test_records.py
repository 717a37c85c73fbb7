"""Row building: redelivery fingerprints treat an empty header table as none, and nothing else;
the JSON views say what the standard encoder says."""

import dataclasses
import hashlib
import json
from typing import Any

from hypothesis import assume, given
from hypothesis import strategies as st

from rabbit_archive.archive import records
from rabbit_archive.archive.amqp_codec import (
    PROPERTY_NAMES,
    CodecError,
    Properties,
    decode_properties,
    encode_properties,
    table_json_view,
    text_view,
)
from rabbit_archive.archive.records import (
    MESSAGE_COLUMNS,
    clean_properties,
    fingerprint,
    legacy_fingerprint,
    message_row,
    timestamp_view,
    without_empty_headers,
)
from tests.unit.test_amqp_codec import properties as every_property
from tests.unit.test_amqp_codec import tables

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


def fingerprint_as_defined(
    hash_name: str, vhost: str, exchange: str, routing_key: str, properties_raw: bytes, body: bytes
) -> bytes:
    """The fingerprint as first defined (BLAKE2b), or since SHA-256 (the same parts, another hash),
    with the empty table dropped the slow way."""
    props = decode_properties(properties_raw)
    if props.headers == []:
        properties_raw = encode_properties(dataclasses.replace(props, headers=None))
    digest = hashlib.blake2b(digest_size=16) if hash_name == "blake2b" else hashlib.sha256()
    for part in (
        vhost.encode("utf-8", "surrogateescape"),
        exchange.encode("utf-8", "surrogateescape"),
        routing_key.encode("utf-8", "surrogateescape"),
        properties_raw,
    ):
        digest.update(len(part).to_bytes(4, "big"))
        digest.update(part)
    digest.update(body)
    return digest.digest()[:16]


# Names as the frame parser makes them from the broker's bytes.
names = st.binary(max_size=30).map(lambda raw: raw.decode("utf-8", "surrogateescape"))
any_properties = st.builds(
    Properties,
    content_type=short,
    content_encoding=short,
    headers=st.one_of(st.none(), st.just([]), tables()),
    message_id=short,
    timestamp=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
)


@given(names, names, names, any_properties, st.binary())
def test_the_fingerprint_of_a_message_never_changes(
    vhost: str, exchange: str, routing_key: str, props: Properties, body: bytes
) -> None:
    """Fingerprints pending across an upgrade must still match their redeliveries: the current
    definition stays as defined, and the first stays computable for what older versions left."""
    raw = encode_properties(props)
    expected = fingerprint_as_defined("sha256", vhost, exchange, routing_key, raw, body)
    assert fingerprint(vhost, exchange, routing_key, raw, body) == expected
    legacy = fingerprint_as_defined("blake2b", vhost, exchange, routing_key, raw, body)
    assert legacy_fingerprint(vhost, exchange, routing_key, raw, body) == legacy


def test_different_bodies_have_different_fingerprints() -> None:
    raw = encode_properties(Properties(message_id=b"m"))
    assert fingerprint("/", "ex", "rk", raw, b"a") != fingerprint("/", "ex", "rk", raw, b"b")


def properties_view(props: Properties) -> dict[str, Any]:
    """The row's property view as it was first defined: from a Properties object, by name."""
    view: dict[str, Any] = {}
    for name in PROPERTY_NAMES:
        value = getattr(props, name)
        if value is None or name == "headers":
            continue
        if isinstance(value, bytes):
            view[name] = text_view(value)
        elif name == "timestamp":
            view[name] = timestamp_view(value)
        else:
            view[name] = value
    return view


@given(every_property)
def test_the_row_says_what_the_properties_views_and_the_standard_encoder_say(props: Properties) -> None:
    """The row's views, built without a Properties object, are properties_view's and table_json_view's."""
    row = dict(
        zip(MESSAGE_COLUMNS, message_row("v", "x", "k", False, encode_properties(props), b""), strict=True)
    )
    assert json.loads(row["properties"]) == json.loads(json.dumps(properties_view(props), ensure_ascii=False))
    assert list(json.loads(row["properties"])) == list(properties_view(props))
    if props.headers is None:
        assert row["headers"] is None
    else:
        assert json.loads(row["headers"]) == json.loads(
            json.dumps(table_json_view(props.headers), ensure_ascii=False)
        )
    assert row["message_id"] == (None if props.message_id is None else text_view(props.message_id))
    correlation_id = props.correlation_id
    assert row["correlation_id"] == (None if correlation_id is None else text_view(correlation_id))


@given(st.binary(max_size=40))
def test_undecodable_properties_are_kept_with_the_reason(raw: bytes) -> None:
    try:
        decode_properties(raw)
        reason = None
    except CodecError as error:
        reason = str(error)
    assume(reason is not None)
    row = dict(zip(MESSAGE_COLUMNS, message_row("v", "x", "k", False, raw, b""), strict=True))
    assert json.loads(row["properties"]) == {"$undecodable": reason}
    assert (row["properties_raw"], row["headers"], row["message_id"]) == (raw, None, None)


def test_a_view_orjson_refuses_is_written_by_the_standard_encoder() -> None:
    view = {"big": 2**70, "text": "é"}
    assert json.loads(records._to_json(view)) == view
