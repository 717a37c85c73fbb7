"""Two batches written at once (capture/consumer.py) against the real PostgreSQL: a lock wait that
goes through the daemon's own wait (the second batch waiting for the first to commit) ends.

The cycle: the second batch holds its table locks and waits, in the daemon, for the first; DDL on
the archive (a partition created or dropped) queues behind the second; the first, which took its
ids but had not reached its COPY yet, queues behind the DDL. PostgreSQL sees no deadlock. The
first's lock wait times out instead (BESIDE_LOCK_TIMEOUT), the second rolls back, the DDL goes
through, and both are written again, in order.
"""

import asyncio
import time
from typing import Any

import asyncpg
import pytest

from rabbit_archive.archive.errors import DatabaseUnavailable
from rabbit_archive.capture import store as store_module
from rabbit_archive.capture.batching import Delivery
from rabbit_archive.capture.consumer import _EarlierBatchFailed, _Write
from rabbit_archive.capture.store import PostgresStore
from tests.integration.test_redelivery import store  # noqa: F401  (the migrated-store fixture)

pytestmark = pytest.mark.integration


def delivery(tag: int, body: bytes) -> Delivery:
    return Delivery(tag, False, "orders", "created", b"\x00\x00", body)


async def test_a_lock_wait_through_the_daemons_own_wait_times_out_and_both_batches_follow_in_order(
    store: PostgresStore,  # noqa: F811
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first_holding, release_first = asyncio.Event(), asyncio.Event()
    real_copy = store_module._copy

    async def copy_after_release(connection: Any, records: list[Any], ids: list[int] | None) -> None:
        if (
            records
            and records[0][store_module.MESSAGE_COLUMNS.index("body")] == b"first"
            and not first_holding.is_set()
        ):
            first_holding.set()  # ids taken, the COPY not begun: no lock on the archive yet
            await release_first.wait()
        await real_copy(connection, records, ids)

    monkeypatch.setattr(store_module, "_copy", copy_after_release)
    first, second = _Write(), _Write()

    async def write_first() -> None:
        try:
            await store.write_batch("/", [delivery(1, b"first")], 1, [], ids_taken=first.ids_taken)
        except BaseException:
            first.mark_failed()
            raise
        first.mark_committed()

    first_attempt = asyncio.create_task(write_first())
    await asyncio.wait_for(first_holding.wait(), 10)
    second_waiting = asyncio.Event()

    async def wait_for_first() -> None:
        second_waiting.set()  # copied, its locks held until it commits or rolls back
        await first.commit_or_fail()

    second_attempt = asyncio.create_task(
        store.write_batch(
            "/", [delivery(2, b"second")], 2, [], ids_taken=second.ids_taken, before_commit=wait_for_first
        )
    )
    await asyncio.wait_for(second_waiting.wait(), 10)
    ddl = await asyncpg.connect(database_url)
    try:
        lock_table = asyncio.create_task(
            ddl.execute("BEGIN; LOCK TABLE rabbit_archive.messages IN ACCESS EXCLUSIVE MODE; COMMIT")
        )
        await asyncio.sleep(0.5)  # queued behind the second batch
        assert not lock_table.done()
        started = time.monotonic()
        release_first.set()  # the first's COPY queues behind the DDL: the cycle is closed
        with pytest.raises(DatabaseUnavailable, match="lock_timeout"):
            await asyncio.wait_for(first_attempt, 30)
        with pytest.raises(_EarlierBatchFailed):
            await asyncio.wait_for(second_attempt, 10)
        assert time.monotonic() - started < 15
        await asyncio.wait_for(lock_table, 10)  # the DDL went through, then lets go
        await ddl.execute("SELECT 1")
    finally:
        release_first.set()
        for task in (first_attempt, second_attempt):
            task.cancel()
        await asyncio.gather(first_attempt, second_attempt, return_exceptions=True)
        await ddl.close(timeout=5)
    # Written again, in order, as the consumer does: the first, then the second after it.
    await store.write_batch("/", [delivery(1, b"first")], 1, [], retry=True, ids_taken=asyncio.Event())
    await store.write_batch("/", [delivery(2, b"second")], 2, [], retry=True, ids_taken=asyncio.Event())
    connection = await asyncpg.connect(database_url)
    try:
        bodies = [
            row[0] for row in await connection.fetch("SELECT body FROM rabbit_archive.messages ORDER BY id")
        ]
    finally:
        await connection.close()
    assert bodies == [b"first", b"second"]
