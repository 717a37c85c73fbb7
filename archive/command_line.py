"""What both commands do at the edge: one-line errors with exit codes, settings, running one coroutine."""

import asyncio
import gc
import sys
from collections.abc import Awaitable, Callable
from typing import NoReturn, TypeVar

import typer

from rabbit_archive.archive.errors import ArchiveError
from rabbit_archive.archive.logs import setup_logging
from rabbit_archive.config import ConfigError, Settings, load_settings

T = TypeVar("T")

# Container objects allocated, less those freed, between two passes of the cyclic garbage
# collector over its youngest generation (Python's default is 700), for a daemon moving messages
# in bulk: see collect_garbage_in_bulk.
BULK_COLLECTOR_THRESHOLD = 20_000


def collect_garbage_in_bulk() -> None:
    """Tune the cyclic garbage collector for a process that moves messages in bulk, once started.

    Each message keeps a few container objects alive until its batch is written (the delivery,
    what was prepared of it): at Python's default threshold the collector passed every couple of
    hundred messages and looked at each of them, and its full passes at the ~56,000 objects of
    the loaded modules besides, 50 ms each. Measured with gc.callbacks in a 100,000-message drain:
    0.2-0.3 s of the daemon's 2.5-3 s of CPU. The objects that exist now (modules, settings) live
    as long as the process: they are frozen, never looked at again. The youngest generation is
    collected every BULK_COLLECTOR_THRESHOLD allocations: most of a batch's objects are freed
    before a pass sees them. Garbage in reference cycles waits longer for a pass, that many
    objects at most.
    """
    gc.freeze()
    gc.set_threshold(BULK_COLLECTOR_THRESHOLD, 10, 10)


class CommandLine:
    """The error conventions of one console script (`rabbit-capture` or `rabbit-replay`)."""

    def __init__(self, prog: str) -> None:
        self.prog = prog

    def fail(self, message: str, code: int) -> NoReturn:
        """Print one line to stderr and exit with the code."""
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise typer.Exit(code)

    def settings(self) -> Settings:
        """Load the settings, or exit 2 naming the bad variable."""
        try:
            settings = load_settings()
        except ConfigError as error:
            self.fail(str(error), 2)
        setup_logging(settings.log_level, settings.log_format)
        return settings

    def run_async(self, factory: Callable[[], Awaitable[T]]) -> T:
        """Run one coroutine; known errors become one line and their exit code."""

        async def main() -> T:
            return await factory()

        try:
            return asyncio.run(main())
        except ArchiveError as error:
            self.fail(str(error), error.exit_code)
        except KeyboardInterrupt:
            self.fail("interrupted", 130)

    def main(self, app: typer.Typer) -> None:
        """Run the app; usage errors (a missing option, a bad number) become one line and exit 2."""
        # typer bundles click as typer._click (pinned in constraints.txt); its usage errors
        # are otherwise printed as a box of several lines.
        from typer._click.exceptions import UsageError as ClickUsageError

        if len(sys.argv) <= 1:
            app()  # no_args_is_help: print the help
            return
        try:
            code = app(standalone_mode=False)
        except ClickUsageError as error:
            print(f"{self.prog}: error: {error.format_message()}", file=sys.stderr)
            sys.exit(2)
        except typer.Abort:
            print(f"{self.prog}: error: aborted", file=sys.stderr)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)
