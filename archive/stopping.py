"""Waiting that a stop request cuts short, and how long to wait between attempts, for the loops of
the daemon and the replay."""

import asyncio
import random


async def sleep_unless(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep, returning early when stop is set; True when it was."""
    try:
        async with asyncio.timeout(seconds):
            await stop.wait()
    except TimeoutError:
        return False
    return True


class Backoff:
    """Exponential delays with jitter between reconnection attempts."""

    def __init__(self, first: float = 0.2, cap: float = 5.0) -> None:
        self._first = first
        self._cap = cap
        self._next = first

    def next(self) -> float:
        """The delay before the next attempt."""
        delay = self._next
        self._next = min(self._cap, self._next * 2)
        return delay * random.uniform(0.8, 1.2)

    def reset(self) -> None:
        """Start again from the shortest delay (after a success)."""
        self._next = self._first
