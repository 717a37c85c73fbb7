"""The inbox: a consumer's record of the messages it processed, written in the transaction of its work.

A key is recorded with INSERT ... ON CONFLICT DO NOTHING in the same transaction as the handler's
own writes, and the message is acknowledged only after the commit. Whatever happens between, the
two commit together or not at all: a crash before the commit leaves neither (the broker
redelivers), a crash after it leaves both (the redelivery is recognised as a duplicate), and of two
consumers holding copies of one message at once, the unique key lets exactly one through.
"""

from __future__ import annotations

import contextlib
import datetime
import enum
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

import asyncpg
from aio_pika.abc import AbstractIncomingMessage

from rabbit_archive.inbox.key import message_key
from rabbit_archive.inbox.sql import DEFAULT_TABLE, SETUP_LOCK, Statements, table_name

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

__all__ = [
    "Connection",
    "Handler",
    "Inbox",
    "InboxError",
    "InboxStats",
    "InboxTransaction",
    "Observer",
    "Outcome",
]

log = logging.getLogger(__name__)

# What a handler is given: a connection borrowed from the inbox's pool, inside the open transaction.
Connection: TypeAlias = "PoolConnectionProxy[asyncpg.Record]"
Handler: TypeAlias = Callable[[AbstractIncomingMessage, "Connection"], Awaitable[None]]

# Errors that say the server went away, not that the table or the statement is wrong.
_CONNECTION_ERRORS = (
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.TooManyConnectionsError,
)


class InboxError(Exception):
    """The inbox cannot work as configured: a table of another layout, or a key it cannot store."""


class Outcome(enum.Enum):
    """What became of one message."""

    PROCESSED = "processed"
    DUPLICATE = "duplicate"
    FAILED = "failed"


# Called after each message (metrics, logs): the outcome, the key (None when it could not be
# computed) and the message. It runs in the consumer's task and must not block.
Observer: TypeAlias = Callable[[Outcome, "str | None", AbstractIncomingMessage], None]


@dataclass(slots=True)
class InboxStats:
    """Counters since the inbox was created."""

    processed: int = 0
    duplicates: int = 0
    replays_processed: int = 0  # processed copies that carried x-replay-id (the original was never seen)
    failed: int = 0


@dataclass(frozen=True, slots=True)
class InboxTransaction:
    """An open transaction in which the message's key is recorded (or was found already recorded)."""

    connection: Connection
    key: str
    duplicate: bool
    replay_id: str | None


class Inbox:
    """Exactly-once processing of RabbitMQ messages for one consumer, over an asyncpg pool."""

    def __init__(
        self,
        pool: asyncpg.Pool[asyncpg.Record],
        consumer: str,
        *,
        key: Callable[[AbstractIncomingMessage], str] = message_key,
        table: str = DEFAULT_TABLE,
        on_outcome: Observer | None = None,
    ) -> None:
        """`consumer` names the handler whose keys these are; `table` is `name` or `schema.name`."""
        if not isinstance(consumer, str) or not consumer or "\x00" in consumer:
            raise ValueError("the inbox consumer name must be a non-empty string without NUL characters")
        self.consumer = consumer
        self.table = table_name(table)
        self.stats = InboxStats()
        self._pool = pool
        self._key = key
        self._sql = Statements(self.table)
        self._on_outcome = on_outcome

    async def setup(self) -> None:
        """Create the table if missing, and check that an existing table fits.

        Raises InboxError naming the table when it cannot be created or has another layout.
        """
        async with self._pool.acquire() as connection:
            try:
                async with connection.transaction():
                    await connection.execute(SETUP_LOCK, f"rabbit_archive.inbox {self.table}")
                    await connection.execute(self._sql.create_table)
                # The statement every message runs, tried once and rolled back: a table of the same
                # name made for something else fails here, not on the first message.
                probe = connection.transaction()
                await probe.start()
                try:
                    await connection.fetchval(self._sql.record, self.consumer, "", None)
                finally:
                    await probe.rollback()
            except asyncpg.PostgresError as error:
                if isinstance(error, _CONNECTION_ERRORS):
                    raise
                raise InboxError(
                    f"inbox table {self.table} cannot be used: {error} (it needs the columns consumer, "
                    "key, processed_at, replay_id and a primary key on (consumer, key); see README "
                    '"Handling replays in your consumers")'
                ) from error

    @contextlib.asynccontextmanager
    async def transaction(self, message: AbstractIncomingMessage) -> AsyncIterator[InboxTransaction]:
        """Open a transaction that records the message's key; commit when the block ends, roll back on error.

        When `tx.duplicate` is true the message was processed before: do nothing in the block.
        Acknowledge the message after the block, never inside it.
        """
        key: str | None = None
        try:
            key = self._key_of(message)
            replay_id = _replay_id(message)
            async with self._pool.acquire() as connection, connection.transaction():
                recorded = await connection.fetchval(self._sql.record, self.consumer, key, replay_id)
                tx = InboxTransaction(connection, key, recorded is None, replay_id)
                yield tx
        except Exception:
            self.stats.failed += 1
            self._observe(Outcome.FAILED, key, message)
            raise
        if tx.duplicate:
            self.stats.duplicates += 1
            self._observe(Outcome.DUPLICATE, key, message)
        else:
            self.stats.processed += 1
            if replay_id is not None:
                self.stats.replays_processed += 1
            self._observe(Outcome.PROCESSED, key, message)

    def handler(
        self, fn: Handler, *, requeue: bool = True
    ) -> Callable[[AbstractIncomingMessage], Awaitable[None]]:
        """A callback for aio-pika's `queue.consume`: `fn(message, connection)` once per key.

        A new key runs `fn` in the transaction that records it, commits, then acknowledges; a known
        key is acknowledged without calling `fn`. When anything fails the transaction rolls back and
        the message is rejected, requeued unless `requeue` is false (then the queue's dead-letter
        exchange, if any, receives it).
        """

        async def on_message(message: AbstractIncomingMessage) -> None:
            try:
                async with self.transaction(message) as tx:
                    if not tx.duplicate:
                        await fn(message, tx.connection)
            except Exception:
                log.warning(
                    "inbox.failed",
                    exc_info=True,
                    extra={
                        "consumer": self.consumer,
                        "message_id": message.message_id,
                        "requeue": requeue,
                    },
                )
                await message.reject(requeue=requeue)
                return
            # After the commit: if this ack is lost, the redelivery finds the key and is only acked.
            await message.ack()

        return on_message

    async def delete_older_than(self, age: datetime.timedelta) -> int:
        """Forget this consumer's keys processed more than `age` ago; returns how many.

        One statement that reads the whole table (run it off-peak, e.g. daily). A message replayed
        after its key is forgotten is processed again: keep keys longer than any replay you may need.
        """
        if not isinstance(age, datetime.timedelta) or age <= datetime.timedelta(0):
            raise ValueError(f"the age must be a positive datetime.timedelta, not {age!r}")
        async with self._pool.acquire() as connection:
            status = await connection.execute(self._sql.delete_older, self.consumer, age)
        return int(status.rsplit(" ", 1)[-1])

    def _key_of(self, message: AbstractIncomingMessage) -> str:
        key = self._key(message)
        # An empty key would make every message a duplicate of the first: refuse, never skip.
        if not isinstance(key, str) or not key or "\x00" in key:
            raise InboxError(f"the key function returned {key!r}: a key is a non-empty string without NUL")
        return key

    def _observe(self, outcome: Outcome, key: str | None, message: AbstractIncomingMessage) -> None:
        if self._on_outcome is None:
            return
        try:
            self._on_outcome(outcome, key, message)
        except Exception:
            # A metrics hook that fails must not turn a committed message into a rejected one.
            log.exception("inbox.hook_failed", extra={"consumer": self.consumer, "outcome": outcome.value})


def _replay_id(message: AbstractIncomingMessage) -> str | None:
    """The x-replay-id of a replayed copy, as text."""
    value = (message.headers or {}).get("x-replay-id")
    if isinstance(value, bytes | bytearray):
        value = bytes(value).decode("utf-8", "replace")
    if not isinstance(value, str):
        return None
    return value.replace("\x00", "\ufffd")
