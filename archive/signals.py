"""SIGTERM and SIGINT only set a stop event (or call one function); the loop does the rest."""

import asyncio
import logging
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextmanager
def on_signals(
    handle: Callable[[], None], signals: tuple[signal.Signals, ...] = STOP_SIGNALS, *, logged: bool = False
) -> Iterator[None]:
    """Call `handle` (in the event loop) on each of the signals while inside the block.

    With `logged`, each signal is also a `stopping` log line (the daemon's; a command on a
    terminal ends with its own one-line message instead).
    """
    loop = asyncio.get_running_loop()

    def received(signum: int) -> None:
        if logged:
            log.info("stopping", extra={"signal": signal.Signals(signum).name})
        handle()

    for signum in signals:
        loop.add_signal_handler(signum, received, signum)
    try:
        yield
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)


@contextmanager
def stop_on_signals(stop: asyncio.Event, *, logged: bool = False) -> Iterator[None]:
    """Set `stop` on SIGTERM or SIGINT while inside the block."""
    with on_signals(stop.set, logged=logged):
        yield
