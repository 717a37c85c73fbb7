"""The pure parts of incident replays: x-death parsing, --to-origin routes, the death filters, the
optional --to-origin value."""

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rabbit_archive.archive import queries
from rabbit_archive.archive.amqp_codec import FieldValue, Properties, Table, encode_properties
from rabbit_archive.archive.errors import UsageError
from rabbit_archive.replay.cli import optional_value
from rabbit_archive.replay.deaths import Death, deaths, deaths_of, origin
from rabbit_archive.replay.filters import Filters, build_filters, where_clause
from tests.unit.test_amqp_codec import field_values, properties, tables


def _entry(queue: bytes, reason: bytes, exchange: bytes, *keys: bytes, count: int = 1) -> FieldValue:
    # The shape RabbitMQ writes: count, reason, queue, time, exchange, routing-keys.
    return (
        "F",
        [
            (b"count", ("l", count)),
            (b"reason", ("S", reason)),
            (b"queue", ("S", queue)),
            (b"time", ("T", 1_700_000_000)),
            (b"exchange", ("S", exchange)),
            (b"routing-keys", ("A", [("S", key) for key in keys])),
        ],
    )


def _raw(headers: Table | None) -> bytes:
    return encode_properties(Properties(content_type=b"text/plain", headers=headers, delivery_mode=2))


TWICE: Table = [
    (b"app", ("S", b"billing")),
    (
        b"x-death",
        (
            "A",
            [
                _entry(b"retry", b"expired", b"retry-x", b"r.1"),
                _entry(b"work", b"rejected", b"in", b"job", b"cc"),
            ],
        ),
    ),
    (b"x-first-death-queue", ("S", b"work")),
]


def test_deaths_are_read_most_recent_first() -> None:
    assert deaths(_raw(TWICE)) == [
        Death(b"retry", b"expired", b"retry-x", (b"r.1",)),
        Death(b"work", b"rejected", b"in", (b"job", b"cc")),
    ]


def test_origin_queue_is_the_latest_death_and_exchange_the_first_publish() -> None:
    raw = _raw(TWICE)
    assert origin(raw, "queue") == ("", "retry")
    assert origin(raw, "exchange") == ("in", "job")


@pytest.mark.parametrize(
    "headers",
    [
        None,
        [],
        [(b"x-death", ("S", b"not an array"))],
        [(b"x-death", ("A", []))],
        [(b"x-death", ("A", [("S", b"not a table")]))],
        [(b"x-death", ("A", [("F", [(b"queue", ("l", 5))])]))],
    ],
)
def test_without_a_readable_x_death_there_is_no_origin(headers: Table | None) -> None:
    raw = _raw(headers)
    assert deaths(raw) == []
    assert origin(raw, "queue") is None
    assert origin(raw, "exchange") is None


def test_garbage_property_bytes_have_no_origin() -> None:
    assert origin(b"\xff\xff\x00", "queue") is None


def test_names_that_are_not_utf8_keep_their_bytes() -> None:
    raw = _raw([(b"x-death", ("A", [_entry(b"q\xff", b"maxlen", b"e\xfe", b"k\xfd")]))])
    queue = origin(raw, "queue")
    exchange = origin(raw, "exchange")
    assert queue is not None
    assert queue[1].encode("utf-8", "surrogateescape") == b"q\xff"
    assert exchange is not None
    assert exchange[0].encode("utf-8", "surrogateescape") == b"e\xfe"
    assert exchange[1].encode("utf-8", "surrogateescape") == b"k\xfd"


@given(tables())
def test_any_header_table_reads_without_error(table: Table) -> None:
    for death in deaths_of(table):
        assert isinstance(death.queue, bytes)


@given(st.lists(field_values(), max_size=4), properties)
def test_any_x_death_value_reads_without_error(items: list[FieldValue], props: Properties) -> None:
    props.headers = [*(props.headers or []), (b"x-death", ("A", items))]
    raw = encode_properties(props)
    found = deaths(raw)
    assert len(found) <= len(items)
    route = origin(raw, "queue")
    assert (route is None) == (not found)


def test_death_filters_are_parameters_of_fixed_fragments() -> None:
    filters = build_filters(dead_lettered_from="orders'; DROP", death_reason="maxlen")
    clause, params = where_clause(filters)
    assert queries.FILTER_DEAD_LETTERED_FROM.format("$1") in clause
    assert queries.FILTER_DEATH_REASON.format("$2") in clause
    assert params[:2] == ["orders'; DROP", "maxlen"]
    assert not filters.selects_everything()
    assert Filters.from_json(filters.to_json()) == filters


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"death_reason": "dropped"}, "--death-reason"),
        ({"death_reason": "Rejected"}, "--death-reason"),
        ({"dead_lettered_from": "a\x00b"}, "--dead-lettered-from"),
    ],
)
def test_bad_death_filters_name_their_option(options: dict[str, Any], fragment: str) -> None:
    with pytest.raises(UsageError, match=fragment):
        build_filters(**options)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["run", "--to-origin"], ["run", "--to-origin=queue"]),
        (["run", "--to-origin", "--yes"], ["run", "--to-origin=queue", "--yes"]),
        (["run", "--to-origin", "exchange"], ["run", "--to-origin", "exchange"]),
        (["run", "--to-origin=exchange"], ["run", "--to-origin=exchange"]),
        (["run", "--", "--to-origin"], ["run", "--", "--to-origin"]),
    ],
)
def test_a_bare_to_origin_means_queue(args: list[str], expected: list[str]) -> None:
    assert optional_value(args, "--to-origin", "queue", ("queue", "exchange")) == expected
