"""How `rabbit-replay` shows things to people: tables, message dumps, the preview, progress, summaries.

Everything archived came from a producer: every value printed here goes through `printable`,
so an escape sequence in a header or a name cannot repaint the terminal.
"""

import json
import sys
from typing import Any

from rabbit_archive.archive.amqp_codec import (
    CodecError,
    decode_properties,
    text_view,
    typed_entries,
)
from rabbit_archive.replay import operations
from rabbit_archive.replay.edits import HeaderEdits
from rabbit_archive.replay.history import ReplayRecord, Target
from rabbit_archive.replay.operations import Outcome, Preview
from rabbit_archive.replay.runner import Counts, Progress
from rabbit_archive.replay.selection import ArchivedMessage


def console() -> Any:
    """A rich console for tables: the terminal's width, or lines as long as needed in a pipe."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=100_000)


def printable(text: str) -> str:
    """Text safe for a terminal: control characters (escape sequences from a producer) escaped."""
    if text.isprintable():
        return text
    return "".join(
        ch if ch.isprintable() or ch == " " else ch.encode("unicode_escape").decode() for ch in text
    )


def print_messages(found: list[ArchivedMessage], cut: bool) -> None:
    """The `find` table."""
    from rich.table import Table
    from rich.text import Text

    table = Table()
    for column in ("id", "captured at", "vhost", "exchange", "routing key", "message id", "bytes", "note"):
        table.add_column(column, overflow="fold")
    for message in found:
        notes = [word for word, flag in (("redelivered", message.redelivered),) if flag]
        if message.replay_id:
            notes.append(f"replay {message.replay_id[:8]}")
        table.add_row(
            *(
                Text(printable(str(cell)))
                for cell in (
                    message.id,
                    f"{message.captured_at:%Y-%m-%d %H:%M:%S.%f}"[:-3],
                    message.vhost,
                    message.exchange or "(default)",
                    message.routing_key,
                    message.properties.get("message_id", ""),
                    message.body_size,
                    ", ".join(notes),
                )
            )
        )
    out = console()
    out.print(table)
    more = " (more match: raise --limit, or use --count)" if cut else ""
    out.print(Text(f"{len(found)} messages shown{more}"))


def coverage_json(verdict: Any) -> dict[str, Any]:
    """The `coverage --json` object: complete, the window, gaps and captured intervals."""
    return {
        "complete": verdict.complete,
        "from": verdict.start.isoformat(),
        "until": verdict.end.isoformat(),
        "gaps": [gap.as_json() for gap in verdict.gaps],
        "captured": [
            {
                "vhost": vhost,
                "exchange": name,
                "intervals": [[start.isoformat(), end.isoformat()] for start, end in intervals],
            }
            for (vhost, name), intervals in sorted(verdict.captured.items())
        ],
    }


def coverage_lines(verdict: Any) -> list[str]:
    """The verdict for people: one line overall, then one per gap."""
    window = f"{verdict.start:%Y-%m-%d %H:%M:%S} .. {verdict.end:%Y-%m-%d %H:%M:%S} UTC"
    if verdict.complete:
        return [f"coverage: complete for {len(verdict.captured)} exchange(s), {window}"]
    lines = [f"coverage: INCOMPLETE, {len(verdict.gaps)} gap(s) in {window}:"]
    for gap in verdict.gaps:
        counted = f", {gap.messages} messages" if gap.messages is not None else ""
        lines.append(
            f"  {gap.vhost} {gap.exchange or '(default)'}: {gap.start:%H:%M:%S}..{gap.end:%H:%M:%S}"
            f" {gap.reason}{counted}"
        )
    return lines


def typed_lines(entries: list[dict[str, Any]], indent: str) -> list[str]:
    """Typed header entries, nested tables and arrays indented."""
    lines = []
    for entry in entries:
        value = entry["value"]
        if entry["type"] == "table":
            lines.append(f"{indent}{printable(entry['key'])} (table):")
            lines.extend(typed_lines(value, indent + "  "))
        elif entry["type"] == "array":
            lines.append(f"{indent}{printable(entry['key'])} (array):")
            items = [{"key": f"[{i}]", **item} for i, item in enumerate(value)]
            lines.extend(typed_lines(items, indent + "  "))
        else:
            lines.append(
                f"{indent}{printable(entry['key'])} ({entry['type']}): {printable(json.dumps(value))}"
            )
    return lines


def body_text(body: bytes, limit: int = 65536) -> list[str]:
    """The body for people: pretty JSON, text, or a hex dump of binary data."""
    try:
        text = body.decode()
    except UnicodeDecodeError:
        text = None
    if text is not None:
        try:
            return printable(json.dumps(json.loads(text), indent=2, ensure_ascii=False)).split("\\n")
        except ValueError:
            if all(ch.isprintable() or ch in "\n\t" for ch in text):
                shown = text[:limit].splitlines() or [""]
                return shown + ([f"... ({len(body) - limit} more bytes)"] if len(text) > limit else [])
    lines = []
    for offset in range(0, min(len(body), limit), 16):
        chunk = body[offset : offset + 16]
        ascii_view = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        lines.append(f"{offset:08x}  {chunk.hex(' '):<47}  {ascii_view}")
    if len(body) > limit:
        lines.append(f"... ({len(body) - limit} more bytes; 'show --json' has all of it in base64)")
    return lines


def describe_message(message: ArchivedMessage) -> list[str]:
    """Lines of `show` for people."""
    lines = [
        f"id:            {message.id}",
        f"captured at:   {message.captured_at.isoformat()}",
        f"vhost:         {printable(message.vhost)}",
        f"exchange:      {printable(message.exchange) or '(default)'}",
        f"routing key:   {printable(message.routing_key)}",
        f"redelivered:   {str(message.redelivered).lower()}",
    ]
    if message.replay_id:
        lines.append(f"replay of:     replay {message.replay_id}")
    lines.append("properties:")
    lines.extend(f"  {name}: {printable(json.dumps(value))}" for name, value in message.properties.items())
    try:
        table = decode_properties(message.properties_raw).headers
    except CodecError as error:
        lines.append(f"headers: undecodable ({error}); 'show --json' has the raw bytes")
    else:
        lines.append("headers:" if table else "headers: none")
        lines.extend(typed_lines(typed_entries(table or []), "  "))
    lines.append(f"body ({message.body_size} bytes):")
    lines.extend("  " + line for line in body_text(message.body))
    return lines


class TerminalProgress(Progress):
    """A rich progress bar with rate and ETA on a terminal (stderr)."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TaskProgressColumn,
            TextColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as RichProgress

        self._progress = RichProgress(
            TextColumn("replay"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self._task: Any = None
        self._start_done = 0
        self._started_at = 0.0

    def start(self, total: int, done: int) -> None:
        import time

        self._start_done = done
        self._started_at = time.monotonic()
        self._progress.start()
        self._task = self._progress.add_task("replay", total=total, completed=done, rate="")

    def advance(self, published: int) -> None:
        import time

        elapsed = time.monotonic() - self._started_at
        sent = published - self._start_done if published > self._start_done else published
        rate = f"{sent / elapsed:,.0f} msg/s" if elapsed > 0.5 else ""
        self._progress.update(self._task, completed=min(self._start_done + sent, 10**18), rate=rate)

    def stop(self) -> None:
        self._progress.stop()


def change_lines(
    edits: HeaderEdits, *, new_message_id: bool, canary: int | None, canary_wait: float, yes: bool
) -> list[str]:
    """What a replay changes on the way and how it starts, a line each (none when nothing)."""
    lines = []
    for entry in typed_entries(list(edits.set)):
        # As `show --json` writes a header, so that the type the operator asked for is visible.
        key = entry.pop("key")
        lines.append(
            f"sets header {json.dumps(key, ensure_ascii=False)} to {json.dumps(entry, ensure_ascii=False)}"
        )
    lines += [f"removes header {json.dumps(text_view(key), ensure_ascii=False)}" for key in edits.unset]
    if new_message_id:
        lines.append("gives each message a new message id (the old one in x-replay-of)")
    if canary is not None:
        then = f"goes on only if they drained within {canary_wait:g} s" if yes else "asks before the rest"
        lines.append(f"publishes {canary} messages first (canary), shows the target queue, then {then}")
    return lines


def print_preview(
    preview: Preview, target: Target, dry_run: bool, changes: "list[str] | None" = None
) -> None:
    """What a replay is about to do (everything for --dry-run; count and coverage before a real one)."""
    where = f"{target.describe()} in vhost {preview.vhost!r}"
    size = f" ({preview.bytes} bytes)" if preview.groups else ""
    if preview.selected == 0:
        print("no archived message matches: nothing to replay", file=sys.stderr)
        return
    verb = "would replay" if dry_run else "replaying"
    out = sys.stdout if dry_run else sys.stderr
    print(f"{verb} {preview.selected} messages{size} to {where}", file=out)
    if preview.coverage is not None:
        for line in coverage_lines(preview.coverage):
            print(printable(line), file=out)
    elif preview.groups and not preview.from_file:
        print(f"coverage: not known: {operations.NO_HISTORY}", file=out)
    for line in changes or ():
        print(printable(f"it {line}"), file=out)
    if not dry_run:
        return
    print("by vhost, exchange and routing key:")
    for group in preview.groups[:20]:
        print(
            f"  {group.messages:>8}  {group.bytes:>12} bytes  {printable(group.vhost)}  "
            f"{printable(group.exchange) or '(default)'}  {printable(group.routing_key)}"
        )
    if len(preview.groups) > 20:
        print(f"  ... and {len(preview.groups) - 20} more groups")
    if preview.samples:
        print("samples:")
    for message in preview.samples:
        print(
            f"  id {message.id}  {message.captured_at.isoformat()}  "
            f"{printable(message.exchange) or '(default)'}  {printable(message.routing_key)}  "
            f"{message.body_size} bytes"
        )
    print("dry run: nothing was published")


def print_history(records: list[ReplayRecord], lags: "dict[str, operations.FollowerLag]") -> None:
    """The `history` table (a follower's target says how far behind it is)."""
    from rich.table import Table
    from rich.text import Text

    table = Table()
    table.add_column("replay id", no_wrap=True, min_width=36)
    for column in (
        "status",
        "started",
        "operator",
        "target",
        "selected",
        "confirmed",
        "returned",
        "nacked",
        "skipped",
    ):
        table.add_column(column, no_wrap=True)
    table.add_column("filters / reason", overflow="fold")
    for record in records:
        filters = json.dumps(record.filters, ensure_ascii=False)
        detail = filters + (f" / {record.reason}" if record.reason else "")
        table.add_row(
            *(
                Text(printable(str(cell)))
                for cell in (
                    record.id,
                    record.status,
                    f"{record.started_at:%Y-%m-%d %H:%M:%S}",
                    record.operator,
                    Target.from_json(record.target).describe() + _lag_note(lags.get(record.id)),
                    record.selected,
                    record.confirmed,
                    record.returned,
                    record.nacked,
                    record.skipped,
                    detail,
                )
            )
        )
    console().print(table)


def _lag_note(lag: "operations.FollowerLag | None") -> str:
    if lag is None:
        return ""
    gaps = f", {len(lag.gaps)} retention gap(s)" if lag.gaps else ""
    return f" (follower {lag.name}: {lag.lag_rows} behind, {lag.lag_seconds:.1f} s{gaps})"


def print_followers(lags: "list[operations.FollowerLag]") -> None:
    """The `followers` table."""
    from rich.table import Table
    from rich.text import Text

    table = Table()
    for column in ("name", "replay id", "status", "lag rows", "lag seconds", "retention gaps"):
        table.add_column(column, overflow="fold")
    for lag in lags:
        gaps = ", ".join(f"{gap['from']}..{gap['until']}" for gap in lag.gaps)
        table.add_row(
            *(
                Text(printable(str(cell)))
                for cell in (
                    lag.name,
                    lag.replay_id,
                    lag.status,
                    lag.lag_rows,
                    f"{lag.lag_seconds:.1f}",
                    gaps,
                )
            )
        )
    console().print(table)


def summary_line(outcome: Outcome) -> str:
    """The line a replay ends with."""
    counts = outcome.counts
    return (
        f"selected {outcome.selected}, published {counts.published}, confirmed {counts.confirmed}, "
        f"returned {counts.returned}, nacked {counts.nacked}, skipped {counts.skipped}"
        + (f" ({counts.without_death} without x-death)" if counts.without_death else "")
    )


def problems(counts: Counts) -> list[str]:
    """Why a replay did not deliver everything, one phrase per kind (empty: it did)."""
    found = []
    if counts.returned:
        found.append(f"{counts.returned} returned as unroutable")
    if counts.nacked:
        found.append(f"{counts.nacked} refused by the broker (nack)")
    if counts.skipped > counts.without_death:
        found.append(f"{counts.skipped - counts.without_death} could not be republished (see the log)")
    return found
