"""What the web console shows, as plain data: the query string as Filters and back, the
`rabbit-replay run` line to copy, a message body for reading, and the traffic chart's buckets.

Pure logic, no database and no HTTP: the console's handlers (app.py) read rows and hand them
here. Every archived value stays a Python string; the templates escape it, the chart's script
sets it as text.
"""

import json
import math
import shlex
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

from rabbit_archive.archive.errors import UsageError
from rabbit_archive.replay.cli import _FILTER_OPTIONS
from rabbit_archive.replay.filters import Filters, build_filters
from rabbit_archive.replay.rendering import body_text, printable
from rabbit_archive.replay.selection import ArchivedMessage

# The query string's filter names are `find`'s options with underscores (exchange, routing_key,
# since, ..., include_replays), and each reads as build_filters reads that option: a list is
# repeatable, an int an archive id, a bool a flag. A filter added to `find` is in the console too.
FILTER_NAMES: tuple[str, ...] = tuple(_FILTER_OPTIONS)
_TYPES = {
    name: str(typing.get_type_hints(build_filters)[argument]) for name, argument in _FILTER_OPTIONS.items()
}
REPEATABLE = frozenset(name for name, kind in _TYPES.items() if "list" in kind)
FLAGS = frozenset(name for name, kind in _TYPES.items() if "bool" in kind)
_NUMBERS = frozenset(name for name, kind in _TYPES.items() if "int" in kind)
_FALSE = frozenset({"", "0", "false", "off", "no"})

# The target options of the preview's command line (not filters: they do not change the selection).
TARGET_NAMES = ("to_exchange", "to_queue", "rate", "reason", "new_message_id")

Pairs = Sequence[tuple[str, str]]


def _values(pairs: Pairs, name: str) -> list[str]:
    # An empty form field means "no filter" (a search form submits every field).
    return [value for key, value in pairs if key == name and value != ""]


def _whole_number(name: str, text: str) -> int:
    try:
        number = int(text.strip())
    except ValueError:
        raise UsageError(f"{name}: {text!r} is not an archive id (a whole number)") from None
    if not 0 <= number < 2**63:
        raise UsageError(f"{name}: {text!r} is not an archive id (0 to 2^63-1)")
    return number


def filters_from_query(pairs: Pairs, now: datetime) -> Filters:
    """The Filters of a query string (find's names), or a UsageError naming the bad value."""
    arguments: dict[str, Any] = {}
    for name, argument in _FILTER_OPTIONS.items():
        given = _values(pairs, name)
        if name in REPEATABLE:
            arguments[argument] = given
        elif name in FLAGS:
            arguments[argument] = flag(given)
        elif given and name in _NUMBERS:
            arguments[argument] = _whole_number(name, given[-1])
        elif given:
            arguments[argument] = given[-1]
    return build_filters(**arguments, now=now)


def flag(given: list[str]) -> bool:
    """A checkbox: on unless absent or 0/false/off/no."""
    return bool(given) and given[-1].strip().lower() not in _FALSE


def optional_number(pairs: Pairs, name: str) -> int | None:
    """A paging parameter (after, upto): None when absent, UsageError when not a whole number."""
    given = _values(pairs, name)
    return _whole_number(name, given[-1]) if given else None


def iso(moment: datetime) -> str:
    """A time as the filters read it back: ISO 8601 in UTC."""
    return moment.astimezone(UTC).isoformat()


def shown_time(moment: datetime) -> str:
    """A time for people: UTC to the millisecond."""
    return f"{moment.astimezone(UTC):%Y-%m-%d %H:%M:%S.%f}"[:-3]


def _text(value: object) -> str:
    """A Filters value as the option's text: times in ISO 8601, KEY=VALUE pairs, dotted paths."""
    if isinstance(value, datetime):
        return iso(value)
    if isinstance(value, tuple):
        key, rest = value
        return f"{'.'.join(key) if isinstance(key, tuple) else key}={rest}"
    return str(value)


def filter_pairs(filters: Filters) -> list[tuple[str, str]]:
    """The query-string pairs (find's names) that select what the filters select."""
    pairs: list[tuple[str, str]] = []
    for name, argument in _FILTER_OPTIONS.items():
        # build_filters' arguments are the Filters fields of the same names.
        value = getattr(filters, argument)
        if name in FLAGS:
            pairs += [(name, "1")] if value else []
        elif name in REPEATABLE:
            pairs += [(name, _text(item)) for item in value]
        elif value is not None:
            pairs.append((name, _text(value)))
    return pairs


def query_string(pairs: Iterable[tuple[str, str]]) -> str:
    """Pairs as a query string; values that are not UTF-8 text (bytes given to the CLI) are left out."""
    kept = []
    for key, value in pairs:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            continue
        kept.append((key, value))
    return urlencode(kept)


@dataclass(frozen=True)
class CommandTarget:
    """The preview's target options: where the copied command would publish, and how."""

    to_exchange: str = ""
    to_queue: str = ""
    rate: str = ""
    reason: str = ""
    new_message_id: bool = False

    @classmethod
    def from_query(cls, pairs: Pairs) -> "CommandTarget":
        """The target fields of the preview form; UsageError for a rate that is not a number."""

        def last(name: str) -> str:
            given = _values(pairs, name)
            return given[-1] if given else ""

        target = cls(
            to_exchange=last("to_exchange"),
            to_queue=last("to_queue"),
            rate=last("rate").strip(),
            reason=last("reason"),
            new_message_id=last("new_message_id").strip().lower() not in _FALSE,
        )
        if target.to_exchange and target.to_queue:
            raise UsageError("give to_exchange or to_queue, not both")
        if target.rate:
            try:
                rate = float(target.rate)
            except ValueError:
                raise UsageError(f"rate: {target.rate!r} is not a number of messages per second") from None
            if not (math.isfinite(rate) and rate > 0):
                raise UsageError(f"rate: {target.rate!r} must be above 0 messages per second")
        return target


def _option(name: str, value: str | None) -> list[str]:
    option = "--" + name.replace("_", "-")
    if value is None:
        return [option]
    # `--exchange=-x`: a value that starts with a dash must not read as an option.
    return [f"{option}={value}"] if value.startswith("-") else [option, value]


def run_command(filters: Filters, newest_id: int, target: CommandTarget) -> str:
    """The exact `rabbit-replay run` line for the previewed selection.

    Relative times are already resolved in the filters, and --to-id fixes the newest archive id
    the preview counted: the line replays the messages previewed, not those archived since.
    """
    fixed = replace(filters, to_id=newest_id if filters.to_id is None else min(filters.to_id, newest_id))
    words = ["rabbit-replay", "run"]
    for name, value in filter_pairs(fixed):
        words += _option(name, None if name in FLAGS else value)
    for name, value in (("to_exchange", target.to_exchange), ("to_queue", target.to_queue)):
        if value:
            words += _option(name, value)
    if target.rate:
        words += _option("rate", target.rate)
    if target.reason:
        words += _option("reason", target.reason)
    if target.new_message_id:
        words += _option("new_message_id", None)
    return shlex.join(words)


# --- a message for reading --------------------------------------------------------------

PREVIEW_BYTES = 64 * 1024
# "show all" shows this much at most (a hex dump of it is a page of 20 MB); the download link
# gives the rest.
FULL_BYTES = 4 * 1024 * 1024
# JSON is pretty-printed only when the whole body is at hand and no larger than this.
JSON_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Body:
    """A body as shown: its kind, the lines shown, and whether it was cut."""

    kind: str  # "json", "text", "binary" or "empty"
    lines: list[str]
    size: int
    cut: bool
    limit: int


def body_limit(full: bool) -> int:
    """How many bytes of a body a message page reads and shows."""
    return FULL_BYTES if full else PREVIEW_BYTES


def body_view(body: bytes, size: int | None = None, *, full: bool = False) -> Body:
    """Pretty JSON, text, or a hex dump of (the start of) a body of `size` bytes.

    At most body_limit(full) bytes are shown; `body` may be just that much of a larger body.
    """
    size = len(body) if size is None else size
    limit = body_limit(full)
    shown = body[:limit]
    cut = size > len(shown)
    if not size:
        return Body("empty", [], 0, False, limit)
    text: str | None
    try:
        text = shown.decode("utf-8")
    except UnicodeDecodeError:
        # A cut may split a character: the bytes before it decide whether this is text.
        text = shown.decode("utf-8", "ignore") if cut and _cut_character(shown) else None
    if text is None:
        # body_text dumps bytes that are not UTF-8 as hex; its own limit is the slice's length.
        return Body("binary", body_text(shown, len(shown)), size, cut, limit)
    kind = "text"
    if not cut and size <= JSON_BYTES:
        try:
            text = json.dumps(json.loads(text), indent=2, ensure_ascii=False)
            kind = "json"
        except (ValueError, RecursionError):
            pass
    # printable: control characters (escape sequences, direction overrides) show as \x1b, \u202e.
    return Body(kind, [printable(line) for line in text.split("\n")], size, cut, limit)


def _cut_character(data: bytes) -> bool:
    """True when data is UTF-8 but for a character cut at its end."""
    for drop in range(1, 4):
        try:
            data[:-drop].decode("utf-8")
        except UnicodeDecodeError:
            continue
        return True
    return False


def shown_json(value: Any) -> str:
    """A property or header value as one line of JSON text, control characters escaped."""
    return printable(json.dumps(value, ensure_ascii=False))


@dataclass(frozen=True)
class HeaderRow:
    """One typed header as a row: nested tables and arrays become indented rows."""

    depth: int
    key: str
    type: str
    value: str


def header_rows(entries: list[dict[str, Any]], depth: int = 0) -> list[HeaderRow]:
    """records.headers_typed's entries flattened into rows (tables and arrays open their items)."""
    rows = []
    for entry in entries:
        key, kind, value = printable(str(entry.get("key", ""))), entry["type"], entry["value"]
        if kind == "table":
            rows.append(HeaderRow(depth, key, kind, f"{len(value)} entries"))
            rows += header_rows(value, depth + 1)
        elif kind == "array":
            rows.append(HeaderRow(depth, key, kind, f"{len(value)} items"))
            rows += header_rows([{"key": f"[{i}]", **item} for i, item in enumerate(value)], depth + 1)
        else:
            rows.append(HeaderRow(depth, key, kind, shown_json(value)))
    return rows


@dataclass(frozen=True)
class Row:
    """A message in the results table (its body is not kept)."""

    id: int
    captured_at: str
    vhost: str
    exchange: str
    routing_key: str
    message_id: str
    body_size: int
    redelivered: bool
    replay_id: str | None


def row(message: ArchivedMessage) -> Row:
    """The results-table view of a message."""
    message_id = message.properties.get("message_id")
    return Row(
        id=message.id,
        captured_at=shown_time(message.captured_at),
        vhost=printable(message.vhost),
        exchange=printable(message.exchange),
        routing_key=printable(message.routing_key),
        message_id=printable(message_id) if isinstance(message_id, str) else "",
        body_size=message.body_size,
        redelivered=message.redelivered,
        replay_id=message.replay_id,
    )


# --- the traffic chart --------------------------------------------------------------------

# Bar widths in seconds, round numbers a person reads at a glance.
WIDTHS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400)
MAX_BARS = 90
# Exchanges drawn apart; the others share one series.
MAX_SERIES = 8
OTHERS = "(other exchanges)"


def bar_width(start: datetime, end: datetime) -> int:
    """The narrowest round width that draws the window in at most MAX_BARS bars."""
    seconds = max((end - start).total_seconds(), 1.0)
    for width in WIDTHS:
        if seconds / width <= MAX_BARS:
            return width
    days = math.ceil(seconds / MAX_BARS / 86400)
    return days * 86400


@dataclass
class Traffic:
    """Messages per bar per exchange: what the chart's script draws (as JSON)."""

    start: datetime
    end: datetime
    width: int
    series: list[dict[str, Any]] = field(default_factory=list)
    bars: list[list[Any]] = field(default_factory=list)
    total: int = 0

    def as_json(self) -> dict[str, Any]:
        """The /traffic answer's chart part."""
        return {
            "from": iso(self.start),
            "until": iso(self.end),
            "width": self.width,
            # Bars past the window's end (messages captured while the chart was read) widen it.
            "count": max(
                1,
                math.ceil((self.end - self.start).total_seconds() / self.width),
                *(position + 1 for position, _ in self.bars),
            ),
            "series": self.series,
            "bars": self.bars,
            "total": self.total,
        }


def traffic(rows: Iterable[tuple[str, int, int]], start: datetime, end: datetime, width: int) -> Traffic:
    """The chart from (exchange, bar number since the epoch, messages) rows.

    Bars are aligned on multiples of the width since the epoch (10:40, 10:45, ...); the busiest
    MAX_SERIES exchanges are their own series, the rest are summed as OTHERS.
    """
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    first = math.floor((start - epoch).total_seconds() / width)
    aligned = epoch + timedelta(seconds=first * width)
    found = list(rows)
    totals: dict[str, int] = {}
    for exchange, _, messages in found:
        totals[exchange] = totals.get(exchange, 0) + messages
    ranked = sorted(totals, key=lambda name: (-totals[name], name))
    shown = ranked[:MAX_SERIES]
    if len(ranked) > MAX_SERIES:
        shown = ranked[: MAX_SERIES - 1]
    index = {name: position for position, name in enumerate(shown)}
    others = len(shown) if len(ranked) > len(shown) else None
    series = [
        {"exchange": name, "label": printable(name) or "(default)", "total": totals[name], "narrows": True}
        for name in shown
    ]
    if others is not None:
        rest = sum(totals[name] for name in ranked[len(shown) :])
        series.append({"exchange": None, "label": OTHERS, "total": rest, "narrows": False})
    bars: dict[int, list[int]] = {}
    for exchange, bar, messages in found:
        counts = bars.setdefault(bar - first, [0] * len(series))
        counts[index.get(exchange, others if others is not None else 0)] += messages
    return Traffic(
        start=aligned,
        end=end,
        width=width,
        series=series,
        bars=[[position, counts] for position, counts in sorted(bars.items())],
        total=sum(totals.values()),
    )
