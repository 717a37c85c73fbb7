"""The FILTERS of `rabbit-replay`: parsed from the command line, kept with a replay, turned into SQL.

Pure logic: no database here. The WHERE clause is built from fixed fragments; every value
the operator typed reaches PostgreSQL only as a query parameter.
"""

import base64
import re
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from rabbit_archive.archive import queries
from rabbit_archive.archive.errors import UsageError
from rabbit_archive.config.durations import parse_duration
from rabbit_archive.replay.deaths import REASONS


@dataclass(frozen=True)
class Filters:
    """Which archived messages a command works on; empty fields select everything."""

    exchanges: tuple[str, ...] = ()
    routing_key: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    from_id: int | None = None
    to_id: int | None = None
    headers: tuple[tuple[str, str], ...] = ()
    message_id: str | None = None
    correlation_id: str | None = None
    body_contains: str | None = None
    body_json: tuple[tuple[tuple[str, ...], str], ...] = ()
    vhosts: tuple[str, ...] = ()
    include_replays: bool = False
    # The queue and reason of the most recent x-death entry (dead-lettered messages).
    dead_lettered_from: str | None = None
    death_reason: str | None = None
    # Set by a replay, not by the operator: the newest archive id when it started, so that a
    # resumed replay selects the same messages and never its own copies captured meanwhile.
    upto_id: int | None = field(default=None, compare=False)

    def selects_everything(self) -> bool:
        """True when no filter narrows the selection (`--include-replays` only widens it)."""
        narrowing = replace(self, include_replays=False, upto_id=None)
        return narrowing == Filters()

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe form, for the replay history."""
        data = asdict(self)
        for key in ("since", "until"):
            if data[key] is not None:
                data[key] = data[key].isoformat()
        data["headers"] = [list(pair) for pair in self.headers]
        data["body_json"] = [[".".join(path), value] for path, value in self.body_json]
        if self.body_contains is not None and not _is_utf8(self.body_contains):
            # Bytes given on the command line that are not UTF-8 (surrogate escapes): jsonb
            # cannot hold them as text, so they are kept as base64 of the exact bytes.
            data["body_contains"] = None
            data["body_contains_base64"] = base64.b64encode(body_bytes(self.body_contains)).decode("ascii")
        # `is` tests: an id of 0 is a filter (0 == False would drop it).
        return {
            key: value
            for key, value in data.items()
            if not (value is None or value is False or (isinstance(value, tuple | list) and not value))
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Filters":
        """The inverse of to_json."""

        def time(key: str) -> datetime | None:
            return datetime.fromisoformat(data[key]) if data.get(key) else None

        return cls(
            exchanges=tuple(data.get("exchanges", ())),
            routing_key=data.get("routing_key"),
            since=time("since"),
            until=time("until"),
            from_id=data.get("from_id"),
            to_id=data.get("to_id"),
            headers=tuple((key, value) for key, value in data.get("headers", ())),
            message_id=data.get("message_id"),
            correlation_id=data.get("correlation_id"),
            body_contains=(
                base64.b64decode(data["body_contains_base64"]).decode("utf-8", "surrogateescape")
                if data.get("body_contains_base64")
                else data.get("body_contains")
            ),
            body_json=tuple((tuple(path.split(".")), value) for path, value in data.get("body_json", ())),
            vhosts=tuple(data.get("vhosts", ())),
            include_replays=bool(data.get("include_replays", False)),
            dead_lettered_from=data.get("dead_lettered_from"),
            death_reason=data.get("death_reason"),
            upto_id=data.get("upto_id"),
        )


def parse_time(option: str, text: str, now: datetime) -> datetime:
    """ISO 8601 (naive means UTC) or a duration back from now, like 90s, 15m, 2h or 3d."""
    try:
        return now - parse_duration(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise UsageError(
            f"{option}: cannot read {text!r} as a time: give ISO 8601 like 2026-11-27T10:00:00 "
            "(UTC unless it has an offset) or a duration back from now like 90s, 15m, 2h, 3d"
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _pair(option: str, text: str) -> tuple[str, str]:
    key, equals, value = text.partition("=")
    if not equals or not key:
        raise UsageError(f"{option}: expected KEY=VALUE, got {text!r}")
    return key, value


def _no_nul(option: str, text: str | None) -> None:
    if text is not None and "\x00" in text:
        raise UsageError(f"{option}: a NUL character cannot be matched; leave it out of the value")
    if text is not None and not _is_utf8(text):
        raise UsageError(
            f"{option}: {text!r} is not valid UTF-8 text; names and values are compared as UTF-8"
        )


def _is_utf8(text: str) -> bool:
    """False for text holding surrogates (bytes on the command line that were not UTF-8)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def body_bytes(text: str) -> bytes:
    """The bytes --body-contains looks for: UTF-8 of the text, or the very bytes given when not UTF-8."""
    return text.encode("utf-8", "surrogateescape")


def build_filters(
    *,
    exchanges: list[str] | None = None,
    routing_key: str | None = None,
    since: str | None = None,
    until: str | None = None,
    from_id: int | None = None,
    to_id: int | None = None,
    headers: list[str] | None = None,
    message_id: str | None = None,
    correlation_id: str | None = None,
    body_contains: str | None = None,
    body_json: list[str] | None = None,
    vhosts: list[str] | None = None,
    include_replays: bool = False,
    dead_lettered_from: str | None = None,
    death_reason: str | None = None,
    now: datetime | None = None,
) -> Filters:
    """Filters from command-line values; a bad value is a UsageError naming its option."""
    now = now or datetime.now(UTC)
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    header_pairs = tuple(_pair("--header", text) for text in headers or ())
    json_pairs = []
    for text in body_json or ():
        path, expected = _pair("--body-json", text)
        if any(not part for part in path.split(".")):
            raise UsageError(f"--body-json: {path!r} is not a dotted path like order.customer.id")
        json_pairs.append((tuple(path.split(".")), expected))
    checked: tuple[tuple[str, str | None], ...] = (
        ("--routing-key", routing_key),
        ("--message-id", message_id),
        ("--correlation-id", correlation_id),
        ("--dead-lettered-from", dead_lettered_from),
        *(("--exchange", name) for name in exchanges or ()),
        *(("--vhost", name) for name in vhosts or ()),
        *(("--header", f"{key}={value}") for key, value in header_pairs),
        *(("--body-json", f"{'.'.join(path)}={value}") for path, value in json_pairs),
    )
    for option, value in checked:
        _no_nul(option, value)
    if body_contains == "":
        # An empty text is in every body: most likely an unset shell variable, not a filter.
        raise UsageError(
            "--body-contains: an empty text matches every message; give the text to look for "
            "(or leave the option out)"
        )
    if body_contains is not None:
        try:
            body_bytes(body_contains)
        except UnicodeEncodeError:
            raise UsageError(f"--body-contains: cannot turn {body_contains!r} into bytes") from None
    if death_reason is not None and death_reason not in REASONS:
        raise UsageError(f"--death-reason: {death_reason!r} is not one of {', '.join(REASONS)}")
    for option, number in (("--from-id", from_id), ("--to-id", to_id)):
        if number is not None and number < 0:
            raise UsageError(f"{option}: archive ids are not negative, got {number}")
    filters = Filters(
        exchanges=tuple(exchanges or ()),
        routing_key=routing_key,
        since=parse_time("--since", since, now) if since is not None else None,
        until=parse_time("--until", until, now) if until is not None else None,
        from_id=from_id,
        to_id=to_id,
        headers=header_pairs,
        message_id=message_id,
        correlation_id=correlation_id,
        body_contains=body_contains,
        body_json=tuple(json_pairs),
        vhosts=tuple(vhosts or ()),
        include_replays=include_replays,
        dead_lettered_from=dead_lettered_from,
        death_reason=death_reason,
    )
    if filters.since and filters.until and filters.since >= filters.until:
        raise UsageError("--since must be earlier than --until")
    return filters


_WILDCARDS = frozenset("*#")
# The characters both regex dialects treat specially; every other character is literal.
_REGEX_SPECIAL = re.compile(r"[\\.^$|?*+()\[\]{}]")


def topic_regex(pattern: str) -> str:
    """A PostgreSQL regular expression that matches dotted routing keys as a topic binding would.

    It is applied to the key with a dot in front ('' stays '', 'a.b' becomes '.a.b'), so
    that each word, empty ones included, is one '.word' step: '*' is exactly one step and
    '#' any number of them. An empty key has no words at all, as in RabbitMQ: '#' matches
    it and '*' does not.
    """
    parts = ["^"]
    previous = None
    for word in pattern.split(".") if pattern else ():
        if word == "#" and previous == "#":
            continue  # '#.#' means '#'; repeating the group only multiplies backtracking
        previous = word
        if word == "#":
            parts.append(r"(\.[^.]*)*")
        elif word == "*":
            parts.append(r"\.[^.]*")
        else:
            parts.append(r"\." + _REGEX_SPECIAL.sub(r"\\\g<0>", word))
    parts.append("$")
    return "".join(parts)


def topic_matches(pattern: str, routing_key: str) -> bool:
    """The same match in Python (for previews and tests): RabbitMQ's topic semantics."""
    dotted = "." + routing_key if routing_key else ""
    # PostgreSQL's and Python's regex dialects agree on every construct topic_regex uses.
    return re.fullmatch(topic_regex(pattern), dotted) is not None


class _Query:
    """Collects conditions and their parameters: fragments are fixed text, values are $n."""

    def __init__(self) -> None:
        self.conditions: list[str] = []
        self.params: list[Any] = []

    def param(self, value: Any) -> str:
        self.params.append(value)
        return f"${len(self.params)}"

    def add(self, condition: str) -> None:
        self.conditions.append(condition)


def where_clause(
    filters: Filters, *, after_id: int | None = None, through_id: int | None = None
) -> tuple[str, list[Any]]:
    """The WHERE clause (without the keyword) and its parameters; after_id/through_id bound a page."""
    q = _Query()
    if filters.exchanges:
        q.add(queries.FILTER_EXCHANGES.format(q.param(list(filters.exchanges))))
    if filters.vhosts:
        q.add(queries.FILTER_VHOSTS.format(q.param(list(filters.vhosts))))
    if filters.routing_key is not None:
        if _WILDCARDS.isdisjoint(filters.routing_key.split(".")):
            q.add(queries.FILTER_ROUTING_KEY.format(q.param(filters.routing_key)))
        else:
            q.add(queries.FILTER_ROUTING_PATTERN.format(q.param(topic_regex(filters.routing_key))))
    if filters.since is not None:
        q.add(queries.FILTER_SINCE.format(q.param(filters.since)))
    if filters.until is not None:
        q.add(queries.FILTER_UNTIL.format(q.param(filters.until)))
    if filters.from_id is not None:
        q.add(queries.FILTER_FROM_ID.format(q.param(filters.from_id)))
    for bound in (filters.to_id, filters.upto_id, through_id):
        if bound is not None:
            q.add(queries.FILTER_TO_ID.format(q.param(bound)))
    if after_id is not None:
        q.add(queries.FILTER_AFTER_ID.format(q.param(after_id)))
    for key, value in filters.headers:
        q.add(queries.FILTER_HEADER.format(q.param(key), q.param(value)))
    if filters.message_id is not None:
        q.add(queries.FILTER_MESSAGE_ID.format(q.param(filters.message_id)))
    if filters.correlation_id is not None:
        q.add(queries.FILTER_CORRELATION_ID.format(q.param(filters.correlation_id)))
    if filters.body_contains is not None:
        q.add(queries.FILTER_BODY_CONTAINS.format(q.param(body_bytes(filters.body_contains))))
    for path, value in filters.body_json:
        q.add(queries.FILTER_BODY_JSON.format(q.param(list(path)), q.param(value)))
    if filters.dead_lettered_from is not None:
        q.add(queries.FILTER_DEAD_LETTERED_FROM.format(q.param(filters.dead_lettered_from)))
    if filters.death_reason is not None:
        q.add(queries.FILTER_DEATH_REASON.format(q.param(filters.death_reason)))
    if not filters.include_replays:
        q.add(queries.FILTER_NOT_A_REPLAY)
    return (" AND ".join(q.conditions) or "TRUE"), q.params
