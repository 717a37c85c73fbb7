"""The pure parts of incident replays: x-death parsing, --to-origin routes, the death filters, the
optional --to-origin value, header edits on typed tables, the guards and the target URL on resume."""

import dataclasses
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rabbit_archive.archive import queries
from rabbit_archive.archive.amqp_codec import (
    FieldValue,
    Properties,
    Table,
    decode_properties,
    encode_properties,
    encode_table,
    typed_entries,
)
from rabbit_archive.archive.errors import UsageError
from rabbit_archive.config.settings import Settings, mask_url, url_vhost
from rabbit_archive.replay import operations
from rabbit_archive.replay.cli import optional_value
from rabbit_archive.replay.deaths import Death, deaths, deaths_of, origin
from rabbit_archive.replay.edits import _INTS, HeaderEdits, build_edits, typed_value
from rabbit_archive.replay.filters import Filters, build_filters, where_clause
from rabbit_archive.replay.operations import check_expected_count, type_back
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


# ------------------------------------------------------------------ header edits

_text_keys = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=10
)
_texts = _text_keys.map(lambda text: text.encode())


def _int_value(letter: str, low: int, high: int) -> st.SearchStrategy[FieldValue]:
    return st.integers(low, high).map(lambda number: (letter, number))


# Values whose `show --json` form names them exactly (UTF-8 text, finite floats, canonical booleans).
_viewable_scalars = st.one_of(
    st.booleans().map(lambda flag: ("t", flag)),
    *(_int_value(letter, low, high) for letter, low, high in _INTS.values() if letter != "T"),
    _int_value("T", 0, 253_402_300_799),  # up to 9999-12-31T23:59:59Z
    st.floats(allow_nan=False, allow_infinity=False).map(lambda number: ("d", number)),
    st.tuples(st.integers(0, 40), st.integers(-(2**31), 2**31 - 1)).map(lambda pair: ("D", pair)),
    _texts.map(lambda text: ("S", text)),
    st.binary(max_size=20).map(lambda raw: ("x", raw)),
    st.just(("V", None)),
)
_viewable = st.recursive(
    _viewable_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=3).map(lambda items: ("A", items)),
        st.lists(st.tuples(_texts, children), max_size=3).map(lambda table: ("F", table)),
    ),
    max_leaves=10,
)
_viewable_tables = st.lists(st.tuples(_texts, _viewable), max_size=6)


@given(_viewable_tables)
def test_typed_values_read_back_what_show_json_writes(table: Table) -> None:
    edits = HeaderEdits(set=tuple(table))
    assert HeaderEdits.from_json(json.loads(json.dumps(edits.to_json()))).set == tuple(table)
    for entry, (_key, value) in zip(typed_entries(table), table, strict=True):
        assert typed_value({"type": entry["type"], "value": entry["value"]}) == value


_few_keys = st.sampled_from([b"a", b"b", b"tenant", b"x-death", b"\xffodd"])


@given(
    properties,
    st.lists(st.tuples(_few_keys, _viewable_scalars), max_size=3, unique_by=lambda entry: entry[0]),
    st.lists(_few_keys, max_size=2, unique=True),
)
def test_edits_leave_every_other_header_and_property_byte_identical(
    props: Properties, setting: list[tuple[bytes, FieldValue]], removing: list[bytes]
) -> None:
    removing = [key for key in removing if key not in dict(setting)]
    edits = HeaderEdits(set=tuple(setting), unset=tuple(removing))
    raw = encode_properties(props)
    edited = decode_properties(edits.apply(raw))
    named = set(dict(setting)) | set(removing)
    before = [entry for entry in props.headers or [] if entry[0] not in named]
    after = [entry for entry in edited.headers or [] if entry[0] not in named]
    # Untouched entries keep their order and their exact encoding.
    assert encode_table(after) == encode_table(before)
    for key, value in setting:
        assert [found for name, found in edited.headers or [] if name == key] == [value]
    assert not any(name in removing for name, _ in edited.headers or [])
    assert dataclasses.replace(edited, headers=None) == dataclasses.replace(props, headers=None)
    if not edits:
        assert edits.apply(raw) == raw


def test_a_set_header_takes_the_place_of_the_first_entry_of_its_name() -> None:
    table: Table = [(b"a", ("S", b"1")), (b"b", ("I", 2)), (b"a", ("S", b"dup")), (b"c", ("t", True))]
    edits = HeaderEdits(set=((b"a", ("l", 9)), (b"new", ("S", b"n"))), unset=(b"c",))
    assert edits.edit_table(table) == [(b"a", ("l", 9)), (b"b", ("I", 2)), (b"new", ("S", b"n"))]


def test_build_edits_reads_strings_typed_and_plain_json() -> None:
    edits = build_edits(
        ["tenant=acme=1"],
        [
            'attempt={"type": "int32", "value": 3}',
            "flags=[1, true, null]",
            'when={"type": "timestamp", "value": "2026-11-27T10:00:00Z"}',
        ],
        ["x-trace"],
    )
    assert edits.set == (
        (b"tenant", ("S", b"acme=1")),
        (b"attempt", ("I", 3)),
        (b"flags", ("A", [("l", 1), ("t", True), ("V", None)])),
        (b"when", ("T", 1_795_773_600)),
    )
    assert edits.unset == (b"x-trace",)
    assert not build_edits(None, None, None)


@pytest.mark.parametrize(
    ("setting", "typed", "removing", "fragment"),
    [
        (["novalue"], [], [], "--set-header: expected KEY=VALUE"),
        (["=v"], [], [], "--set-header: a header name"),
        (["x-replay-id=1"], [], [], "replay tag"),
        ([], ["n={bad"], [], "--set-header-json: n: not JSON"),
        ([], ['n={"type": "int8", "value": 300}'], [], "int8 takes a whole number"),
        ([], ['n={"type": "bytes", "value": "plain"}'], [], "base64"),
        ([], ['n={"type": "decimal", "value": "1e400"}'], [], "decimal"),
        (["a=1"], [], ["a"], "edited twice"),
        (["a=1", "a=2"], [], [], "edited twice"),
        ([], [], ["x" * 256], "--unset-header"),
    ],
)
def test_bad_edits_name_their_option(
    setting: list[str], typed: list[str], removing: list[str], fragment: str
) -> None:
    with pytest.raises(UsageError, match=fragment):
        build_edits(setting, typed, removing)


# ------------------------------------------------------------------ guards and the target URL


def _settings(**values: Any) -> Settings:
    return Settings(amqp_url="amqp://guest:guest@localhost:5672/prod", **values)


def test_expect_count_and_the_typed_back_threshold() -> None:
    check_expected_count(None, 5)
    check_expected_count(5, 5)
    with pytest.raises(UsageError, match="--expect-count 4: the selection holds 5 messages"):
        check_expected_count(4, 5)
    settings = _settings(replay_confirm_count_above=10)
    assert type_back(settings, 10) is None
    assert type_back(settings, 11) == 11


def test_resume_needs_the_target_url_it_started_with() -> None:
    url = "amqp://replayer:s3cret@staging:5672/stage"
    settings = _settings()
    stored = {"target_url": mask_url(url), "vhost": "stage"}
    assert operations._resume_url(settings, "r1", stored, url) == (url, "stage")
    assert operations._resume_url(_settings(replay_target_url=url), "r1", stored, None) == (url, "stage")
    with pytest.raises(UsageError, match="give that URL again") as missing:
        operations._resume_url(settings, "r1", stored, None)
    assert "s3cret" not in str(missing.value)
    with pytest.raises(UsageError, match="published to"):
        operations._resume_url(settings, "r1", stored, url.replace("stage", "other"))
    with pytest.raises(UsageError, match="--target-url must look like"):
        operations._resume_url(settings, "r1", stored, "http://staging")
    plain = {"vhost": "prod"}
    assert operations._resume_url(settings, "r2", plain, None) == (settings.amqp_url, "prod")
    with pytest.raises(UsageError, match="leave out --target-url"):
        operations._resume_url(settings, "r2", plain, url)


def test_the_vhost_of_a_target_url() -> None:
    assert url_vhost("amqp://u:p@h:5672/stage%2Fone") == "stage/one"
    assert url_vhost("amqp://u:p@h:5672") == "/"
    assert url_vhost("amqp://u:p@h1:5672,h2:5672/v") == "v"


def test_the_preview_says_every_change_on_the_way_with_its_type() -> None:
    from rabbit_archive.replay import rendering
    from rabbit_archive.replay.edits import build_edits

    edits = build_edits(["tenant=acme"], ['n={"type": "int32", "value": 70000}'], ["case"])
    lines = rendering.change_lines(edits, new_message_id=True, canary=5, canary_wait=30, yes=True)
    assert lines == [
        'sets header "tenant" to {"type": "longstr", "value": "acme"}',
        'sets header "n" to {"type": "int32", "value": 70000}',
        'removes header "case"',
        "gives each message a new message id (the old one in x-replay-of)",
        "publishes 5 messages first (canary), shows the target queue, "
        "then goes on only if they drained within 30 s",
    ]
    asking = rendering.change_lines(edits, new_message_id=False, canary=5, canary_wait=60, yes=False)
    assert asking[-1].endswith("then asks before the rest")
    assert (
        rendering.change_lines(
            build_edits(None, None, None), new_message_id=False, canary=None, canary_wait=60, yes=False
        )
        == []
    )
