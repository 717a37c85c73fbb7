"""The capture daemon's narrow interface to PostgreSQL: one method per database operation."""

import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import asyncpg

from archive import queries
from archive.db import CONNECTION_ERRORS, Connection, describe
from archive.errors import DatabaseUnavailable
from archive.records import MESSAGE_COLUMNS, clean_properties, fingerprint, message_row
from capture.batching import Delivery

log = logging.getLogger("rabbit_archive.capture.store")

PARTITION_LOCK_ID = 0x7261626269740002
_PENDING_COLUMNS = ("fingerprint", "batch_id")
_EXCHANGE = MESSAGE_COLUMNS.index("exchange")


@dataclass(slots=True)
class WriteResult:
    """What one committed batch did."""

    stored: int = 0
    duplicates: int = 0
    unstorable: int = 0
    stored_bytes: Counter[str] = field(default_factory=Counter)
    stored_by_exchange: Counter[str] = field(default_factory=Counter)

    def merge(self, other: "WriteResult") -> None:
        """Add another part of the same batch."""
        self.stored += other.stored
        self.duplicates += other.duplicates
        self.unstorable += other.unstorable
        self.stored_bytes.update(other.stored_bytes)
        self.stored_by_exchange.update(other.stored_by_exchange)


class ArchiveStore(Protocol):
    """What the capture loop needs from the database."""

    async def write_batch(
        self, vhost: str, deliveries: Sequence[Delivery], batch_id: int, forget: Sequence[int]
    ) -> WriteResult:
        """Store the deliveries in one transaction (dropping recognised redeliveries)."""

    async def forget_pending(self, batch_ids: Sequence[int]) -> None:
        """Drop the redelivery fingerprints of batches whose acknowledgement was processed."""


@dataclass(slots=True)
class _Prepared:
    delivery: Delivery
    properties_raw: bytes
    fingerprint: bytes


class PostgresStore:
    """ArchiveStore on an asyncpg pool; driver errors become DatabaseUnavailable."""

    def __init__(self, pool: "asyncpg.Pool[asyncpg.Record]") -> None:
        self._pool = pool

    async def write_batch(
        self, vhost: str, deliveries: Sequence[Delivery], batch_id: int, forget: Sequence[int]
    ) -> WriteResult:
        """Store the deliveries in one transaction (dropping recognised redeliveries)."""
        prepared = []
        for delivery in deliveries:
            properties_raw = clean_properties(delivery.properties_raw)
            prepared.append(
                _Prepared(
                    delivery,
                    properties_raw,
                    fingerprint(
                        vhost,
                        delivery.exchange,
                        delivery.routing_key,
                        properties_raw,
                        delivery.body,
                    ),
                )
            )
        try:
            return await self._write(vhost, prepared, batch_id, forget)
        except CONNECTION_ERRORS as error:
            raise DatabaseUnavailable(f"writing a batch failed: {describe(error)}") from error

    async def _write(
        self, vhost: str, prepared: list[_Prepared], batch_id: int, forget: Sequence[int]
    ) -> WriteResult:
        try:
            async with self._pool.acquire() as connection, connection.transaction():
                return await self._write_in(connection, vhost, prepared, batch_id, forget)
        except CONNECTION_ERRORS:
            raise
        except asyncpg.PostgresError as error:
            if isinstance(error, asyncpg.PostgresConnectionError):
                raise
            # Something in the batch cannot be stored the normal way: split it until the
            # message that fails is alone, so every other message is stored normally.
            if len(prepared) == 1:
                return await self._write_unstorable(vhost, prepared[0], batch_id, forget, error)
            middle = len(prepared) // 2
            log.warning(
                "batch_split",
                extra={"batch_size": len(prepared), "error": describe(error)},
            )
            result = await self._write(vhost, prepared[:middle], batch_id, forget)
            result.merge(await self._write(vhost, prepared[middle:], batch_id, ()))
            return result

    async def _write_in(
        self,
        connection: Connection,
        vhost: str,
        prepared: list[_Prepared],
        batch_id: int,
        forget: Sequence[int],
    ) -> WriteResult:
        result = WriteResult()
        already_stored: Counter[bytes] = Counter()
        redelivered = [item.fingerprint for item in prepared if item.delivery.redelivered]
        if redelivered:
            claimed = await connection.fetch(queries.CLAIM_PENDING, redelivered)
            already_stored.update(row[0] for row in claimed)
        records: list[tuple[Any, ...]] = []
        pending: list[tuple[bytes, int]] = []
        for item in prepared:
            delivery = item.delivery
            if delivery.redelivered and already_stored[item.fingerprint]:
                already_stored[item.fingerprint] -= 1
                result.duplicates += 1
                continue
            record = message_row(
                vhost,
                delivery.exchange,
                delivery.routing_key,
                delivery.redelivered,
                item.properties_raw,
                delivery.body,
            )
            records.append(record)
            pending.append((item.fingerprint, batch_id))
            result.stored += 1
            # Keyed by the stored text of the name: always printable, safe as a metric label.
            result.stored_by_exchange[record[_EXCHANGE]] += 1
            result.stored_bytes[record[_EXCHANGE]] += len(delivery.body)
        await _copy(connection, records, pending, forget)
        return result

    async def _write_unstorable(
        self,
        vhost: str,
        item: _Prepared,
        batch_id: int,
        forget: Sequence[int],
        error: BaseException,
    ) -> WriteResult:
        """Store one message whose views PostgreSQL refused: raw bytes kept, views replaced."""
        delivery = item.delivery
        row = list(
            message_row(
                vhost,
                delivery.exchange,
                delivery.routing_key,
                delivery.redelivered,
                item.properties_raw,
                delivery.body,
            )
        )
        reason = describe(error)
        row[MESSAGE_COLUMNS.index("properties")] = _json_reason(reason)
        row[MESSAGE_COLUMNS.index("headers")] = None
        log.error("message_unstorable", extra={"exchange": row[_EXCHANGE], "error": reason})
        async with self._pool.acquire() as connection, connection.transaction():
            await _copy(connection, [tuple(row)], [(item.fingerprint, batch_id)], forget)
        stored_exchange = row[_EXCHANGE]
        return WriteResult(
            stored=1,
            unstorable=1,
            stored_bytes=Counter({stored_exchange: len(delivery.body)}),
            stored_by_exchange=Counter({stored_exchange: 1}),
        )

    async def forget_pending(self, batch_ids: Sequence[int]) -> None:
        """Drop the redelivery fingerprints of batches whose acknowledgement was processed."""
        try:
            await self._pool.execute(queries.FORGET_PENDING, list(batch_ids))
        except CONNECTION_ERRORS as error:
            raise DatabaseUnavailable(f"cleaning pending fingerprints: {describe(error)}") from error

    async def prune(self, older_than: timedelta) -> int:
        """Drop the partitions older than RETENTION; returns how many."""
        try:
            return await prune(self._pool, older_than)
        except CONNECTION_ERRORS as error:
            raise DatabaseUnavailable(f"pruning: {describe(error)}") from error

    async def ensure_partitions(self, days_ahead: int) -> int:
        """Create the daily partitions from today (UTC) on that do not exist yet."""
        today = datetime.now(UTC).date()
        try:
            async with self._pool.acquire() as connection, connection.transaction():
                await connection.execute("SELECT pg_advisory_xact_lock($1)", PARTITION_LOCK_ID)
                created: int = await connection.fetchval(queries.ENSURE_PARTITIONS, today, days_ahead + 1)
                return created
        except CONNECTION_ERRORS as error:
            raise DatabaseUnavailable(f"creating partitions: {describe(error)}") from error


async def _copy(
    connection: Connection,
    records: list[tuple[Any, ...]],
    pending: list[tuple[bytes, int]],
    forget: Sequence[int],
) -> None:
    """The writes of one batch transaction: rows, their fingerprints, fenced batches forgotten."""
    if records:
        await connection.copy_records_to_table(
            "messages", schema_name="rabbit_archive", columns=MESSAGE_COLUMNS, records=records
        )
        await connection.copy_records_to_table(
            "capture_pending", schema_name="rabbit_archive", columns=_PENDING_COLUMNS, records=pending
        )
    if forget:
        await connection.execute(queries.FORGET_PENDING, list(forget))


async def prune(store_pool: "asyncpg.Pool[asyncpg.Record]", older_than: timedelta) -> int:
    """Drop every daily partition entirely older than now - older_than; returns how many."""
    cutoff = datetime.now(UTC) - older_than
    async with store_pool.acquire() as connection:
        names = [row[0] for row in await connection.fetch(queries.PARTITIONS_BEFORE, cutoff)]
        for name in names:
            statement = await connection.fetchval(queries.DROP_PARTITION, name)
            await connection.execute(statement)
        await connection.execute(queries.DELETE_OLDER_DEFAULT, cutoff)
    return len(names)


def _json_reason(reason: str) -> str:
    return json.dumps({"$unstorable": reason})
