"""Captured intervals and gaps from the coverage history (replay.coverage), without services."""

import itertools
from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from rabbit_archive.replay.coverage import Event, coverage

T0 = datetime(2026, 11, 28, 10, 0, tzinfo=UTC)


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def test_an_exchange_bound_before_the_window_is_complete() -> None:
    events = [Event(at(-60), "v", None, "source", "bindings"), Event(at(-59), "v", "orders", "bound", "all")]
    verdict = coverage(events, at(0), at(10))
    assert verdict.complete
    assert verdict.captured[("v", "orders")] == [(at(0), at(10))]


def test_an_exchange_declared_during_the_window_has_a_gap_until_its_binding() -> None:
    events = [Event(at(-60), "v", None, "source", "bindings"), Event(at(3), "v", "late", "bound", "all")]
    verdict = coverage(events, at(0), at(10), exchanges=["late"])
    assert not verdict.complete
    [gap] = verdict.gaps
    assert (gap.exchange, gap.start, gap.end) == ("late", at(0), at(3))
    assert verdict.captured[("v", "late")] == [(at(3), at(10))]


def test_refusal_and_recovery_make_one_gap_with_the_reason() -> None:
    events = [
        Event(at(-5), "v", "orders", "bound", "all"),
        Event(at(2), "v", "orders", "refused", "ACCESS_REFUSED - read access"),
        Event(at(6), "v", "orders", "bound", "all"),
    ]
    verdict = coverage(events, at(0), at(10))
    [gap] = verdict.gaps
    assert (gap.start, gap.end) == (at(2), at(6))
    assert "refused" in gap.reason
    assert gap.as_json()["messages"] is None


def test_drops_are_gaps_with_their_counts() -> None:
    events = [
        Event(at(-5), "v", "orders", "bound", "all"),
        Event(at(4), "v", "orders", "dropped", "QUEUE_MAX_BYTES reached", 17),
        Event(at(5), "v", "orders", "dropped", "QUEUE_MAX_BYTES reached", 3),
    ]
    verdict = coverage(events, at(0), at(10))
    assert [gap.messages for gap in verdict.gaps] == [17, 3]
    assert sum(gap.messages or 0 for gap in verdict.gaps) == 20


def test_default_exchange_under_bindings_and_under_firehose() -> None:
    skipped = [
        Event(at(-5), "v", None, "source", "bindings"),
        Event(at(-5), "v", "", "skipped", "default exchange"),
    ]
    assert coverage(skipped, at(0), at(10)).gaps[0].reason == "skipped: default exchange"
    firehose = [*skipped, Event(at(5), "v", None, "source", "firehose")]
    [gap] = coverage(firehose, at(0), at(10)).gaps
    assert (gap.start, gap.end) == (at(0), at(5))


def test_an_unavailable_vhost_is_a_gap_for_each_of_its_exchanges() -> None:
    events = [
        Event(at(-5), "v", "a", "bound", "all"),
        Event(at(-5), "v", "b", "bound", "all"),
        Event(at(1), "v", None, "unavailable", "no permissions"),
        Event(at(2), "v", None, "available"),
    ]
    verdict = coverage(events, at(0), at(10))
    assert [(gap.exchange, gap.start, gap.end) for gap in verdict.gaps] == [
        ("a", at(1), at(2)),
        ("b", at(1), at(2)),
    ]


@given(
    st.lists(
        st.tuples(st.floats(-30, 30), st.sampled_from(["bound", "refused", "skipped", "gone"])), max_size=12
    )
)
def test_captured_intervals_and_gaps_tile_the_window(changes: list[tuple[float, str]]) -> None:
    events = [Event(at(minute), "v", "x", state, "r") for minute, state in changes]
    events.append(Event(at(-100), "v", "x", "bound", "all"))
    verdict = coverage(events, at(0), at(20))
    pieces = sorted([*verdict.captured[("v", "x")], *((gap.start, gap.end) for gap in verdict.gaps)])
    assert pieces[0][0] == at(0)
    assert pieces[-1][1] == at(20)
    for (_, end), (start, _) in itertools.pairwise(pieces):
        assert end == start
