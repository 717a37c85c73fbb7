"""The `rabbit-capture` command: thin typer wrappers around one async function each."""

import json
import sys
from typing import TYPE_CHECKING, Annotated, Any

import typer

from rabbit_archive.archive.command_line import CommandLine
from rabbit_archive.archive.db import create_pool
from rabbit_archive.archive.migrate import apply_migrations
from rabbit_archive.capture.daemon import run_daemon
from rabbit_archive.capture.status import collect_status
from rabbit_archive.capture.store import prune as prune_partitions
from rabbit_archive.config import ConfigError, Settings, parse_duration

if TYPE_CHECKING:
    from rich.text import Text

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
    as_json: Annotated[bool, typer.Option("--json", metavar="", help="One JSON object.")] = False,
) -> None:
    """Show bindings, skipped exchanges, queue depth, rows stored and the newest capture.

    Exits 1 when no daemon consumes an archive queue, so it can serve as a probe.
    """
    settings = _management_settings()
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


def shown(text: object) -> "Text":
    """Broker-supplied text as it is, for a terminal: no console markup, control characters escaped.

    Exchange names, routing keys and reasons come from whoever declared them; an escape
    sequence, a carriage return or a bidi override in one must not repaint the terminal or
    disguise another name, so anything not printable appears as its Python escape (\\x1b,
    \\u202e). `status --json` keeps the exact names.
    """
    from rich.text import Text

    text = str(text)
    if not text.isprintable():
        text = "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)
    return Text(text)


def _exchange_name(name: str) -> "Text":
    return shown(name) if name else shown("(default)")


def _print_status(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    # No markup, emoji codes or highlighting: every cell is a Text of broker-supplied words.
    # In a pipe, lines as long as needed, so that a long name is never cut or folded.
    width = None if sys.stdout.isatty() else 100_000
    console = Console(width=width, markup=False, emoji=False, highlight=False)
    current = {(item["vhost"], item["exchange"]): item for item in report["exchanges"]}
    table = Table(title=shown(f"archive queue {report['queue']!r}: exchanges"))
    for column in ("vhost", "exchange", "type", "state", "mode", "bindings", "reason"):
        table.add_column(column, overflow="fold")
    rows = [dict(item) for item in report["exchange_states"]]
    planned = {(item["vhost"], item["exchange"]) for item in rows}
    # Bindings the daemon has not removed yet (the exchange left the plan since the last round).
    rows.extend(
        {**item, "type": item["type"] or "?", "state": "bound", "reason": "no longer planned: unbound soon"}
        for key, item in current.items()
        if key not in planned
    )
    for item in rows:
        bound = current.get((item["vhost"], item["exchange"]))
        keys = ", ".join(_binding_text(binding) for binding in bound["bindings"]) if bound else ""
        mode = (bound["mode"] if bound else None) or ""
        table.add_row(
            shown(item["vhost"]),
            _exchange_name(item["exchange"]),
            shown(item["type"]),
            shown(item["state"]),
            shown(mode),
            shown(keys),
            shown(item["reason"]),
        )
    console.print(table)
    recent = Table(title=shown("stored in the last hour / day"))
    for column in ("vhost", "exchange", "rows 1h", "bytes 1h", "rows 24h", "bytes 24h"):
        recent.add_column(column, overflow="fold")
    for item in report["stored_by_exchange"]:
        recent.add_row(
            shown(item["vhost"]),
            _exchange_name(item["exchange"]),
            *(
                shown(item[key])
                for key in ("rows_last_hour", "bytes_last_hour", "rows_last_day", "bytes_last_day")
            ),
        )
    console.print(recent)
    gaps = Table(title=shown("not captured"))
    for column in ("vhost", "exchange", "reason", "msg/s (broker)", "messages"):
        gaps.add_column(column, overflow="fold")
    for item in report.get("coverage", []):
        gaps.add_row(
            shown(item["vhost"]),
            _exchange_name(item["exchange"]) if item["exchange"] is not None else shown("(whole vhost)"),
            shown(item["reason"]),
            shown("" if item["rate"] is None else f"{item['rate']:.1f}"),
            shown("" if item["messages"] is None else item["messages"]),
        )
    if report.get("coverage"):
        console.print(gaps)
    else:
        console.print(shown("not captured: nothing (every exchange of the captured vhosts is bound)"))
    console.print(
        shown(
            f"queue depth {report['queue_depth']}, consumers {report['consumers']}, "
            f"rows {report['rows']}, newest capture {report['newest_captured_at']}, "
            f"schema version {report['schema_version']}"
        )
    )


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
