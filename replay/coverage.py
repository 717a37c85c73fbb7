"""Is the archive complete for a slice? Captured intervals and gaps from the coverage history.

The capture daemon records in `rabbit_archive.coverage_events` every change of an exchange's
state, the source it ran with, vhosts it could not capture and messages the archive queue
dropped (capture/coverage.py). For a time window this module replays those rows in order:

* an exchange is captured while its state is `bound`, or while its vhost runs with
  `SOURCE=firehose` (every publish is traced);
* it is not captured before any state was recorded for it, while its state is anything else
  (`skipped`, `refused`, `failed`, `unrepresentable`), and while its vhost is `unavailable`;
  an exchange that is `gone` no longer exists and so can miss nothing;
* `dropped` rows are gaps of their own, with the number of messages lost.

Pure: the caller reads the rows (archive.queries.COVERAGE_EVENTS) and prints the verdict.
"""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

# A drop is summed by the daemon over this interval before it is written.
DROP_INTERVAL = timedelta(seconds=5)
_VHOST_EVENTS = frozenset({"source", "unavailable", "available"})


@dataclass(frozen=True, slots=True)
class Event:
    """One row of rabbit_archive.coverage_events."""

    at: datetime
    vhost: str
    exchange: str | None
    event: str
    reason: str = ""
    messages: int | None = None


@dataclass(frozen=True, slots=True)
class Gap:
    """A part of the window in which an exchange's messages are not (all) in the archive."""

    vhost: str
    exchange: str
    start: datetime
    end: datetime
    reason: str
    messages: int | None = None

    def as_json(self) -> dict[str, Any]:
        """The JSON form of `coverage --json`."""
        return {
            "vhost": self.vhost,
            "exchange": self.exchange,
            "from": self.start.isoformat(),
            "until": self.end.isoformat(),
            "reason": self.reason,
            "messages": self.messages,
        }


@dataclass(slots=True)
class Verdict:
    """Per exchange, the captured intervals of the window, and every gap."""

    start: datetime
    end: datetime
    captured: dict[tuple[str, str], list[tuple[datetime, datetime]]] = field(default_factory=dict)
    gaps: list[Gap] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """Whether the archive holds every message of the window for these exchanges."""
        return not self.gaps


@dataclass(slots=True)
class _Timeline:
    state: str | None = None
    reason: str = ""


def coverage(
    events: Iterable[Event],
    start: datetime,
    end: datetime,
    *,
    exchanges: Sequence[str] = (),
    vhosts: Sequence[str] = (),
) -> Verdict:
    """The verdict for [start, end): for the named exchanges (all recorded ones when none)."""
    ordered = sorted(events, key=lambda event: event.at)
    verdict = Verdict(start, end)
    known = {
        (event.vhost, event.exchange)
        for event in ordered
        if event.exchange is not None and (not vhosts or event.vhost in vhosts)
    }
    all_vhosts = {event.vhost for event in ordered if not vhosts or event.vhost in vhosts}
    wanted = sorted(
        {(vhost, name) for vhost, name in known if not exchanges or name in exchanges}
        | {(vhost, name) for vhost in all_vhosts for name in exchanges}
    )
    for vhost, exchange in wanted:
        _one(verdict, vhost, exchange, [e for e in ordered if e.vhost == vhost])
    verdict.gaps.sort(key=lambda gap: (gap.vhost, gap.exchange, gap.start))
    return verdict


def _one(verdict: Verdict, vhost: str, exchange: str, events: list[Event]) -> None:
    timeline = _Timeline()
    source = ""
    available = True
    unavailable_reason = ""
    cursor = verdict.start
    captured: list[tuple[datetime, datetime]] = []

    def status() -> tuple[bool, str]:
        if not available:
            return False, f"vhost not captured: {unavailable_reason}"
        if source == "firehose":
            return True, ""
        if timeline.state is None:
            return False, "no capture recorded for this exchange"
        if timeline.state in ("bound", "gone"):
            return True, ""
        return False, f"{timeline.state}: {timeline.reason}" if timeline.reason else timeline.state

    def close(until: datetime) -> None:
        nonlocal cursor
        until = min(until, verdict.end)
        if until <= cursor:
            return
        ok, reason = status()
        if ok:
            if captured and captured[-1][1] == cursor:
                captured[-1] = (captured[-1][0], until)
            else:
                captured.append((cursor, until))
        else:
            gaps = verdict.gaps
            previous = gaps[-1] if gaps else None
            if previous is not None and (
                previous.vhost,
                previous.exchange,
                previous.end,
                previous.reason,
            ) == (
                vhost,
                exchange,
                cursor,
                reason,
            ):
                gaps[-1] = Gap(vhost, exchange, previous.start, until, reason)
            else:
                gaps.append(Gap(vhost, exchange, cursor, until, reason))
        cursor = until

    for event in events:
        if event.at >= verdict.end:
            break
        if event.exchange is not None and event.exchange != exchange:
            continue
        if event.at > cursor:
            close(event.at)
        if event.event == "dropped":
            if event.at >= verdict.start:
                verdict.gaps.append(
                    Gap(
                        vhost,
                        exchange,
                        max(verdict.start, event.at - DROP_INTERVAL),
                        event.at,
                        f"dropped: {event.reason}" if event.reason else "dropped",
                        event.messages,
                    )
                )
        elif event.exchange is None and event.event in _VHOST_EVENTS:
            if event.event == "source":
                source = event.reason
            else:
                available = event.event == "available"
                unavailable_reason = event.reason
        elif event.exchange is not None:
            timeline.state, timeline.reason = event.event, event.reason
    close(verdict.end)
    verdict.captured[(vhost, exchange)] = captured
