"""Reading the archived messages a set of filters selects, in archive-id order, with flat memory.

Rows are read in keyset pages (`id > cursor ORDER BY id LIMIT n`), each page in its own
short statement: a replay that runs for an hour holds no snapshot or lock that would keep
capture from creating tomorrow's partition or prune from dropping an old one. A page is
cut by bytes as well as rows, so a run of 20 MB bodies never sits in memory together.
"""

import builtins
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from rabbit_archive.archive import queries
from rabbit_archive.archive.db import Connection
from rabbit_archive.archive.errors import DatabaseRefused, UsageError
from rabbit_archive.archive.records import CAPTURE_MARGIN
from rabbit_archive.replay.filters import Filters, where_clause

PAGE_ROWS = 500
ID_WINDOW = 2 * PAGE_ROWS
PAGE_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ArchivedMessage:
    """One archived message as stored."""

    id: int
    captured_at: datetime
    vhost: str
    exchange: str
    routing_key: str
    exchange_raw: bytes | None
    routing_key_raw: bytes | None
    redelivered: bool
    properties_raw: bytes
    properties: dict[str, Any]
    headers: dict[str, Any] | None
    body: bytes
    body_size: int
    replay_id: str | None

    @property
    def exchange_bytes(self) -> bytes:
        """The exchange name exactly as published."""
        return self.exchange_raw if self.exchange_raw is not None else self.exchange.encode()

    @property
    def routing_key_bytes(self) -> bytes:
        """The routing key exactly as published."""
        return self.routing_key_raw if self.routing_key_raw is not None else self.routing_key.encode()


@dataclass(frozen=True, slots=True)
class Group:
    """Selected messages of one vhost, exchange and routing key."""

    vhost: str
    exchange: str
    routing_key: str
    messages: int
    bytes: int
    # The exchange's bytes when the text view above is not exactly the name (NUL, not UTF-8).
    exchange_raw: "builtins.bytes | None" = None

    @property
    def wire_exchange(self) -> str:
        """The exchange name as it goes on the wire (surrogate-escaped where not UTF-8)."""
        if self.exchange_raw is None:
            return self.exchange
        return self.exchange_raw.decode("utf-8", "surrogateescape")


def _message(record: asyncpg.Record) -> ArchivedMessage:
    # The queries select the columns in the order of ArchivedMessage's fields.
    return ArchivedMessage(*record.values())


async def setup_codecs(connection: Connection) -> None:
    """Decode jsonb columns into Python objects on this connection."""
    await connection.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def messages(
    connection: Connection,
    filters: Filters,
    *,
    after_id: int = 0,
    limit: int | None = None,
    page_rows: int = PAGE_ROWS,
    page_bytes: int = PAGE_BYTES,
    views: bool = True,
) -> AsyncIterator[ArchivedMessage]:
    """Every selected message with an id above after_id, in id order, page by page; with
    views=False without its JSON views (`properties` empty, `headers` None): what a replay sends.

    Each page looks at one window of archive ids (`id > cursor AND id <= cursor + width`), so
    the primary key's order does the work: a page never sorts the whole selection, which made
    an id-ordered walk of a large selection quadratic. The window widens while it finds little.
    """
    remaining = limit
    newest = filters.upto_id if filters.upto_id is not None else await watermark(connection)
    cursor, newest = await id_range(connection, filters, after_id, newest)
    width = ID_WINDOW
    page_rows_query = queries.SELECTION_PAGE_ROWS if views else queries.SELECTION_PAGE_ROWS_TO_SEND
    while (remaining is None or remaining > 0) and cursor < newest:
        want = page_rows if remaining is None else min(page_rows, remaining)
        through = min(cursor + width, newest)
        where, params = where_clause(filters, after_id=cursor, through_id=through)
        page_ids = queries.SELECTION_PAGE_IDS.format(where=where, limit=want)
        candidates = await connection.fetch(page_ids, *params)
        if len(candidates) < want:
            # The window is exhausted; a sparse selection gets a wider one next time.
            width = width * 2 if len(candidates) < want // 2 else width
        ids: list[int] = []
        times: list[datetime] = []
        size = 0
        for row in candidates:
            if ids and size + row["body_size"] > page_bytes:
                break
            ids.append(row["id"])
            times.append(row["captured_at"])
            size += row["body_size"]
        if ids:
            rows = await connection.fetch(page_rows_query, ids, min(times), max(times))
            for record in rows:
                yield _message(record)
            if remaining is not None:
                remaining -= len(ids)
        window_done = len(candidates) < want and len(ids) == len(candidates)
        cursor = through if window_done else ids[-1]


async def id_range(connection: Connection, filters: Filters, after_id: int, newest: int) -> tuple[int, int]:
    """The ids (after_id, newest] narrowed to those a time window (--since, --until) can hold.

    A row's id is taken within CAPTURE_MARGIN of its capture time, so a row captured a margin
    before --since has a lower id than any row of the window, and one captured a margin after
    --until a higher one. Without this an id walk for the last two hours of a large archive
    would start at the archive's first id.
    """
    if filters.since is not None:
        floor = await connection.fetchval(queries.SELECTION_ID_FLOOR, filters.since - CAPTURE_MARGIN)
        if floor is not None:
            after_id = max(after_id, floor)
    if filters.until is not None:
        ceiling = await connection.fetchval(queries.SELECTION_ID_CEILING, filters.until + CAPTURE_MARGIN)
        if ceiling is not None:
            newest = min(newest, ceiling - 1)
    return after_id, newest


async def message(connection: Connection, archive_id: int) -> ArchivedMessage:
    """One message by archive id; UsageError when there is none."""
    record = await connection.fetchrow(queries.ONE_MESSAGE, archive_id)
    if record is None:
        raise UsageError(f"no archived message has id {archive_id}: find ids with 'rabbit-replay find'")
    return _message(record)


async def count(connection: Connection, filters: Filters) -> int:
    """How many messages the filters select."""
    where, params = where_clause(filters)
    total: int = await connection.fetchval(queries.SELECTION_COUNT.format(where=where), *params)
    return total


async def breakdown(connection: Connection, filters: Filters) -> list[Group]:
    """The selection per vhost, exchange and routing key, largest first."""
    where, params = where_clause(filters)
    rows = await connection.fetch(queries.SELECTION_BREAKDOWN.format(where=where), *params)
    return [Group(**dict(row.items())) for row in rows]


async def watermark(connection: Connection) -> int:
    """The newest archive id below which no capture transaction can still commit (0: empty).

    Taken under the selection fence (archive/queries.py): ids at or below it are all
    committed, ids above it belong to transactions that started later, so a selection bounded
    by it is the same set whenever it is read, and a cursor that passes an id never finds a
    lower one appearing behind it.
    """
    if connection.is_in_transaction():
        # The fence would be held until the caller's transaction ends, stopping capture.
        raise RuntimeError("the selection watermark is read outside any transaction")
    try:
        async with connection.transaction():
            await connection.execute(queries.FENCE_TIMEOUT)
            await connection.execute(queries.FENCE_SELECTION)
            newest: int = await connection.fetchval(queries.NEWEST_ID)
    except asyncpg.LockNotAvailableError as error:
        raise DatabaseRefused(
            "a capture transaction has been open for 30 s, so the archive cannot fix the selection;"
            " check the capture daemon and PostgreSQL, then retry"
        ) from error
    return newest
