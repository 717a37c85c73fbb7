"""SIGTERM and SIGINT only set the stop event; the daemon does the rest."""

import asyncio
import logging
import signal
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger("rabbit_archive.capture")


@contextmanager
def stop_on_signals(stop: asyncio.Event) -> Iterator[None]:
    """Set `stop` on SIGTERM or SIGINT while inside the block."""
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)

    def handle(signum: int) -> None:
        log.info("stopping", extra={"signal": signal.Signals(signum).name})
        stop.set()

    for signum in signals:
        loop.add_signal_handler(signum, handle, signum)
    try:
        yield
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)
