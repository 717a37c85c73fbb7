"""The replay history in PostgreSQL: one row per replay with its filters, counts and confirmed cursor."""

import json
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime
from typing import Any

import asyncpg

from rabbit_archive.archive import queries
from rabbit_archive.archive.db import Connection
from rabbit_archive.archive.errors import DatabaseUnavailable, UsageError
from rabbit_archive.archive.migrate import schema_version

# The failed positions and the settled cursor came with migration 5.
REPLAY_SCHEMA_VERSION = 5


@dataclass(frozen=True)
class Target:
    """Where a replay publishes: one queue, one exchange, or each message's original exchange."""

    queue: str | None = None
    exchange: str | None = None
    # `--to-origin`: "queue" (the queue each message died in) or "exchange" (its first publish).
    origin: str | None = None
    # `--routing-key-to`: one routing key for every message.
    routing_key: str | None = None

    def describe(self) -> str:
        """'queue:NAME', 'exchange:NAME', 'origin:queue', 'origin:exchange' or 'original'."""
        if self.queue is not None:
            where = f"queue:{self.queue}"
        elif self.exchange is not None:
            where = f"exchange:{self.exchange}"
        elif self.origin is not None:
            where = f"origin:{self.origin}"
        else:
            where = "original"
        return where if self.routing_key is None else f"{where} (routing key {self.routing_key!r})"

    def to_json(self) -> dict[str, str]:
        """The stored form."""
        return {
            key: value
            for key, value in (
                ("queue", self.queue),
                ("exchange", self.exchange),
                ("origin", self.origin),
                ("routing_key", self.routing_key),
            )
            if value is not None
        }

    @classmethod
    def from_json(cls, data: dict[str, str]) -> "Target":
        """The inverse of to_json."""
        return cls(
            queue=data.get("queue"),
            exchange=data.get("exchange"),
            origin=data.get("origin"),
            routing_key=data.get("routing_key"),
        )


@dataclass(frozen=True)
class ReplayRecord:
    """One replay as the history holds it; `status` is 'interrupted' for a dead 'running' one.

    `status` is one of 'running', 'completed', 'incomplete' (every message was answered, some
    were nacked or returned: `failed_ids`), 'interrupted' or 'failed'. `settled_cursor` is
    where a resume continues after sending `failed_ids` again (None: `confirmed_cursor`).
    """

    id: str
    status: str
    filters: dict[str, Any]
    target: dict[str, str]
    options: dict[str, Any]
    operator: str
    reason: str | None
    upto_id: int | None
    selected: int
    published: int
    confirmed: int
    returned: int
    nacked: int
    confirmed_cursor: int
    error: str | None
    started_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    failed_ids: tuple[int, ...] = ()
    settled_cursor: int | None = None
    skipped: int = 0
    # Of the skipped, `--to-origin` messages without x-death (reported, not a failure).
    without_death: int = 0
    follow_gaps: tuple[dict[str, Any], ...] = ()

    @property
    def follower(self) -> str | None:
        """The follower's name (`run --follow --name`), None for a replay that does not follow."""
        if not self.options.get("follow"):
            return None
        return str(self.options.get("name") or self.id)

    def to_json(self) -> dict[str, Any]:
        """The `history --json` object."""
        return {
            "replay_id": self.id,
            "status": self.status,
            "selected": self.selected,
            "published": self.published,
            "confirmed": self.confirmed,
            "returned": self.returned,
            "nacked": self.nacked,
            "skipped": self.skipped,
            "without_death": self.without_death,
            "follower": self.follower,
            "follow_gaps": list(self.follow_gaps),
            "operator": self.operator,
            "reason": self.reason,
            "target": Target.from_json(self.target).describe(),
            "filters": self.filters,
            "options": self.options,
            "confirmed_cursor": self.confirmed_cursor,
            "failed_ids": list(self.failed_ids),
            "error": self.error,
            "started_at": self.started_at.isoformat(),
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
        }


_FIELDS = tuple(field.name for field in fields(ReplayRecord))


def _record(row: asyncpg.Record) -> ReplayRecord:
    values = dict(row.items())
    for key in ("filters", "target", "options", "follow_gaps"):
        if isinstance(values.get(key), str):
            values[key] = json.loads(values[key])
    if "follow_gaps" in values:
        values["follow_gaps"] = tuple(values["follow_gaps"])
    return ReplayRecord(**{name: values[name] for name in _FIELDS if name in values})


async def _with_failures(
    connection: Connection, records: list[ReplayRecord], replay_id: str | None
) -> list[ReplayRecord]:
    rows = await connection.fetch(queries.GET_REPLAY_FAILURES, replay_id)
    found = {row["id"]: row for row in rows}
    return [
        replace(record, failed_ids=tuple(row["failed_ids"] or ()), settled_cursor=row["settled_cursor"])
        if (row := found.get(record.id)) is not None
        else record
        for record in records
    ]


async def check_schema(connection: Connection) -> None:
    """Fail in one line when the archive schema is missing or older than replay needs."""
    version = await schema_version(connection)
    if version is None:
        raise DatabaseUnavailable(
            "the database holds no archive: point RABBIT_ARCHIVE_DATABASE_URL at the capture "
            "daemon's database, or run 'rabbit-capture migrate'"
        )
    if version < REPLAY_SCHEMA_VERSION:
        raise DatabaseUnavailable(
            f"the archive schema is at version {version}, replay needs {REPLAY_SCHEMA_VERSION}: "
            "run 'rabbit-capture migrate'"
        )


async def create(
    connection: Connection,
    replay_id: str,
    *,
    filters: dict[str, Any],
    target: Target,
    options: dict[str, Any],
    operator: str,
    reason: str | None,
    upto_id: int | None,
    selected: int,
) -> None:
    """Record a new replay as running; UsageError when a follower of the same name exists."""
    try:
        await connection.execute(
            queries.INSERT_REPLAY,
            replay_id,
            json.dumps(filters),
            json.dumps(target.to_json()),
            json.dumps(options),
            operator,
            reason,
            upto_id,
            selected,
        )
    except asyncpg.UniqueViolationError:
        # Two starts with one --name at once: the unique index decides (migration 0008).
        raise UsageError(f"a follower named {options.get('name')!r} exists; choose another --name") from None


async def lock(connection: Connection, replay_id: str) -> bool:
    """Take the replay's lock for this session; False when another process holds it."""
    taken: bool = await connection.fetchval(queries.TRY_LOCK_REPLAY, replay_id)
    return taken


async def get(connection: Connection, replay_id: str) -> ReplayRecord:
    """One replay; UsageError when the id is unknown."""
    row = await connection.fetchrow(queries.GET_REPLAY, replay_id)
    if row is None:
        raise UsageError(f"no replay has id {replay_id!r}: list replays with 'rabbit-replay history'")
    return (await _with_failures(connection, [_record(row)], replay_id))[0]


async def all_replays(connection: Connection) -> list[ReplayRecord]:
    """Every replay, oldest first."""
    records = [_record(row) for row in await connection.fetch(queries.LIST_REPLAYS)]
    return await _with_failures(connection, records, None)


async def save_progress(
    connection: Connection,
    replay_id: str,
    *,
    published: int,
    confirmed: int,
    returned: int,
    nacked: int,
    skipped: int,
    cursor: int,
    without_death: int = 0,
) -> None:
    """Store the counts and the confirmed cursor."""
    await connection.execute(
        queries.SAVE_REPLAY_PROGRESS,
        replay_id,
        published,
        confirmed,
        returned,
        nacked,
        skipped,
        cursor,
        without_death,
    )


async def save_failures(
    connection: Connection, replay_id: str, *, failed: list[int], settled_cursor: int
) -> None:
    """Store the positions nacked or returned and where a resume continues after them."""
    await connection.execute(queries.SAVE_REPLAY_FAILURES, replay_id, failed, settled_cursor)


async def follower_named(connection: Connection, name: str) -> str | None:
    """The replay id of the follower with that name, if there is one."""
    found: str | None = await connection.fetchval(queries.FOLLOWER_BY_NAME, name)
    return found


async def record_follow_gap(connection: Connection, replay_id: str, first: int, last: int) -> None:
    """Keep, with the follower, archive ids that retention dropped before it reached them."""
    gap = {"from": first, "until": last, "at": datetime.now(UTC).isoformat()}
    await connection.execute(queries.RECORD_FOLLOW_GAP, replay_id, json.dumps([gap]))


async def merge_options(connection: Connection, replay_id: str, options: dict[str, Any]) -> None:
    """Add keys to the replay's stored options (what its canary found)."""
    await connection.execute(queries.MERGE_REPLAY_OPTIONS, replay_id, options)


async def finish(connection: Connection, replay_id: str, status: str, error: str | None = None) -> None:
    """Mark the replay completed, incomplete, interrupted or failed."""
    await connection.execute(queries.FINISH_REPLAY, replay_id, status, error)


async def restart(connection: Connection, replay_id: str) -> None:
    """Mark a resumed replay as running again."""
    await connection.execute(queries.RESTART_REPLAY, replay_id)
