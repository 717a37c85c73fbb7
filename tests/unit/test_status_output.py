"""Unit tests for `rabbit-capture status` output: any exchange name is shown literally and safely,
and the daemon's recorded binding states are laid over the plan."""

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rabbit_archive.capture.binding_plan import BindingPlan, BoundExchange, Skipped
from rabbit_archive.capture.rendering import print_status, shown
from rabbit_archive.capture.status import exchange_states

# Names as a broker may hold them: any text, and bytes that are not UTF-8 (surrogate-escaped).
NAMES = st.text(max_size=40) | st.binary(max_size=40).map(lambda raw: raw.decode("utf-8", "surrogateescape"))

HOSTILE = [
    "orders[1]",
    "[link=https://evil.example]click[/link]",
    "[bold]x",
    ":smile:",
    "esc\x1b[31mred",
    "tab\there",
    "cr\rover",
    "bs\bx",
    "c1\x9b31m",
    "rtl\u202eexe.txt",
    "line\nbreak",
    "nul\x00x",
    "back\\slash",
    "é" * 127 + "x",
]
# What a person sees: printable characters as they are, everything else as its Python escape.
SEEN = {
    "esc\x1b[31mred": "esc\\x1b[31mred",
    "tab\there": "tab\\there",
    "cr\rover": "cr\\rover",
    "bs\bx": "bs\\x08x",
    "c1\x9b31m": "c1\\x9b31m",
    "rtl\u202eexe.txt": "rtl\\u202eexe.txt",
    "line\nbreak": "line\\nbreak",
    "nul\x00x": "nul\\x00x",
}


def report(names: list[str], queue: str = "rabbit-archive") -> dict[str, Any]:
    """A status report as collect_status builds it, every name bound and skipped and stored."""
    return {
        "queue": queue,
        "exchanges": [
            {
                "vhost": name,
                "exchange": name,
                "type": "topic",
                "mode": "all",
                "bindings": [{"routing_key": name or "#", "arguments": {}}],
            }
            for name in names
        ],
        "skipped": [],
        "exchange_states": [
            {"vhost": name, "exchange": name, "type": "topic", "state": state, "reason": name, "since": None}
            for name in names
            for state in ("bound", "refused")
        ],
        "stored_by_exchange": [
            {
                "vhost": name,
                "exchange": name,
                "rows_last_hour": 1,
                "bytes_last_hour": 2,
                "rows_last_day": 3,
                "bytes_last_day": 4,
            }
            for name in names
        ],
        "queue_depth": 0,
        "consumers": 1,
        "rows": 3,
        "newest_captured_at": None,
        "schema_version": 3,
    }


def printed(capsys: pytest.CaptureFixture[str], data: dict[str, Any]) -> str:
    print_status(data)
    return capsys.readouterr().out


def terminal_safe(text: str) -> bool:
    return all(ch == "\n" or ch.isprintable() for ch in text)


def test_hostile_names_are_shown_literally_or_escaped(capsys: pytest.CaptureFixture[str]) -> None:
    out = printed(capsys, report(HOSTILE, queue="[bold]q\x1b"))
    assert terminal_safe(out)
    for name in HOSTILE:
        assert SEEN.get(name, name) in out, name
    assert "archive queue '[bold]q\\x1b'" in out
    # Rich would have turned these into an emoji, a hyperlink or bold text.
    assert "\N{SMILING FACE WITH SMILING EYES}" not in out
    assert out.count("[link=https://evil.example]click[/link]") >= 4


@settings(max_examples=150, deadline=None)
@given(names=st.lists(NAMES, min_size=1, max_size=4))
def test_any_name_is_shown_whole_and_changes_nothing_on_the_terminal(names: list[str]) -> None:
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        print_status(report(names))
    out = buffer.getvalue()
    assert terminal_safe(out)
    for name in names:
        assert str(shown(name or "(default)")) in out


@given(name=NAMES)
def test_shown_is_printable_and_keeps_printable_names(name: str) -> None:
    text = str(shown(name))
    assert text.isprintable() or text == ""
    if name.isprintable():
        assert text == name


# --- the plan with the recorded states on top -----------------------------------------------

PLAN = BindingPlan(
    bound=(
        BoundExchange("audit", "fanout", "all", ()),
        BoundExchange("orders", "topic", "all", ()),
        BoundExchange("payments", "direct", "all", ()),
        BoundExchange("weird", "topic", "all", ()),
    ),
    skipped=(Skipped("", "direct", "default exchange"), Skipped("jobs", "x-random", "one queue only")),
)
SINCE = datetime(2031, 1, 2, 3, 4, 5, tzinfo=UTC)


def row(state: str, reason: str = "", type_: str = "topic") -> dict[str, Any]:
    return {"state": state, "reason": reason, "type": type_, "updated_at": SINCE}


def test_without_recorded_rows_the_plan_is_the_state() -> None:
    states = {item["exchange"]: item for item in exchange_states("/", PLAN, {})}
    assert {name: item["state"] for name, item in states.items()} == {
        "": "skipped",
        "audit": "bound",
        "jobs": "skipped",
        "orders": "bound",
        "payments": "bound",
        "weird": "bound",
    }
    assert states["jobs"]["reason"] == "one queue only"
    assert states["orders"] == {
        "vhost": "/",
        "exchange": "orders",
        "type": "topic",
        "state": "bound",
        "reason": "",
        "since": None,
    }
    json.dumps(list(states.values()))  # the JSON report holds them as they are


def test_recorded_failures_override_bound_and_nothing_else() -> None:
    recorded = {
        "orders": row("refused", "ACCESS_REFUSED - read access to exchange 'orders'"),
        "payments": row("failed", "NOT_FOUND"),
        "weird": row("unrepresentable", "routing key longer than 255 bytes"),
        "audit": row("skipped", "stale: recorded under another EXCLUDE"),
        "jobs": row("refused", "stale: the plan skips it now"),
        "gone": row("refused", "deleted since"),
    }
    states = {item["exchange"]: item for item in exchange_states("v", PLAN, recorded)}
    assert "gone" not in states
    assert (states["orders"]["state"], states["orders"]["reason"]) == (
        "refused",
        "ACCESS_REFUSED - read access to exchange 'orders'",
    )
    assert states["orders"]["since"] == SINCE.isoformat()
    assert states["payments"]["state"] == "failed"
    assert states["weird"]["state"] == "unrepresentable"
    assert (states["audit"]["state"], states["audit"]["since"]) == ("bound", None)
    assert (states["jobs"]["state"], states["jobs"]["reason"]) == ("skipped", "one queue only")
    assert [item["exchange"] for item in exchange_states("v", PLAN, recorded)] == sorted(states)
