"""Replay filters: topics match as in RabbitMQ, options parse strictly, values reach SQL only as params."""

import json
import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rabbit_archive.archive.errors import UsageError
from rabbit_archive.replay.filters import (
    Filters,
    build_filters,
    parse_time,
    topic_matches,
    topic_regex,
    where_clause,
)

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


def reference_words(key: str) -> list[str]:
    """The words of a routing key or binding pattern as RabbitMQ splits them: '' has none."""
    return key.split(".") if key else []


def reference_match(pattern: list[str], key: list[str]) -> bool:
    """A word-by-word topic matcher, independent of any regex: '*' one word, '#' zero or more."""
    if not pattern:
        return not key
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return reference_match(rest, key) or (bool(key) and reference_match(pattern, key[1:]))
    if not key:
        return False
    return (head in ("*", key[0])) and reference_match(rest, key[1:])


def reference(pattern: str, key: str) -> bool:
    return reference_match(reference_words(pattern), reference_words(key))


# (pattern, routing key, expected): the corner cases, checked against both matchers.
CORNER_CASES: list[tuple[str, str, bool]] = [
    ("#", "", True),
    ("#", "a", True),
    ("#", "a.b.c", True),
    ("#", "..", True),
    ("*", "", False),
    ("*", "a", True),
    ("*", "a.b", False),
    ("*", ".", False),
    ("#.a", "a", True),
    ("#.a", "x.y.a", True),
    ("#.a", "a.x", False),
    ("#.a", "", False),
    ("a.#", "a", True),
    ("a.#", "a.b.c", True),
    ("a.#", "b.a", False),
    ("a.#", "", False),
    ("a.#.b", "a.b", True),
    ("a.#.b", "a.x.y.b", True),
    ("a.#.b", "a.x", False),
    ("a.#.b", "ab", False),
    ("#.#", "", True),
    ("#.#", "a.b", True),
    ("*.#", "", False),
    ("*.#", "a", True),
    ("*.#", "a.b.c", True),
    ("#.*", "", False),
    ("#.*", "a", True),
    ("#.*", "a.b.c", True),
    ("a.*.c", "a.b.c", True),
    ("a.*.c", "a..c", True),
    ("a.*.c", "a.c", False),
    ("a.*.c", "a.b.b.c", False),
    ("", "", True),
    ("", "a", False),
    ("", ".", False),
    ("*.*.*", "a..b", True),
    ("a.*.b", "a..b", True),
    ("a.b", "a..b", False),
    ("*.a", ".a", True),
    (".a", ".a", True),
    ("a", ".a", False),
    ("a.*", "a.", True),
    ("a.", "a.", True),
    ("a", "a.", False),
    ("*.*", ".", True),
    ("a*", "a*", True),
    ("a*", "ab", False),
    ("a*", "a", False),
    ("a#", "a#", True),
    ("a#", "a.b", False),
    ("#a", "#a", True),
    ("a+b", "a+b", True),
    ("a+b", "aab", False),
    ("x(y)", "x(y)", True),
    ("x(y)", "xy", False),
    ("[z]", "[z]", True),
    ("[z]", "z", False),
    ("$", "$", True),
    ("$", "", False),
    ("^", "^", True),
    ("\\", "\\", True),
    ("\\.a", "\\.a", True),
    ("a|b", "a|b", True),
    ("a|b", "a", False),
    ("a?", "a?", True),
    ("a?", "a", False),
    ("a{1}", "a{1}", True),
    ("a{1}", "a", False),
    ("a.b", "axb", False),
    ("é.ü", "é.ü", True),
    ("é.*", "é.ü", True),
    ("*.ü", "é.ü", True),
    ("é", "e", False),
    ("*", "a\n", True),
    ("a", "a\n", False),
    ("a\n", "a\n", True),
    ("#.b", "a\n.b", True),
    ("a b.*", "a b.c", True),
]


@pytest.mark.parametrize(("pattern", "key", "expected"), CORNER_CASES)
def test_reference_matcher_agrees_with_the_corner_cases(pattern: str, key: str, expected: bool) -> None:
    assert reference(pattern, key) is expected


@pytest.mark.parametrize(("pattern", "key", "expected"), CORNER_CASES)
def test_topic_matches_follows_rabbitmq_on_the_corner_cases(pattern: str, key: str, expected: bool) -> None:
    assert topic_matches(pattern, key) is expected


pattern_words = st.lists(st.sampled_from(["a", "b", "", "*", "#"]), max_size=5).map(".".join)
key_words = st.lists(st.sampled_from(["a", "b", ""]), max_size=5).map(".".join)


@given(pattern_words, key_words)
def test_topic_matches_agrees_with_the_reference_matcher(pattern: str, key: str) -> None:
    assert topic_matches(pattern, key) is reference(pattern, key)


@given(st.text(), st.text())
def test_a_pattern_without_wildcards_matches_only_the_same_key(pattern: str, key: str) -> None:
    literal = ".".join(word for word in pattern.split(".") if word not in ("*", "#"))
    assert topic_matches(literal, key) is (literal == key)
    assert topic_matches(literal, literal)


def test_topic_regex_is_anchored_and_escapes_literal_words() -> None:
    assert topic_regex("") == "^$"
    assert topic_regex("a+b.*.#") == r"^\.a\+b\.[^.]*(\.[^.]*)*$"


# --- build_filters -------------------------------------------------------------------------------------


def test_no_options_build_filters_that_select_everything() -> None:
    filters = build_filters(now=NOW)
    assert filters == Filters()
    assert filters.selects_everything()


def test_header_values_may_contain_equals_signs_and_be_empty() -> None:
    filters = build_filters(headers=["k=v", "expr=a=b", "empty="], now=NOW)
    assert filters.headers == (("k", "v"), ("expr", "a=b"), ("empty", ""))


@pytest.mark.parametrize("text", ["novalue", "=v", ""])
def test_a_header_without_key_or_equals_sign_is_a_usage_error(text: str) -> None:
    with pytest.raises(UsageError, match="--header"):
        build_filters(headers=[text], now=NOW)


def test_body_json_paths_split_on_dots_and_values_keep_equals_signs() -> None:
    filters = build_filters(body_json=["order.customer.id=42", "x=a=b", "flag="], now=NOW)
    assert filters.body_json == ((("order", "customer", "id"), "42"), (("x",), "a=b"), (("flag",), ""))


@pytest.mark.parametrize("text", ["a..b=1", "=1", ".a=1", "a.=1", ".=1", "noequals"])
def test_a_bad_body_json_path_is_a_usage_error(text: str) -> None:
    with pytest.raises(UsageError, match="--body-json"):
        build_filters(body_json=[text], now=NOW)


@pytest.mark.parametrize(
    ("option", "kwargs"),
    [
        ("--routing-key", {"routing_key": "a.\x00"}),
        ("--message-id", {"message_id": "m\x00"}),
        ("--correlation-id", {"correlation_id": "\x00"}),
        ("--exchange", {"exchanges": ["ok", "bad\x00"]}),
        ("--vhost", {"vhosts": ["\x00/"]}),
        ("--header", {"headers": ["k=v\x00"]}),
        ("--header", {"headers": ["k\x00=v"]}),
        ("--body-json", {"body_json": ["a.b=\x00"]}),
        ("--body-json", {"body_json": ["a\x00.b=1"]}),
    ],
)
def test_a_nul_character_in_a_text_value_is_a_usage_error(option: str, kwargs: dict[str, Any]) -> None:
    with pytest.raises(UsageError, match=re.escape(option)):
        build_filters(**kwargs, now=NOW)


def test_body_contains_keeps_a_nul_character_because_bodies_are_matched_as_bytes() -> None:
    assert build_filters(body_contains="a\x00b", now=NOW).body_contains == "a\x00b"


@pytest.mark.parametrize(("option", "kwargs"), [("--from-id", {"from_id": -1}), ("--to-id", {"to_id": -5})])
def test_a_negative_archive_id_is_a_usage_error(option: str, kwargs: dict[str, Any]) -> None:
    with pytest.raises(UsageError, match=option):
        build_filters(**kwargs, now=NOW)


def test_ids_are_kept_as_given() -> None:
    filters = build_filters(from_id=1, to_id=10, now=NOW)
    assert (filters.from_id, filters.to_id) == (1, 10)


@pytest.mark.parametrize(
    ("since", "until"),
    [
        ("2h", "3h"),
        ("2026-11-27T10:00:00", "2026-11-27T10:00:00"),
        ("2026-11-27T10:00:00Z", "2026-11-27T09:00:00"),
    ],
)
def test_since_not_before_until_is_a_usage_error(since: str, until: str) -> None:
    with pytest.raises(UsageError, match="--since must be earlier than --until"):
        build_filters(since=since, until=until, now=NOW)


def test_since_and_until_are_parsed_against_now() -> None:
    filters = build_filters(since="3h", until="2026-11-27T11:00:00+01:00", now=NOW)
    assert filters.since == NOW - timedelta(hours=3)
    assert filters.until == datetime(2026, 11, 27, 10, 0, tzinfo=UTC)


@pytest.mark.parametrize(("option", "kwargs"), [("--since", {"since": "soon"}), ("--until", {"until": "x"})])
def test_an_unreadable_time_option_is_a_usage_error_naming_it(option: str, kwargs: dict[str, Any]) -> None:
    with pytest.raises(UsageError, match=option):
        build_filters(**kwargs, now=NOW)


# --- parse_time ---------------------------------------------------------------------------------------


def test_iso_time_with_z_is_utc() -> None:
    assert parse_time("--since", "2026-11-27T10:00:00Z", NOW) == datetime(2026, 11, 27, 10, 0, tzinfo=UTC)


def test_iso_time_with_an_offset_keeps_the_instant() -> None:
    moment = parse_time("--since", "2026-11-27T10:00:00+02:00", NOW)
    assert moment == datetime(2026, 11, 27, 8, 0, tzinfo=UTC)
    assert moment.utcoffset() == timedelta(hours=2)


def test_naive_iso_time_means_utc() -> None:
    moment = parse_time("--since", "2026-11-27T10:00:00", NOW)
    assert moment == datetime(2026, 11, 27, 10, 0, tzinfo=UTC)
    assert moment.tzinfo is UTC


@pytest.mark.parametrize(
    ("text", "back"),
    [
        ("90s", timedelta(seconds=90)),
        ("15m", timedelta(minutes=15)),
        ("2h", timedelta(hours=2)),
        ("3d", timedelta(days=3)),
        (" 2h ", timedelta(hours=2)),
    ],
)
def test_a_duration_is_that_long_before_now(text: str, back: timedelta) -> None:
    assert parse_time("--since", text, NOW) == NOW - back


@pytest.mark.parametrize("text", ["", "yesterday", "2h ago", "-2h", "2026-13-01T00:00:00", "10:00 tomorrow"])
def test_an_unreadable_time_is_a_usage_error_naming_the_option(text: str) -> None:
    with pytest.raises(UsageError, match=r"^--until: cannot read"):
        parse_time("--until", text, NOW)


# --- Filters ------------------------------------------------------------------------------------------


def test_only_include_replays_still_selects_everything() -> None:
    assert Filters().selects_everything()
    assert Filters(include_replays=True).selects_everything()
    assert Filters(upto_id=7).selects_everything()


@pytest.mark.parametrize(
    "narrowing",
    [
        {"exchanges": ("x",)},
        {"routing_key": "#"},
        {"routing_key": ""},
        {"since": NOW},
        {"until": NOW},
        {"from_id": 0},
        {"to_id": 5},
        {"headers": (("k", ""),)},
        {"message_id": ""},
        {"correlation_id": "c"},
        {"body_contains": ""},
        {"body_json": ((("a",), "1"),)},
        {"vhosts": ("/",)},
    ],
)
def test_any_filter_narrows_the_selection(narrowing: dict[str, Any]) -> None:
    assert not Filters(**narrowing).selects_everything()
    assert not Filters(**narrowing, include_replays=True).selects_everything()


EVERYTHING = Filters(
    exchanges=("orders", "it's"),
    routing_key="order.*.#",
    since=datetime(2026, 11, 27, 10, 0, 0, 123456, tzinfo=timezone(timedelta(hours=2))),
    until=datetime(2026, 11, 28, 10, 0, tzinfo=UTC),
    from_id=3,
    to_id=900,
    headers=(("attempt", "3"), ("expr", "a=b")),
    message_id="m-1",
    correlation_id="c-1",
    body_contains='"status": "failed"',
    body_json=((("order", "customer", "id"), "42"), (("x",), "")),
    vhosts=("/", "prod"),
    include_replays=True,
    upto_id=1000,
)


def test_every_field_survives_a_json_round_trip() -> None:
    restored = Filters.from_json(json.loads(json.dumps(EVERYTHING.to_json())))
    assert restored == EVERYTHING
    assert restored.upto_id == EVERYTHING.upto_id
    assert restored.since is not None
    assert restored.since.utcoffset() == timedelta(hours=2)


def test_empty_filters_are_an_empty_json_object() -> None:
    assert Filters().to_json() == {}
    assert Filters.from_json({}) == Filters()


@pytest.mark.parametrize("field", ["from_id", "to_id", "upto_id"])
def test_an_id_of_zero_survives_a_json_round_trip(field: str) -> None:
    filters = Filters(**{field: 0})
    restored = Filters.from_json(json.loads(json.dumps(filters.to_json())))
    assert getattr(restored, field) == 0


# --- where_clause -------------------------------------------------------------------------------------


def placeholders(sql: str) -> list[int]:
    return [int(number) for number in re.findall(r"\$(\d+)", sql)]


def assert_numbered(sql: str, params: list[Any]) -> None:
    """Placeholders are exactly $1..$n for n parameters (a parameter may be used twice)."""
    assert set(placeholders(sql)) == set(range(1, len(params) + 1))


def test_no_filters_leave_out_replays_only() -> None:
    assert where_clause(Filters()) == ("replay_id IS NULL", [])


def test_include_replays_alone_selects_every_row() -> None:
    assert where_clause(Filters(include_replays=True)) == ("TRUE", [])


def test_replays_are_left_out_unless_included() -> None:
    sql, _ = where_clause(EVERYTHING)
    assert "replay_id" not in sql
    sql, _ = where_clause(Filters(exchanges=("x",)))
    assert sql.endswith(" AND replay_id IS NULL")


HOSTILE = [
    "o'hara",
    "x' OR '1'='1",
    "50%_off",
    "C:\\temp\\new",
    "$1; DROP TABLE archive;--",
    '"quoted"',
    "'; --",
    "a\\'b",
    "E'\\x00'",
]


def hostile_filters(value: str, routing_key: str) -> Filters:
    return Filters(
        exchanges=(value, "x"),
        routing_key=routing_key,
        since=NOW - timedelta(hours=1),
        until=NOW,
        from_id=1,
        to_id=2,
        headers=((value, value), ("k", value)),
        message_id=value,
        correlation_id=value,
        body_contains=value,
        body_json=(((value, "b"), value),),
        vhosts=(value,),
        upto_id=3,
    )


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_values_reach_postgres_only_as_parameters(value: str) -> None:
    for routing_key in (value, f"{value}.*.#"):
        sql, params = where_clause(hostile_filters(value, routing_key), after_id=4)
        assert value not in sql
        assert routing_key not in sql
        assert "'" not in sql.replace("''", "").replace("'.'", "")
        assert_numbered(sql, params)
        assert value in params
        assert [value, "x"] in params
        assert value.encode() in params
        assert [value, "b"] in params


identifier_safe = st.text().filter(lambda text: {"*", "#"}.isdisjoint(text.split(".")))


@given(st.text(), identifier_safe)
def test_the_sql_text_does_not_depend_on_the_values(value: str, literal_key: str) -> None:
    benign_sql, benign_params = where_clause(hostile_filters("v", "rk"), after_id=9)
    sql, params = where_clause(hostile_filters(value, literal_key), after_id=9)
    assert sql == benign_sql
    assert len(params) == len(benign_params)
    wild_sql, _ = where_clause(hostile_filters("v", "rk.#"), after_id=9)
    assert where_clause(hostile_filters(value, f"{literal_key}.#"), after_id=9)[0] == wild_sql


def test_every_filter_adds_its_parameters_in_order() -> None:
    sql, params = where_clause(EVERYTHING, after_id=500)
    assert_numbered(sql, params)
    assert placeholders(sql) == [
        1,
        2,
        3,
        4,
        5,
        6,
        7,
        8,
        9,
        10,
        10,
        11,
        12,
        12,
        13,
        14,
        15,
        16,
        17,
        18,
        19,
        20,
    ]
    assert params == [
        ["orders", "it's"],
        ["/", "prod"],
        topic_regex("order.*.#"),
        EVERYTHING.since,
        EVERYTHING.until,
        3,
        900,
        1000,
        500,
        "attempt",
        "3",
        "expr",
        "a=b",
        "m-1",
        "c-1",
        b'"status": "failed"',
        ["order", "customer", "id"],
        "42",
        ["x"],
        "",
    ]


@pytest.mark.parametrize("key", ["orders.created", "", "a*.b#", "a..b", "*a", "x.#y"])
def test_a_routing_key_without_wildcard_words_is_compared_for_equality(key: str) -> None:
    sql, params = where_clause(Filters(routing_key=key, include_replays=True))
    assert sql == "routing_key = $1::text"
    assert params == [key]


@pytest.mark.parametrize("key", ["#", "*", "orders.*", "#.created", "a.#.b", "*.*"])
def test_a_routing_key_with_wildcard_words_is_matched_by_the_topic_regex(key: str) -> None:
    sql, params = where_clause(Filters(routing_key=key, include_replays=True))
    assert sql == "(CASE WHEN routing_key = '' THEN '' ELSE '.' || routing_key END) ~ $1::text"
    assert params == [topic_regex(key)]
