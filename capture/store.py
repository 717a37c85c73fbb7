"""The capture daemon's narrow interface to PostgreSQL: one method per database operation."""

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import asyncpg

from rabbit_archive.archive import queries
from rabbit_archive.archive.db import DATABASE_ERRORS, Connection, database_error
from rabbit_archive.archive.errors import DatabaseUnavailable, describe
from rabbit_archive.archive.records import (
    CAPTURE_MARGIN,
    DELIVERY_COUNT_HEADER,
    MESSAGE_COLUMNS,
    clean_properties,
    fingerprint,
    legacy_fingerprint,
    message_row,
)
from rabbit_archive.capture.batching import Delivery
from rabbit_archive.capture.binding_states import storable_text
from rabbit_archive.capture.pending import claim, pack

log = logging.getLogger(__name__)

_EXCHANGE = MESSAGE_COLUMNS.index("exchange")
_BODY_SIZE = MESSAGE_COLUMNS.index("body_size")
_COPY_COLUMNS = (*MESSAGE_COLUMNS, "captured_at")
# With ids taken ahead (a batch written beside another, see write_batch).
_COPY_COLUMNS_WITH_ID = ("id", *_COPY_COLUMNS)


@dataclass(slots=True)
class WriteResult:
    """What one committed batch did."""

    stored: int = 0
    duplicates: int = 0
    already_committed: bool = False
    unstorable: int = 0
    stored_bytes: Counter[str] = field(default_factory=Counter)
    stored_by_exchange: Counter[str] = field(default_factory=Counter)
    # The fingerprints the batch leaves pending: of the messages it stored and those it matched.
    pending: list[bytes] = field(default_factory=list)

    def merge(self, other: "WriteResult") -> None:
        """Add another part of the same batch."""
        self.stored += other.stored
        self.duplicates += other.duplicates
        self.unstorable += other.unstorable
        self.stored_bytes.update(other.stored_bytes)
        self.stored_by_exchange.update(other.stored_by_exchange)
        self.pending.extend(other.pending)


class ArchiveStore(Protocol):
    """What the capture loop needs from the database."""

    async def write_batch(
        self,
        vhost: str,
        deliveries: Sequence[Delivery],
        batch_id: int,
        forget: Sequence[int],
        *,
        retry: bool = False,
        session_id: int = 0,
        forget_other_sessions: bool = False,
        ids_taken: asyncio.Event | None = None,
        before_commit: Callable[[], Awaitable[None]] | None = None,
    ) -> WriteResult:
        """Store the deliveries in one transaction (dropping recognised redeliveries).

        The fingerprints of `forget` batches are deleted first; with `forget_other_sessions`
        those of the vhost's other broker sessions are deleted after the batch is matched.
        With `ids_taken`, every row's id is taken at the start and the event set then: a
        batch written beside this one may start, its ids all higher. `before_commit` is
        awaited last inside the transaction; what it raises rolls the batch back.
        """

    async def forget_pending(self, batch_ids: Sequence[int]) -> None:
        """Drop the redelivery fingerprints of batches whose acknowledgement was processed."""

    def prepare(self, vhost: str, delivery: Delivery) -> None:
        """Do ahead, as the delivery arrives, the per-message work of writing it (kept on it)."""


def identify(vhost: str, delivery: Delivery, *, strip_delivery_count: bool) -> tuple[bytes, bytes]:
    """The property bytes to store and the fingerprint that recognises the message's redelivery.

    A quorum queue replaces a producer's own x-delivery-count with its counter on redelivery:
    the fingerprint leaves that header out of every copy so the first and the redelivered one
    match; only a redelivered copy is stored without it (its value there is the queue's, the
    producer's is gone).
    """
    properties_raw = delivery.properties_raw
    identity = properties_raw
    if strip_delivery_count and DELIVERY_COUNT_HEADER in properties_raw:
        identity = clean_properties(properties_raw)
        if delivery.redelivered:
            properties_raw = identity
    digest = fingerprint(vhost, delivery.exchange, delivery.routing_key, identity, delivery.body)
    return properties_raw, digest


@dataclass(slots=True)
class _Prepared:
    # No reference back to the delivery: the delivery holds this, and a cycle would keep large
    # bodies alive until the garbage collector's next pass instead of freeing them with the batch.
    redelivered: bool
    fingerprint: bytes
    record: tuple[Any, ...]
    # Only for a redelivered message: what a version before SHA-256 fingerprints left pending.
    legacy_fingerprint: bytes | None = None


# SQLSTATE classes caused by the data itself (22 data exception, 54 program limit exceeded):
# splitting the batch isolates the message. Any other error is the database's own trouble
# (read-only after a failover, disk full, a cancelled statement, a lock or serialization
# conflict, permissions): it becomes DatabaseRefused and the whole batch is retried.
_DATA_ERROR_CLASSES = ("22", "54")


def _is_data_error(error: BaseException) -> bool:
    sqlstate = getattr(error, "sqlstate", None) or ""
    return sqlstate[:2] in _DATA_ERROR_CLASSES


class PostgresStore:
    """ArchiveStore on an asyncpg pool; driver errors become DatabaseUnavailable (or DatabaseRefused)."""

    def __init__(self, pool: "asyncpg.Pool[asyncpg.Record]", *, strip_delivery_count: bool = True) -> None:
        self._pool = pool
        # Only a quorum queue adds x-delivery-count, and only to a message it redelivers; a
        # header of that name on any other delivery is the producer's and is kept.
        self._strip_delivery_count = strip_delivery_count

    def prepare(self, vhost: str, delivery: Delivery) -> None:
        """Fingerprint and COPY record of a delivery, worked out as it arrives.

        The consumer calls this for each delivery, so that the work is done while the batch
        before it commits instead of in the writer's turn, when nothing else can go on.
        """
        delivery.prepared = self._prepare(vhost, delivery)

    def _prepare(self, vhost: str, delivery: Delivery) -> _Prepared:
        if isinstance(delivery.prepared, _Prepared):
            return delivery.prepared
        properties_raw, digest = identify(vhost, delivery, strip_delivery_count=self._strip_delivery_count)
        exchange, routing_key = delivery.exchange, delivery.routing_key
        redelivered, body = delivery.redelivered, delivery.body
        record = message_row(vhost, exchange, routing_key, redelivered, properties_raw, body)
        if not redelivered:
            return _Prepared(redelivered, digest, record)
        # A redelivered copy is stored with the very property bytes its fingerprint covers.
        legacy = legacy_fingerprint(vhost, exchange, routing_key, properties_raw, body)
        return _Prepared(redelivered, digest, record, legacy)

    async def write_batch(
        self,
        vhost: str,
        deliveries: Sequence[Delivery],
        batch_id: int,
        forget: Sequence[int],
        *,
        retry: bool = False,
        session_id: int = 0,
        forget_other_sessions: bool = False,
        ids_taken: asyncio.Event | None = None,
        before_commit: Callable[[], Awaitable[None]] | None = None,
    ) -> WriteResult:
        """Store the deliveries in one transaction (dropping recognised redeliveries).

        With `retry`, a batch whose earlier attempt did commit (the reply was lost) is not
        written again. With `ids_taken`, the rows' ids are taken in one statement right after
        the fence, in delivery order, and the event is set: the next batch can then be written
        beside this one on another connection, its ids all higher. `before_commit` is awaited
        last inside the transaction (the batch written before commits first); what it raises
        rolls this batch back and is raised as it is.
        """
        prepared = [self._prepare(vhost, delivery) for delivery in deliveries]
        try:
            async with self._pool.acquire() as connection, connection.transaction():
                # Before any id is taken (see queries.FENCE_CAPTURE): readers that fix a
                # selection wait for this commit, and the rows' capture time is after theirs.
                # Before the fence is asked for, so at or before the moment captured_at is taken.
                if ids_taken is not None or before_commit is not None:
                    await connection.execute(queries.BESIDE_LOCK_TIMEOUT)
                fence_sent = time.monotonic()
                captured_at = await connection.fetchval(queries.FENCE_CAPTURE, storable_text(vhost))
                owner = _Owner(session_id, storable_text(vhost), captured_at)
                # Fingerprints of acknowledged batches go first, so they can never be
                # claimed by a later, identical message.
                if forget:
                    await connection.execute(queries.FORGET_PENDING, list(forget))
                if retry and await connection.fetchval(queries.BATCH_COMMITTED, batch_id):
                    return WriteResult(already_committed=True)
                ids: list[int] | None = None
                if ids_taken is not None:
                    # The statement's values come back in no promised order: sorted, they follow
                    # the deliveries' order as a COPY taking them one by one would.
                    ids = sorted(row[0] for row in await connection.fetch(queries.TAKE_IDS, len(prepared)))
                    ids_taken.set()
                result = await self._write_part(connection, vhost, prepared, ids, owner)
                if result.pending:
                    await connection.execute(
                        queries.PENDING_ADD, batch_id, owner.session_id, owner.vhost, pack(result.pending)
                    )
                if forget_other_sessions:
                    await connection.execute(queries.FORGET_OTHER_SESSIONS, owner.vhost, session_id)
                # Every id was taken by now, and this much after captured_at at most: measured here
                # from before the fence, no round trip is needed to keep CAPTURE_MARGIN.
                margin = CAPTURE_MARGIN.total_seconds()
                if time.monotonic() - fence_sent >= margin:
                    # Rolled back: committing would break the bound selections by time rely on.
                    # The messages stay unacknowledged and the retry takes a new captured_at.
                    raise DatabaseUnavailable(
                        f"writing a batch: it took over {margin:.0f} s, so it was rolled back to be retried"
                    )
                if before_commit is not None:
                    await before_commit()
                return result
        except DATABASE_ERRORS as error:
            # Data errors of single rows were dealt with by _write_part: what is left is the
            # database's state, and the batch stays unacknowledged until it can be committed.
            raise database_error(error, "writing a batch") from error

    async def _write_part(
        self,
        connection: Connection,
        vhost: str,
        prepared: list[_Prepared],
        ids: list[int] | None,
        owner: "_Owner",
    ) -> WriteResult:
        """Write a part inside a savepoint; a part the data makes fail is split until isolated.

        `ids`, when taken ahead, holds one id per item of `prepared`.
        """
        try:
            async with connection.transaction():
                return await self._write_in(connection, vhost, prepared, ids, owner)
        except asyncpg.PostgresError as error:
            if not _is_data_error(error):
                raise
            if len(prepared) == 1:
                item_id = None if ids is None else ids[0]
                return await self._write_unstorable(connection, vhost, prepared[0], item_id, owner, error)
            log.warning("batch_split", extra={"batch_size": len(prepared), "error": describe(error)})
            middle = len(prepared) // 2
            first_ids, last_ids = (None, None) if ids is None else (ids[:middle], ids[middle:])
            result = await self._write_part(connection, vhost, prepared[:middle], first_ids, owner)
            result.merge(await self._write_part(connection, vhost, prepared[middle:], last_ids, owner))
            return result

    async def _write_in(
        self,
        connection: Connection,
        vhost: str,
        prepared: list[_Prepared],
        ids: list[int] | None,
        owner: "_Owner",
    ) -> WriteResult:
        result = WriteResult()
        already_stored: Counter[bytes] = Counter()
        redelivered = [item.fingerprint for item in prepared if item.redelivered]
        if redelivered:
            aliases = {
                item.legacy_fingerprint: item.fingerprint
                for item in prepared
                if item.redelivered and item.legacy_fingerprint is not None
            }
            matched = await _claim_pending(connection, redelivered, owner, aliases)
            already_stored.update(matched)
            # Matched fingerprints move to this batch (see queries.PENDING_OF_OTHER_SESSIONS).
            result.pending.extend(matched)
        kept, kept_ids = prepared, ids
        if already_stored:
            indexes = []
            for index, item in enumerate(prepared):
                if item.redelivered and already_stored[item.fingerprint]:
                    already_stored[item.fingerprint] -= 1
                    result.duplicates += 1
                else:
                    indexes.append(index)
            kept = [prepared[index] for index in indexes]
            kept_ids = None if ids is None else [ids[index] for index in indexes]
        captured_at = owner.captured_at
        records = [(*item.record, captured_at) for item in kept]
        result.pending.extend([item.fingerprint for item in kept])
        result.stored = len(records)
        # Keyed by the stored text of the name: always printable, safe as a metric label.
        result.stored_by_exchange.update([record[_EXCHANGE] for record in records])
        stored_bytes = result.stored_bytes
        for record in records:
            stored_bytes[record[_EXCHANGE]] += record[_BODY_SIZE]
        await _copy(connection, records, kept_ids)
        return result

    async def _write_unstorable(
        self,
        connection: Connection,
        vhost: str,
        item: _Prepared,
        item_id: int | None,
        owner: "_Owner",
        error: BaseException,
    ) -> WriteResult:
        """Store one message whose views PostgreSQL refused: raw bytes kept, views replaced."""
        row = list(item.record)
        reason = describe(error)
        row[MESSAGE_COLUMNS.index("properties")] = _json_reason(reason)
        row[MESSAGE_COLUMNS.index("headers")] = None
        log.error("message_unstorable", extra={"exchange": row[_EXCHANGE], "error": reason})
        await _copy(connection, [(*row, owner.captured_at)], None if item_id is None else [item_id])
        stored_exchange = row[_EXCHANGE]
        return WriteResult(
            stored=1,
            unstorable=1,
            stored_bytes=Counter({stored_exchange: row[_BODY_SIZE]}),
            stored_by_exchange=Counter({stored_exchange: 1}),
            pending=[item.fingerprint],
        )

    async def forget_pending(self, batch_ids: Sequence[int]) -> None:
        """Drop the redelivery fingerprints of batches whose acknowledgement was processed."""
        try:
            await self._pool.execute(queries.FORGET_PENDING, list(batch_ids))
        except DATABASE_ERRORS as error:
            raise database_error(error, "cleaning pending fingerprints") from error

    async def prune(self, older_than: timedelta) -> int:
        """Drop the partitions older than RETENTION; returns how many."""
        return await prune(self._pool, older_than)

    async def analyze_closed_partitions(self) -> list[str]:
        """ANALYZE each daily partition once its day is over (if nothing did yet); returns their names.

        Replays and `find` do not depend on statistics, but the operator's own queries do, and
        a day's partition no longer changes once the day is over: one ANALYZE keeps it right.
        """
        try:
            async with self._pool.acquire() as connection:
                names: list[str] = [
                    row[0]
                    for row in await connection.fetch(
                        queries.CLOSED_PARTITIONS_WITHOUT_STATISTICS, datetime.now(UTC)
                    )
                ]
                for name in names:
                    await connection.execute(await connection.fetchval(queries.ANALYZE_PARTITION, name))
        except DATABASE_ERRORS as error:
            raise database_error(error, "analysing partitions") from error
        return names

    async def ensure_partitions(self, days_ahead: int) -> int:
        """Create the daily partitions from today (UTC) on that do not exist yet."""
        today = datetime.now(UTC).date()
        try:
            async with self._pool.acquire() as connection, connection.transaction():
                await connection.execute(queries.PARTITION_LOCK)
                created: int = await connection.fetchval(queries.ENSURE_PARTITIONS, today, days_ahead + 1)
                return created
        except DATABASE_ERRORS as error:
            raise database_error(error, "creating partitions") from error


@dataclass(frozen=True, slots=True)
class _Owner:
    """The broker session and vhost (as stored) a batch's fingerprints belong to, and its capture time."""

    session_id: int
    vhost: str
    # Taken after the selection fence: every row of the batch carries it as captured_at.
    captured_at: datetime


async def _copy(connection: Connection, records: list[tuple[Any, ...]], ids: list[int] | None) -> None:
    """The rows of a batch, each ending with its capture time; with the ids taken for them, if any."""
    if not records:
        return
    columns: tuple[str, ...] = _COPY_COLUMNS
    if ids is not None:
        columns = _COPY_COLUMNS_WITH_ID
        records = [(row_id, *record) for row_id, record in zip(ids, records, strict=True)]
    await connection.copy_records_to_table(
        "messages", schema_name="rabbit_archive", columns=columns, records=records
    )


async def _claim_pending(
    connection: Connection, redelivered: list[bytes], owner: _Owner, aliases: dict[bytes, bytes]
) -> list[bytes]:
    """Match redelivered fingerprints against the vhost's other sessions' pending rows; returns the matched.

    A pending legacy fingerprint (`aliases`: legacy -> current) matches as the current one,
    and moves to this batch in the current form.

    The rows that match as read are locked until the batch commits and matched again as locked;
    what a row gave up leaves it (the row goes when nothing is left). Another daemon of the
    vhost may have taken from those rows or deleted them while this one waited for the lock:
    then what is still unmatched is looked for again, in rows it may have missed the first time.
    Each round after the first follows a commit of another transaction that took fingerprints,
    and rows only ever lose them, so the rounds end.
    """
    vhost, session_id = owner.vhost, owner.session_id
    wanted = list(redelivered)
    matched: list[bytes] = []
    while wanted:
        rows = await connection.fetch(queries.PENDING_OF_OTHER_SESSIONS, vhost, session_id)
        expected = claim(wanted, ((row[0], row[1]) for row in rows), aliases)
        if not expected.matched:
            break
        matching = [batch_id for batch_id, _ in expected.kept]
        locked = await connection.fetch(queries.PENDING_LOCK, vhost, session_id, matching)
        taken = claim(wanted, ((row[0], row[1]) for row in locked), aliases)
        for row_id, kept in taken.kept:
            if kept:
                await connection.execute(queries.PENDING_KEEP, row_id, kept)
            else:
                await connection.execute(queries.PENDING_DROP, row_id)
        matched.extend(taken.matched)
        if len(taken.matched) == len(expected.matched):
            break
        left = Counter(wanted)
        left.subtract(taken.matched)
        wanted = list(left.elements())
    return matched


async def prune(store_pool: "asyncpg.Pool[asyncpg.Record]", older_than: timedelta) -> int:
    """Drop every daily partition entirely older than now - older_than; returns how many.

    Driver errors become DatabaseUnavailable (DatabaseRefused when PostgreSQL refuses).
    """
    cutoff = datetime.now(UTC) - older_than
    try:
        async with store_pool.acquire() as connection:
            names = [row[0] for row in await connection.fetch(queries.PARTITIONS_BEFORE, cutoff)]
            for name in names:
                statement = await connection.fetchval(queries.DROP_PARTITION, name)
                await connection.execute(statement)
            await connection.execute(queries.DELETE_OLDER_DEFAULT, cutoff)
            await connection.execute(queries.PRUNE_COVERAGE, cutoff)
    except DATABASE_ERRORS as error:
        raise database_error(error, "pruning") from error
    return len(names)


def _json_reason(reason: str) -> str:
    return json.dumps({"$unstorable": reason})
