"""The `rabbit-capture` command: thin typer wrappers around one async function each."""

import json
import sys
from typing import Annotated

import typer

from rabbit_archive.archive.command_line import CommandLine, collect_garbage_in_bulk
from rabbit_archive.capture import operations, rendering
from rabbit_archive.capture.daemon import run_daemon
from rabbit_archive.config import ConfigError, Settings, parse_duration

app = typer.Typer(
    name="rabbit-capture",
    help="Record every message of a RabbitMQ broker in PostgreSQL.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

COMMAND_LINE = CommandLine("rabbit-capture")
fail = COMMAND_LINE.fail
settings_or_exit = COMMAND_LINE.settings
run_async = COMMAND_LINE.run_async


def _management_settings() -> Settings:
    """The settings of a command that calls the management API, or exit 2 when that would be unsafe."""
    settings = settings_or_exit()
    try:
        settings.check_management_transport()
    except ConfigError as error:
        fail(str(error), 2)
    return settings


@app.command()
def run() -> None:
    """Run the capture daemon until SIGTERM or SIGINT."""
    settings = _management_settings()
    collect_garbage_in_bulk()
    run_async(lambda: run_daemon(settings))


@app.command()
def migrate() -> None:
    """Apply the database schema and exit."""
    settings = settings_or_exit()

    applied = run_async(lambda: operations.migrate(settings))
    print(f"applied migrations {applied}" if applied else "schema is up to date")


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", metavar="", help="One JSON object.")] = False,
) -> None:
    """Show bindings, skipped exchanges, queue depth, rows stored and the newest capture.

    Exits 1 when no daemon consumes an archive queue, so it can serve as a probe.
    """
    settings = _management_settings()
    report = run_async(lambda: operations.status(settings))
    if as_json:
        print(json.dumps(report))
    else:
        rendering.print_status(report)
    if not report["capturing"]:
        # A probe: non-zero while no daemon consumes an archive queue.
        fail("capture is not running: no consumer on the archive queue (is rabbit-capture run up?)", 1)


@app.command()
def check(
    as_json: Annotated[bool, typer.Option("--json", metavar="", help="One JSON object.")] = False,
) -> None:
    """Check, changing nothing, that capture would work here; list every problem with its fix.

    Exits 0 when capture would work, 1 otherwise.
    """
    settings = settings_or_exit()
    report = run_async(lambda: operations.check(settings))
    if as_json:
        print(json.dumps(report.as_json()))
    else:
        rendering.print_check(report)
    if not report.ok:
        fail(f"{len(report.problems)} problem(s) found: fix them as listed and run the check again", 1)


@app.command()
def prune(
    older_than: Annotated[
        str, typer.Option("--older-than", metavar="TEXT", help="Age like 30d or 12h; older days are dropped.")
    ],
    yes: Annotated[bool, typer.Option("--yes", metavar="", help="Do not ask for confirmation.")] = False,
) -> None:
    """Drop archived messages older than the given age (whole days)."""
    try:
        age = parse_duration(older_than)
    except ValueError as error:
        fail(f"--older-than: {error}", 2)
    settings = settings_or_exit()
    if not yes:
        if not sys.stdin.isatty():
            fail("prune deletes data: pass --yes (no terminal to confirm on)", 2)
        if not typer.confirm(f"Drop archived messages older than {older_than}?"):
            fail("aborted", 1)

    dropped = run_async(lambda: operations.prune(settings, age))
    print(f"dropped {dropped} daily partitions")


def main() -> None:
    """Entry point of `rabbit-capture`."""
    COMMAND_LINE.main(app)
