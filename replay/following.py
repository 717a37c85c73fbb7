"""A follower (`rabbit-replay run --follow`): after its selection, the messages archived later.

Each round fixes a new bound with the selection watermark (replay/selection.py), so an id
is only ever read once every lower one is committed: a follower never passes a message that
commits late. It wakes on the daemon's notification of each committed batch
(archive/queries.py CAPTURED_CHANNEL) and looks again every FOLLOW_POLL seconds without one
(a daemon of an older version, a notification lost with a reconnect). Retention dropping
archive ids the follower had not reached yet is recorded with the follower and logged.
"""

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from rabbit_archive.archive import queries
from rabbit_archive.archive.db import Connection
from rabbit_archive.replay import history, selection
from rabbit_archive.replay.filters import Filters
from rabbit_archive.replay.selection import ArchivedMessage

log = logging.getLogger(__name__)

# Seconds between looks at the archive when no notification arrives.
FOLLOW_POLL = 1.0


class Following:
    """Where a follower stands beyond its fixed selection, and the wake-up it listens for."""

    def __init__(self, connection: Connection, replay_id: str, filters: Filters, cursor: int) -> None:
        self._connection = connection
        self._replay_id = replay_id
        self._filters = filters
        # Everything up to here was selected (the fixed selection, or an earlier round).
        self.after = max(cursor, filters.upto_id or 0)
        self._cursor = cursor
        self._wake = asyncio.Event()
        self.rounds = 0

    def _notified(self, *_: Any) -> None:
        self._wake.set()

    async def start(self) -> None:
        """Listen for committed batches; a resumed follower first checks what retention dropped."""
        await self._connection.add_listener(queries.CAPTURED_CHANNEL, self._notified)
        if self._cursor > 0:
            await self._check_gap(self._cursor)

    async def close(self) -> None:
        """Stop listening."""
        await self._connection.remove_listener(queries.CAPTURED_CHANNEL, self._notified)

    async def next_round(self, stop: asyncio.Event) -> AsyncIterator[tuple[int, ArchivedMessage]]:
        """The messages archived after the last round, once there are any (empty when stopped)."""
        while not stop.is_set():
            # Cleared before looking, so a batch committed meanwhile wakes the next wait at once.
            self._wake.clear()
            newest = await selection.watermark(self._connection)
            await self._check_gap(self.after)
            if newest > self.after:
                start, self.after = self.after, newest
                self.rounds += 1
                return self._messages(start, newest)
            await _first_of(stop, self._wake, FOLLOW_POLL)
        return _nothing()

    async def _messages(self, after: int, upto: int) -> AsyncIterator[tuple[int, ArchivedMessage]]:
        filters = replace(self._filters, upto_id=upto)
        async for message in selection.messages(self._connection, filters, after_id=after, views=False):
            yield message.id, message

    async def _check_gap(self, reached: int) -> None:
        oldest: int | None = await self._connection.fetchval(queries.OLDEST_ID)
        if oldest is None or oldest <= reached + 1:
            return
        first, last = reached + 1, oldest - 1
        log.error(
            "replay.follow_gap",
            extra={"replay_id": self._replay_id, "from_id": first, "until_id": last},
        )
        await history.record_follow_gap(self._connection, self._replay_id, first, last)
        self.after = max(self.after, last)


async def _first_of(stop: asyncio.Event, wake: asyncio.Event, seconds: float) -> None:
    """Wait until stop or wake is set, or the seconds pass."""
    waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(wake.wait())]
    try:
        await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiting in waits:
            waiting.cancel()


async def _nothing() -> AsyncIterator[tuple[int, ArchivedMessage]]:
    return
    yield  # an async generator that yields nothing
