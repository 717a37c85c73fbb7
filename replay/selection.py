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

from rabbit_archive.archive.db import Connection
from rabbit_archive.archive.errors import UsageError
from rabbit_archive.replay.filters import Filters, where_clause

# {where} is always replay.filters.where_clause's output: fixed fragments with $n values.
_PAGE_IDS = "SELECT id, body_size FROM rabbit_archive.messages WHERE {where} ORDER BY id LIMIT {limit}"
_ROWS = """
SELECT id, captured_at, vhost, exchange, routing_key, exchange_raw, routing_key_raw, redelivered,
       properties_raw, properties, headers, body, body_size, replay_id
FROM rabbit_archive.messages
"""
_ROWS_BY_ID = _ROWS + "WHERE id = ANY($1::bigint[]) ORDER BY id"
_ONE_ROW = _ROWS + "WHERE id = $1::bigint"
_COUNT = "SELECT count(*) FROM rabbit_archive.messages WHERE {where}"
_BREAKDOWN = """
SELECT vhost, exchange, routing_key, count(*) AS messages, coalesce(sum(body_size), 0) AS bytes,
       exchange_raw
FROM rabbit_archive.messages WHERE {where}
GROUP BY vhost, exchange, routing_key, exchange_raw
ORDER BY messages DESC, vhost, exchange, routing_key
"""
_NEWEST_ID = "SELECT max(id) FROM rabbit_archive.messages"

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
    return ArchivedMessage(**dict(record.items()))


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
) -> AsyncIterator[ArchivedMessage]:
    """Every selected message with an id above after_id, in id order, page by page.

    Each page looks at one window of archive ids (`id > cursor AND id <= cursor + width`), so
    the primary key's order does the work: a page never sorts the whole selection, which made
    an id-ordered walk of a large selection quadratic. The window widens while it finds little.
    """
    cursor = after_id
    remaining = limit
    newest = filters.upto_id if filters.upto_id is not None else await newest_id(connection)
    width = ID_WINDOW
    while (remaining is None or remaining > 0) and cursor < newest:
        want = page_rows if remaining is None else min(page_rows, remaining)
        through = min(cursor + width, newest)
        where, params = where_clause(filters, after_id=cursor, through_id=through)
        candidates = await connection.fetch(_PAGE_IDS.format(where=where, limit=want), *params)
        if len(candidates) < want:
            # The window is exhausted; a sparse selection gets a wider one next time.
            width = width * 2 if len(candidates) < want // 2 else width
        ids: list[int] = []
        size = 0
        for row in candidates:
            if ids and size + row["body_size"] > page_bytes:
                break
            ids.append(row["id"])
            size += row["body_size"]
        if ids:
            for record in await connection.fetch(_ROWS_BY_ID, ids):
                yield _message(record)
            if remaining is not None:
                remaining -= len(ids)
        window_done = len(candidates) < want and len(ids) == len(candidates)
        cursor = through if window_done else ids[-1]


async def message(connection: Connection, archive_id: int) -> ArchivedMessage:
    """One message by archive id; UsageError when there is none."""
    record = await connection.fetchrow(_ONE_ROW, archive_id)
    if record is None:
        raise UsageError(f"no archived message has id {archive_id}: find ids with 'rabbit-replay find'")
    return _message(record)


async def count(connection: Connection, filters: Filters) -> int:
    """How many messages the filters select."""
    where, params = where_clause(filters)
    total: int = await connection.fetchval(_COUNT.format(where=where), *params)
    return total


async def breakdown(connection: Connection, filters: Filters) -> list[Group]:
    """The selection per vhost, exchange and routing key, largest first."""
    where, params = where_clause(filters)
    rows = await connection.fetch(_BREAKDOWN.format(where=where), *params)
    return [Group(**dict(row.items())) for row in rows]


async def newest_id(connection: Connection) -> int:
    """The newest archive id (0 for an empty archive)."""
    newest: int | None = await connection.fetchval(_NEWEST_ID)
    return newest or 0
