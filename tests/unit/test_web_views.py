"""The web console's pure parts: query strings and Filters, the command line to copy, bodies, the chart."""

import json
import shlex
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import typer.main
from hypothesis import given, settings
from hypothesis import strategies as st

from rabbit_archive.archive.errors import UsageError
from rabbit_archive.replay import cli
from rabbit_archive.replay.filters import Filters, build_filters
from rabbit_archive.replay.web import views

NOW = datetime(2026, 11, 28, 10, 42, 30, tzinfo=UTC)


def query(text: str) -> list[tuple[str, str]]:
    """A query string's pairs as Starlette hands them over (blank values kept)."""
    from urllib.parse import parse_qsl

    return parse_qsl(text, keep_blank_values=True)


def test_every_find_filter_has_its_query_name_with_underscores() -> None:
    assert tuple(cli._FILTER_OPTIONS) == views.FILTER_NAMES
    assert {"exchange", "header", "body_json", "vhost"} <= views.REPEATABLE
    assert "include_replays" in views.FLAGS
    assert set(views.FILTER_NAMES) >= {
        "exchange",
        "routing_key",
        "since",
        "until",
        "from_id",
        "to_id",
        "header",
        "message_id",
        "correlation_id",
        "body_contains",
        "body_json",
        "vhost",
        "include_replays",
    }


def test_the_contract_example_reads_as_find_would() -> None:
    filters = views.filters_from_query(query("exchange=orders&routing_key=eu.%23&since=2h&header=k=v"), NOW)
    assert filters == build_filters(
        exchanges=["orders"], routing_key="eu.#", since="2h", headers=["k=v"], now=NOW
    )
    assert filters.since == NOW - timedelta(hours=2)


def test_repeatable_filters_take_every_value_and_empty_form_fields_are_no_filter() -> None:
    text = "exchange=a&exchange=&exchange=b&header=k=1&header=&vhost=&from_id=&routing_key=&include_replays="
    filters = views.filters_from_query(query(text), NOW)
    assert filters == Filters(exchanges=("a", "b"), headers=(("k", "1"),))


@pytest.mark.parametrize(("value", "included"), [("1", True), ("on", True), ("true", True), ("0", False)])
def test_include_replays_reads_a_checkbox(value: str, included: bool) -> None:
    assert views.filters_from_query([("include_replays", value)], NOW).include_replays is included


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("from_id=abc", "from_id: 'abc' is not an archive id"),
        ("to_id=-3", "to_id: '-3' is not an archive id"),
        ("to_id=99999999999999999999", "0 to 2^63-1"),
        ("header=novalue", "--header: expected KEY=VALUE"),
        ("since=yesterday", "--since: cannot read 'yesterday'"),
        ("since=1h&until=2h", "--since must be earlier than --until"),
        ("message_id=%00", "NUL"),
    ],
)
def test_a_bad_value_is_one_message_naming_it(text: str, fragment: str) -> None:
    with pytest.raises(UsageError) as caught:
        views.filters_from_query(query(text), NOW)
    assert fragment in str(caught.value)


names = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1, max_size=30
)


@settings(deadline=None)
@given(
    exchanges=st.lists(names, max_size=3),
    headers=st.lists(st.tuples(names.filter(lambda key: "=" not in key), names), max_size=3),
    routing_key=st.none() | names,
    message_id=st.none() | names,
    body_contains=st.none() | names,
    ids=st.tuples(st.none() | st.integers(0, 2**62), st.none() | st.integers(0, 2**62)),
    include_replays=st.booleans(),
)
def test_filters_go_to_a_query_string_and_back_unchanged(
    exchanges: list[str],
    headers: list[tuple[str, str]],
    routing_key: str | None,
    message_id: str | None,
    body_contains: str | None,
    ids: tuple[int | None, int | None],
    include_replays: bool,
) -> None:
    filters = build_filters(
        exchanges=exchanges,
        headers=[f"{key}={value}" for key, value in headers],
        routing_key=routing_key,
        message_id=message_id,
        body_contains=body_contains,
        from_id=ids[0],
        to_id=ids[1],
        since="2026-11-28T09:00:00.123456+00:00",
        until="2026-11-28T12:00:00+01:00",
        include_replays=include_replays,
        now=NOW,
    )
    assert views.filters_from_query(query(views.query_string(views.filter_pairs(filters))), NOW) == filters


def run_command_filters(command: str) -> tuple[Filters, dict[str, Any]]:
    """The Filters and options the real `rabbit-replay run` parses from a copied command line."""
    words = shlex.split(command)
    assert words[:2] == ["rabbit-replay", "run"]
    group = typer.main.get_command(cli.app)
    run = group.get_command(None, "run")  # type: ignore[attr-defined]
    params = run.make_context("run", words[2:]).params
    filters = build_filters(
        **{argument: params[option] for option, argument in cli._FILTER_OPTIONS.items()}, now=NOW
    )
    return filters, params


# Each example builds the real command's parser: slow on a busy machine, so no deadline.
@settings(max_examples=30, deadline=None)
@given(
    exchanges=st.lists(names, min_size=1, max_size=2),
    header=st.tuples(names.filter(lambda key: "=" not in key), names),
    reason=names,
)
def test_the_copied_command_line_selects_exactly_the_previewed_messages(
    exchanges: list[str], header: tuple[str, str], reason: str
) -> None:
    filters = views.filters_from_query(
        [*(("exchange", name) for name in exchanges), ("header", "=".join(header)), ("since", "2h")], NOW
    )
    target = views.CommandTarget(to_queue="-billing", rate="200", reason=reason, new_message_id=True)
    parsed, params = run_command_filters(views.run_command(filters, 1234, target))
    # The relative time is resolved, and --to-id fixes the newest archive id the preview counted.
    assert parsed == Filters(**{**filters.__dict__, "to_id": 1234})
    assert parsed.since == NOW - timedelta(hours=2)
    assert (params["to_queue"], params["rate"], params["reason"], params["new_message_id"]) == (
        "-billing",
        200.0,
        reason,
        True,
    )


def test_the_command_keeps_a_lower_to_id_and_names_include_replays() -> None:
    filters = views.filters_from_query(query("to_id=10&include_replays=1&exchange=orders"), NOW)
    command = views.run_command(filters, 99, views.CommandTarget())
    assert command == "rabbit-replay run --exchange orders --to-id 10 --include-replays"
    assert "--to-id 99" in views.run_command(views.filters_from_query([], NOW), 99, views.CommandTarget())


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("to_exchange=a&to_queue=b", "not both"),
        ("rate=fast", "rate: 'fast' is not a number"),
        ("rate=0", "must be above 0"),
        ("rate=nan", "must be above 0"),
    ],
)
def test_bad_target_options_are_refused(text: str, fragment: str) -> None:
    with pytest.raises(UsageError) as caught:
        views.CommandTarget.from_query(query(text))
    assert fragment in str(caught.value)


def test_paging_numbers() -> None:
    assert views.optional_number([], "after") is None
    assert views.optional_number([("after", "42")], "after") == 42
    with pytest.raises(UsageError):
        views.optional_number([("after", "4 2")], "after")


# --- bodies and headers ---------------------------------------------------------------------


def test_a_json_body_is_pretty_printed() -> None:
    body = views.body_view(b'{"order":{"id":7},"note":"\\u202eevil"}')
    assert body.kind == "json"
    assert body.lines == ["{", '  "order": {', '    "id": 7', "  },", '  "note": "\\u202eevil"', "}"]
    assert not body.cut


def test_text_keeps_its_lines_and_escapes_control_characters() -> None:
    body = views.body_view(b"line one\n\x1b[31mred\x1b[0m\ttab")
    assert body.kind == "text"
    assert body.lines == ["line one", "\\x1b[31mred\\x1b[0m\\ttab"]


def test_binary_is_a_hex_dump() -> None:
    body = views.body_view(bytes(range(20)) + b"\xff")
    assert body.kind == "binary"
    assert body.lines[0].startswith("00000000  00 01 02 03")
    assert body.lines[1].startswith("00000010  10 11 12 13 ff")


def test_a_large_body_is_cut_unless_shown_in_full() -> None:
    big = b"\xff" * (views.PREVIEW_BYTES + 100)
    cut = views.body_view(big)
    assert cut.cut
    assert cut.size == len(big)
    assert len(cut.lines) == views.PREVIEW_BYTES // 16
    whole = views.body_view(big, full=True)
    assert not whole.cut
    assert len(whole.lines) == -(-len(big) // 16)
    text = views.body_view(b"x" * (views.PREVIEW_BYTES + 1))
    assert text.cut
    assert text.lines == ["x" * views.PREVIEW_BYTES]


def test_deep_or_broken_json_is_shown_as_text() -> None:
    assert views.body_view(b"[" * 100_000).kind == "text"
    assert views.body_view(b'{"open": ').kind == "text"
    assert views.body_view(b"").kind == "empty"


def test_typed_headers_become_indented_rows() -> None:
    entries = [
        {"key": "attempt", "type": "int32", "value": 3},
        {"key": "nested", "type": "table", "value": [{"key": "a", "type": "int64", "value": 2**40}]},
        {"key": "list", "type": "array", "value": [{"type": "longstr", "value": "x\x1b"}]},
    ]
    assert views.header_rows(entries) == [
        views.HeaderRow(0, "attempt", "int32", "3"),
        views.HeaderRow(0, "nested", "table", "1 entries"),
        views.HeaderRow(1, "a", "int64", str(2**40)),
        views.HeaderRow(0, "list", "array", "1 items"),
        views.HeaderRow(1, "[0]", "longstr", json.dumps("x\x1b")),
    ]


# --- the traffic chart ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("window", "width"),
    [
        (timedelta(seconds=30), 1),
        (timedelta(minutes=5), 5),
        (timedelta(hours=1), 60),
        (timedelta(hours=2), 120),
        (timedelta(days=1), 1800),
        (timedelta(days=30), 43200),
        (timedelta(days=400), 5 * 86400),
    ],
)
def test_bars_have_round_widths_and_at_most_90_of_them(window: timedelta, width: int) -> None:
    assert views.bar_width(NOW - window, NOW) == width
    assert window.total_seconds() / width <= views.MAX_BARS


def test_bars_fall_on_round_times_and_small_exchanges_share_a_series() -> None:
    start = datetime(2026, 11, 28, 10, 40, 10, tzinfo=UTC)
    first = int(datetime(2026, 11, 28, 10, 40, tzinfo=UTC).timestamp()) // 60
    rows = [(f"x{n}", first, 10 + n) for n in range(10)] + [("x9", first + 2, 5), ("", first + 1, 1)]
    chart = views.traffic(rows, start, start + timedelta(minutes=10), 60)
    data = chart.as_json()
    assert data["from"] == "2026-11-28T10:40:00+00:00"
    assert data["count"] == 11
    labels = [series["label"] for series in data["series"]]
    assert labels == ["x9", "x8", "x7", "x6", "x5", "x4", "x3", views.OTHERS]
    assert data["series"][-1] == {
        "exchange": None,
        "label": views.OTHERS,
        "total": 10 + 11 + 12 + 1,
        "narrows": False,
    }
    assert data["total"] == sum(messages for _, _, messages in rows)
    bars = dict((position, counts) for position, counts in data["bars"])
    assert bars[0] == [19, 18, 17, 16, 15, 14, 13, 33]
    assert bars[1] == [0] * 7 + [1]
    assert bars[2] == [5] + [0] * 7


def test_the_start_of_a_larger_body_is_shown_as_cut() -> None:
    # The page reads only body_limit() bytes: a character cut at the end keeps it text.
    start = ("é" * views.PREVIEW_BYTES).encode()[: views.PREVIEW_BYTES - 1]
    body = views.body_view(start, 10 * views.PREVIEW_BYTES)
    assert body.kind == "text"
    assert body.cut
    assert body.size == 10 * views.PREVIEW_BYTES
    json_start = views.body_view(b'{"a": 1, "b": [' + b"1," * 100, 1_000_000)
    assert json_start.kind == "text", "only a whole body is parsed as JSON"
    assert views.body_limit(full=True) == views.FULL_BYTES


def test_every_filter_of_find_goes_through_the_query_and_the_command_line() -> None:
    # Filters added to find later (here the dead-letter ones) need nothing of their own.
    text = "dead_lettered_from=billing&death_reason=rejected&exchange=dlx&body_json=order.id=7"
    filters = views.filters_from_query(query(text), NOW)
    assert (filters.dead_lettered_from, filters.death_reason) == ("billing", "rejected")
    assert views.filters_from_query(query(views.query_string(views.filter_pairs(filters))), NOW) == filters
    parsed, _ = run_command_filters(views.run_command(filters, 9, views.CommandTarget()))
    assert parsed == Filters(**{**filters.__dict__, "to_id": 9})
