"""How `rabbit-capture status` shows its report to people: tables of broker-supplied names, made safe."""

import json
import sys
from typing import TYPE_CHECKING, Any

from rabbit_archive.archive.checks import report_lines

if TYPE_CHECKING:
    from rich.text import Text

    from rabbit_archive.archive.checks import Report


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


def print_status(report: dict[str, Any]) -> None:
    """The `status` tables: exchanges, what was stored lately, what is not captured, the totals."""
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


def print_check(report: "Report") -> None:
    """The `check` list: one line per finding, its fix under it, and a verdict."""
    for line in report_lines(report, "capture"):
        print(line)
