"""Waiting that a stop request cuts short, for the loops of the daemon and the replay."""

import asyncio


async def sleep_unless(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep, returning early when stop is set; True when it was."""
    try:
        async with asyncio.timeout(seconds):
            await stop.wait()
    except TimeoutError:
        return False
    return True
