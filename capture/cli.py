"""The `rabbit-capture` command: thin typer wrappers around one async function each."""

import json
import sys
from typing import Annotated, Any

import typer

from archive.command_line import CommandLine
from archive.db import create_pool
from archive.migrate import apply_migrations
from capture.daemon import run_daemon
from capture.status import collect_status
from capture.store import prune as prune_partitions
from config import parse_duration

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


@app.command()
def run() -> None:
    """Run the capture daemon until SIGTERM or SIGINT."""
    settings = settings_or_exit()
    run_async(lambda: run_daemon(settings))


@app.command()
def migrate() -> None:
    """Apply the database schema and exit."""
    settings = settings_or_exit()

    async def apply() -> list[int]:
        pool = await create_pool(settings.database_url, create_database=True, max_size=1)
        try:
            async with pool.acquire() as connection:
                return await apply_migrations(connection)
        finally:
            await pool.close()

    applied = run_async(apply)
    print(f"applied migrations {applied}" if applied else "schema is up to date")


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
) -> None:
    """Show bindings, skipped exchanges, queue depth, rows stored and the newest capture.

    Exits 1 when no daemon consumes an archive queue, so it can serve as a probe.
    """
    settings = settings_or_exit()
    report = run_async(lambda: collect_status(settings))
    if as_json:
        print(json.dumps(report))
    else:
        _print_status(report)
    if not report["capturing"]:
        # A probe: non-zero while no daemon consumes an archive queue.
        fail("capture is not running: no consumer on the archive queue (is rabbit-capture run up?)", 1)


def _binding_text(binding: dict[str, Any]) -> str:
    if binding["routing_key"]:
        return str(binding["routing_key"])
    return json.dumps(binding["arguments"]) if binding["arguments"] else '""'


def _print_status(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"archive queue {report['queue']!r}: bound exchanges")
    for column in ("vhost", "exchange", "type", "mode", "bindings"):
        table.add_column(column)
    for item in report["exchanges"]:
        keys = ", ".join(_binding_text(binding) for binding in item["bindings"])
        table.add_row(item["vhost"], item["exchange"], item["type"] or "?", item["mode"] or "?", keys)
    console.print(table)
    skipped = Table(title="left alone")
    for column in ("vhost", "exchange", "type", "reason"):
        skipped.add_column(column)
    for item in report["skipped"]:
        if item["exchange"] and not item["exchange"].startswith("amq.rabbitmq."):
            skipped.add_row(item["vhost"], item["exchange"], item["type"], item["reason"])
    console.print(skipped)
    recent = Table(title="stored in the last hour / day")
    for column in ("vhost", "exchange", "rows 1h", "bytes 1h", "rows 24h", "bytes 24h"):
        recent.add_column(column)
    for item in report["stored_by_exchange"]:
        recent.add_row(
            item["vhost"],
            item["exchange"],
            *(
                str(item[key])
                for key in ("rows_last_hour", "bytes_last_hour", "rows_last_day", "bytes_last_day")
            ),
        )
    console.print(recent)
    console.print(
        f"queue depth {report['queue_depth']}, consumers {report['consumers']}, "
        f"rows {report['rows']}, newest capture {report['newest_captured_at']}, "
        f"schema version {report['schema_version']}"
    )


@app.command()
def prune(
    older_than: Annotated[
        str, typer.Option("--older-than", help="Age like 30d or 12h; older days are dropped.")
    ],
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
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

    async def drop() -> int:
        pool = await create_pool(settings.database_url, max_size=1)
        try:
            return await prune_partitions(pool, age)
        finally:
            await pool.close()

    dropped = run_async(drop)
    print(f"dropped {dropped} daily partitions")


def main() -> None:
    """Entry point of `rabbit-capture`."""
    COMMAND_LINE.main(app)
