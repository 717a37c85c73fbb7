"""The archive's memory of its own coverage: what it captured when, and what it lost.

The daemon appends a row to `rabbit_archive.coverage_events` whenever an exchange's state
changes (bound, skipped, refused, failed, unrepresentable, gone), when it starts with a source,
when a vhost cannot be captured or can again, and, summed every few seconds, when the archive
queue dropped messages for QUEUE_MAX_BYTES. `rabbit-replay coverage` turns those rows into
captured intervals and gaps; `rabbit-capture status` shows the current gaps with the broker's
rates. Writing is cheap (one statement every few seconds at most) and never stops capture: a
write that fails is kept (bounded) and tried again.
"""

import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg

from rabbit_archive.archive import queries
from rabbit_archive.archive.db import DATABASE_ERRORS
from rabbit_archive.archive.errors import describe
from rabbit_archive.capture.binding_plan import ExchangeState
from rabbit_archive.capture.binding_states import storable_text

log = logging.getLogger(__name__)

# Events kept in memory while the database is away, at most (the oldest are dropped first).
MAX_PENDING = 10_000
# Rates the broker reports for exchanges the archive does not capture, by reason.
_UNCAPTURED_STATES = frozenset({"skipped", "refused", "failed", "unrepresentable"})


@dataclass(frozen=True, slots=True)
class CoverageEvent:
    """One row of rabbit_archive.coverage_events (exchange None: about the whole vhost)."""

    vhost: str
    exchange: str | None
    event: str
    reason: str = ""
    messages: int | None = None
    # When it happened, not when it was written (rows are written in batches).
    at: datetime = field(default_factory=lambda: datetime.now(UTC))


def state_changes(
    vhost: str,
    before: Mapping[str, tuple[str, str]],
    states: Iterable[ExchangeState],
) -> tuple[list[CoverageEvent], dict[str, tuple[str, str]]]:
    """The events that turn the recorded states into this round's, and the new record.

    A reason change of a bound exchange (its mode) is not a coverage change; an exchange that
    is no longer listed is 'gone' (deleted: nothing can be published to it any more).
    """
    now = {state.exchange: (state.state, state.reason) for state in states}
    events = []
    for exchange, (state, reason) in sorted(now.items()):
        previous = before.get(exchange)
        if previous is None or previous[0] != state or (state != "bound" and previous[1] != reason):
            events.append(CoverageEvent(vhost, exchange, state, reason))
    for exchange in sorted(set(before) - set(now)):
        if before[exchange][0] != "gone":
            events.append(CoverageEvent(vhost, exchange, "gone"))
    now.update({exchange: ("gone", "") for exchange in before if exchange not in now})
    return events, now


def uncaptured_rates(
    exchanges: Iterable[Mapping[str, Any]], states: Iterable[ExchangeState]
) -> list[tuple[str, str, float]]:
    """(exchange, reason, messages per second published to it) for each exchange not captured.

    The rate is the broker's own `publish_in` rate (management statistics); the broker's
    internal exchanges (amq.rabbitmq.*) are not user traffic and are left out.
    """
    rates: dict[str, float] = {}
    for item in exchanges:
        name = item.get("name")
        stats = item.get("message_stats")
        if not isinstance(name, str) or not isinstance(stats, Mapping):
            continue
        details = stats.get("publish_in_details")
        rate = details.get("rate") if isinstance(details, Mapping) else None
        if isinstance(rate, int | float) and not isinstance(rate, bool):
            rates[name] = float(rate)
    return [
        (state.exchange, state.reason or state.state, rates.get(state.exchange, 0.0))
        for state in states
        if state.state in _UNCAPTURED_STATES and not state.exchange.startswith("amq.rabbitmq.")
    ]


class CoverageLog:
    """Collects coverage events and writes them in one statement per flush."""

    def __init__(self, pool: "asyncpg.Pool[asyncpg.Record] | None") -> None:
        self._pool = pool
        self._pending: list[CoverageEvent] = []
        self._dropped: Counter[tuple[str, str]] = Counter()
        self._states: dict[str, dict[str, tuple[str, str]]] = {}

    def note(self, event: CoverageEvent) -> None:
        """Record one event (written with the next flush)."""
        self._pending.append(event)
        del self._pending[:-MAX_PENDING]

    def dropped(self, vhost: str, exchange: str) -> None:
        """One message the archive queue dropped (summed per flush)."""
        self._dropped[(vhost, exchange)] += 1

    async def exchange_states(self, vhost: str, states: Iterable[ExchangeState]) -> None:
        """Note how this round's states differ from the last recorded ones."""
        if vhost not in self._states:
            self._states[vhost] = await self._recorded(vhost)
        events, self._states[vhost] = state_changes(vhost, self._states[vhost], states)
        for event in events:
            self.note(event)

    async def _recorded(self, vhost: str) -> dict[str, tuple[str, str]]:
        if self._pool is None:
            return {}
        try:
            rows = await self._pool.fetch(queries.LATEST_EXCHANGE_STATES, storable_text(vhost))
        except DATABASE_ERRORS as error:
            # Without the history every exchange is noted again: harmless repetition.
            log.info("coverage_history_unreadable", extra={"vhost": vhost, "error": describe(error)})
            return {}
        return {row["exchange"]: (row["event"], row["reason"]) for row in rows}

    async def flush(self) -> None:
        """Write what was noted; kept for the next flush if the database refuses."""
        events = self._pending + [
            CoverageEvent(vhost, exchange, "dropped", "QUEUE_MAX_BYTES reached", count)
            for (vhost, exchange), count in sorted(self._dropped.items())
        ]
        if not events or self._pool is None:
            return
        self._pending, self._dropped = [], Counter()
        try:
            await self._pool.execute(
                queries.RECORD_COVERAGE,
                [storable_text(event.vhost) for event in events],
                [None if event.exchange is None else storable_text(event.exchange) for event in events],
                [event.event for event in events],
                [storable_text(event.reason) for event in events],
                [event.messages for event in events],
                [event.at for event in events],
            )
        except DATABASE_ERRORS as error:
            log.info("coverage_not_recorded", extra={"events": len(events), "error": describe(error)})
            self._pending = (events + self._pending)[-MAX_PENDING:]
