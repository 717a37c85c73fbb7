"""Row building: redelivery fingerprints treat an empty header table as none, and nothing else;
the JSON views say what the standard encoder says."""

import dataclasses
import json

from hypothesis import given
from hypothesis import strategies as st

from rabbit_archive.archive import records
from rabbit_archive.archive.amqp_codec import Properties, Table, encode_properties, table_json_view
from rabbit_archive.archive.records import (
    MESSAGE_COLUMNS,
    clean_properties,
    fingerprint,
    message_row,
    properties_view,
    without_empty_headers,
)
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


def test_different_bodies_have_different_fingerprints() -> None:
    raw = encode_properties(Properties(message_id=b"m"))
    assert fingerprint("/", "ex", "rk", raw, b"a") != fingerprint("/", "ex", "rk", raw, b"b")


@given(
    headers=st.one_of(st.none(), tables()),
    message_id=short,
    timestamp=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
    priority=st.one_of(st.none(), st.integers(0, 255)),
)
def test_the_json_views_say_what_the_standard_encoder_says(
    headers: Table | None, message_id: bytes | None, timestamp: int | None, priority: int | None
) -> None:
    props = Properties(headers=headers, message_id=message_id, timestamp=timestamp, priority=priority)
    row = dict(
        zip(MESSAGE_COLUMNS, message_row("v", "x", "k", False, encode_properties(props), b""), strict=True)
    )
    assert json.loads(row["properties"]) == json.loads(json.dumps(properties_view(props), ensure_ascii=False))
    if headers is None:
        assert row["headers"] is None
    else:
        assert json.loads(row["headers"]) == json.loads(
            json.dumps(table_json_view(headers), ensure_ascii=False)
        )


def test_a_view_orjson_refuses_is_written_by_the_standard_encoder() -> None:
    view = {"big": 2**70, "text": "é"}
    assert json.loads(records._to_json(view)) == view
