"""A message redelivered after a crash between commit and ack is recognised and not stored twice."""

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import aiormq
import aiormq.abc
import asyncpg
import pika
import pytest

from rabbit_archive.archive import content_header, frames
from rabbit_archive.archive.amqp_codec import Properties, encode_properties
from rabbit_archive.archive.db import create_pool, remember_timestamps
from rabbit_archive.archive.migrate import apply_migrations
from rabbit_archive.archive.records import fingerprint, legacy_fingerprint
from rabbit_archive.capture import store as store_module
from rabbit_archive.capture.batching import Delivery
from rabbit_archive.capture.pending import unpack
from rabbit_archive.capture.store import PostgresStore

pytestmark = pytest.mark.integration


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[PostgresStore]:
    """A migrated archive in the test's database, its pool set up as the daemon's."""
    pool = await create_pool(database_url, create_database=True, init=remember_timestamps)
    async with pool.acquire() as connection:
        await apply_migrations(connection)
    try:
        yield PostgresStore(pool)
    finally:
        await pool.close()


async def receive(
    amqp_url: str, queue: str, count: int
) -> tuple[aiormq.abc.AbstractConnection, list[Delivery]]:
    """Consume `count` messages without acknowledging them; returns the open connection too."""
    connection = await frames.connect(amqp_url)  # reads property bytes as the daemon does
    channel = await connection.channel()
    await channel.basic_qos(prefetch_count=count)
    received: list[Delivery] = []
    done = asyncio.Event()

    async def on_message(message: aiormq.abc.DeliveredMessage) -> None:
        delivery = message.delivery
        received.append(
            Delivery(
                delivery.delivery_tag,
                delivery.redelivered,
                delivery.exchange,
                delivery.routing_key,
                content_header.raw_properties(message.header),
                message.body,
            )
        )
        if len(received) == count:
            done.set()

    await channel.basic_consume(queue, on_message)
    await asyncio.wait_for(done.wait(), 10)
    return connection, received


async def fetch(database_url: str, query: str) -> list[Any]:
    """Rows of one query, from async test code."""
    import asyncpg

    connection = await asyncpg.connect(database_url)
    try:
        return list(await connection.fetch(query))
    finally:
        await connection.close()


async def row_count(store: PostgresStore, database_url: str) -> int:
    """Rows in the archive."""
    import asyncpg

    connection = await asyncpg.connect(database_url)
    try:
        return int(await connection.fetchval("SELECT count(*) FROM rabbit_archive.messages"))
    finally:
        await connection.close()


async def test_redelivered_committed_messages_are_not_stored_twice(
    store: PostgresStore, pika_channel: Any, amqp_url: str, database_url: str, vhost: str
) -> None:
    # A quorum queue, like the archive's: it adds x-delivery-count when it redelivers.
    pika_channel.queue_declare("archive", durable=True, arguments={"x-queue-type": "quorum"})
    for index in range(10):
        pika_channel.basic_publish(
            "", "archive", f"body-{index}".encode(), pika.BasicProperties(message_id=f"m-{index}")
        )
    # Two identical messages: only as many copies as were committed may be dropped.
    for _ in range(2):
        pika_channel.basic_publish("", "archive", b"twin", pika.BasicProperties(message_id="twin"))

    connection, first = await receive(amqp_url, "archive", 12)
    assert not any(delivery.redelivered for delivery in first)
    # Commit all ten and ONE twin, then "crash" before acknowledging anything.
    committed = [d for d in first if d.body != b"twin"] + [next(d for d in first if d.body == b"twin")]
    result = await store.write_batch(vhost, committed, batch_id=1, forget=(), session_id=1)
    assert result.stored == 11
    await connection.close()

    connection, again = await receive(amqp_url, "archive", 12)
    try:
        assert all(delivery.redelivered for delivery in again)
        assert all(b"x-delivery-count" in delivery.properties_raw for delivery in again)
        result = await store.write_batch(vhost, again, batch_id=2, forget=(), session_id=2)
    finally:
        await connection.close()
    assert (result.duplicates, result.stored) == (11, 1)
    assert await row_count(store, database_url) == 12


async def test_fingerprints_of_acknowledged_batches_are_forgotten(
    store: PostgresStore, pika_channel: Any, amqp_url: str, database_url: str, vhost: str
) -> None:
    pika_channel.queue_declare("archive", durable=True, arguments={"x-queue-type": "quorum"})
    pika_channel.basic_publish("", "archive", b"once", pika.BasicProperties(message_id="m"))
    connection, first = await receive(amqp_url, "archive", 1)
    await store.write_batch(vhost, first, batch_id=7, forget=(), session_id=1)
    # The ack was fenced: the fingerprint goes, so a later identical message is a new one.
    await store.forget_pending([7])
    await connection.close()
    connection, again = await receive(amqp_url, "archive", 1)
    try:
        result = await store.write_batch(vhost, again, batch_id=8, forget=(), session_id=2)
    finally:
        await connection.close()
    assert (result.duplicates, result.stored) == (0, 1)
    assert await row_count(store, database_url) == 2


async def test_an_empty_header_table_redelivered_with_a_delivery_count_is_recognised(
    store: PostgresStore, pika_channel: Any, amqp_url: str, database_url: str, vhost: str
) -> None:
    # aio-pika sends an empty header table by default; the quorum queue then adds its counter.
    pika_channel.queue_declare("archive", durable=True, arguments={"x-queue-type": "quorum"})
    pika_channel.basic_publish("", "archive", b"e", pika.BasicProperties(message_id="e", headers={}))
    connection, first = await receive(amqp_url, "archive", 1)
    await store.write_batch(vhost, first, batch_id=1, forget=(), session_id=1)
    await connection.close()
    connection, again = await receive(amqp_url, "archive", 1)
    try:
        result = await store.write_batch(vhost, again, batch_id=2, forget=(), session_id=2)
    finally:
        await connection.close()
    assert (result.duplicates, result.stored) == (1, 0)
    assert await row_count(store, database_url) == 1


async def test_fingerprints_forgotten_in_the_same_transaction_are_not_claimed(
    store: PostgresStore, pika_channel: Any, amqp_url: str, database_url: str, vhost: str
) -> None:
    # Batch 1 held message A and was acknowledged (fenced); an identical A delivered later and
    # redelivered after a lost connection is a new message and must be stored.
    pika_channel.queue_declare("archive", durable=True, arguments={"x-queue-type": "quorum"})
    pika_channel.basic_publish("", "archive", b"same", pika.BasicProperties(message_id="a"))
    connection, first = await receive(amqp_url, "archive", 1)
    await store.write_batch(vhost, first, batch_id=1, forget=(), session_id=1)
    await connection.close()
    connection, again = await receive(amqp_url, "archive", 1)
    try:
        result = await store.write_batch(vhost, again, batch_id=2, forget=[1], session_id=2)
    finally:
        await connection.close()
    assert (result.duplicates, result.stored) == (0, 1)
    assert await row_count(store, database_url) == 2


async def test_a_retried_batch_that_did_commit_is_not_written_again(
    store: PostgresStore, pika_channel: Any, amqp_url: str, database_url: str, vhost: str
) -> None:
    pika_channel.queue_declare("archive", durable=True, arguments={"x-queue-type": "quorum"})
    pika_channel.basic_publish("", "archive", b"once", pika.BasicProperties(message_id="r"))
    connection, first = await receive(amqp_url, "archive", 1)
    try:
        await store.write_batch(vhost, first, batch_id=5, forget=(), session_id=1)
        # The COMMIT reply was lost: the daemon retries the same batch.
        result = await store.write_batch(vhost, first, batch_id=5, forget=(), retry=True)
    finally:
        await connection.close()
    assert result.already_committed
    assert await row_count(store, database_url) == 1


async def test_a_producers_own_delivery_count_header_is_kept_and_its_redelivery_recognised(
    store: PostgresStore, pika_channel: Any, amqp_url: str, database_url: str
) -> None:
    """The quorum queue replaces the producer's x-delivery-count when it redelivers (measured)."""
    pika_channel.queue_declare("archive", durable=True, arguments={"x-queue-type": "quorum"})
    headers = {"x-delivery-count": 42, "a": 1}
    pika_channel.basic_publish("", "archive", b"counted", pika.BasicProperties(headers=headers))
    connection, first = await receive(amqp_url, "archive", 1)
    await store.write_batch("v", first, batch_id=1, forget=(), session_id=1)
    await connection.close()
    connection, again = await receive(amqp_url, "archive", 1)
    try:
        assert again[0].redelivered
        assert again[0].properties_raw != first[0].properties_raw  # the broker changed the header
        result = await store.write_batch("v", again, batch_id=2, forget=(), session_id=2)
    finally:
        await connection.close()
    assert (result.stored, result.duplicates) == (0, 1)
    rows = await fetch(database_url, "SELECT properties_raw, headers FROM rabbit_archive.messages")
    assert [bytes(row[0]) for row in rows] == [first[0].properties_raw]


async def test_a_recognised_redelivery_whose_ack_is_lost_is_recognised_again(
    store: PostgresStore, database_url: str
) -> None:
    """The matched fingerprint moves to the batch that matched it instead of going away."""
    message = Delivery(1, False, "orders", "k", b"\x00\x00", b"once")
    await store.write_batch("v", [message], batch_id=1, forget=(), session_id=1)
    redelivered = Delivery(9, True, "orders", "k", b"\x00\x00", b"once")
    for session in (2, 3, 4):  # each time the connection drops before the ack is processed
        result = await store.write_batch("v", [redelivered], batch_id=session, forget=(), session_id=session)
        assert (result.stored, result.duplicates) == (0, 1)
    # And a retry after a lost COMMIT reply of such a batch sees that it committed.
    retried = await store.write_batch("v", [redelivered], batch_id=4, forget=(), session_id=4, retry=True)
    assert retried.already_committed
    assert (await fetch(database_url, "SELECT count(*) FROM rabbit_archive.messages"))[0][0] == 1


async def test_fingerprints_of_earlier_sessions_go_when_a_later_one_reads_past_them(
    store: PostgresStore, database_url: str
) -> None:
    same = Delivery(1, False, "orders", "k", b"\x00\x00", b"same")
    await store.write_batch("v", [same], batch_id=1, forget=(), session_id=1)
    await store.write_batch("other-vhost", [same], batch_id=2, forget=(), session_id=1)
    fresh = Delivery(1, False, "orders", "k", b"\x00\x00", b"fresh")
    await store.write_batch("v", [fresh], batch_id=3, forget=(), session_id=2, forget_other_sessions=True)
    left = await fetch(
        database_url, "SELECT vhost, session_id FROM rabbit_archive.capture_pending_batches ORDER BY 1"
    )
    # The other vhost's session is not this vhost's to judge.
    assert [(row[0], row[1]) for row in left] == [("other-vhost", 1), ("v", 2)]
    # A new byte-identical message that arrives redelivered is stored, not taken for a duplicate.
    result = await store.write_batch(
        "v", [Delivery(5, True, "orders", "k", b"\x00\x00", b"same")], batch_id=4, forget=(), session_id=3
    )
    assert (result.stored, result.duplicates) == (1, 0)


async def test_a_fingerprint_written_before_pending_rows_named_their_vhost_still_matches(
    store: PostgresStore, database_url: str
) -> None:
    """Rows from before migration 0004 have vhost '' and session 0, and were matched in any vhost."""
    message = Delivery(1, False, "orders", "k", b"\x00\x00", b"old")
    # Those versions fingerprinted with BLAKE2b.
    digest = legacy_fingerprint("v", "orders", "k", b"\x00\x00", b"old")
    connection = await asyncpg.connect(database_url)
    try:
        await connection.execute(
            "INSERT INTO rabbit_archive.capture_pending_batches (batch_id, session_id, vhost, fingerprints)"
            " VALUES (1, 0, '', $1)",
            digest,
        )
    finally:
        await connection.close()
    redelivered = dataclasses.replace(message, redelivered=True)
    result = await store.write_batch("v", [redelivered], batch_id=2, forget=(), session_id=5)
    assert (result.stored, result.duplicates) == (0, 1)


async def test_fingerprints_pending_from_before_sha256_match_and_move_on_in_the_current_form(
    store: PostgresStore, database_url: str
) -> None:
    """A daemon upgraded after a crash: the batch it left in doubt was fingerprinted with BLAKE2b."""
    # As a quorum queue redelivers a message published without properties.
    counted = encode_properties(Properties(headers=[(b"x-delivery-count", ("l", 1))]))
    twice = [Delivery(1, False, "orders", "k", b"\x00\x00", b"twice")] * 2
    once = Delivery(2, False, "orders", "k", b"\x00\x00", b"once")
    other = Delivery(3, False, "orders", "k", b"\x00\x00", b"other")
    pending = [
        legacy_fingerprint("v", "orders", "k", b"\x00\x00", body) for body in (b"twice", b"twice", b"once")
    ]
    connection = await asyncpg.connect(database_url)
    try:
        await connection.execute(
            "INSERT INTO rabbit_archive.capture_pending_batches (batch_id, session_id, vhost, fingerprints)"
            " VALUES (1, 1, 'v', $1)",
            b"".join(pending),
        )
        redelivered = [
            dataclasses.replace(message, delivery_tag=tag, redelivered=True, properties_raw=counted)
            for tag, message in enumerate([*twice, once, other], start=1)
        ]
        result = await store.write_batch("v", redelivered, batch_id=2, forget=(), session_id=2)
        # Both copies of "twice" and "once" were stored before the crash; "other" was not.
        assert (result.stored, result.duplicates) == (1, 3)
        rows = await connection.fetch(
            "SELECT batch_id, fingerprints FROM rabbit_archive.capture_pending_batches ORDER BY batch_id"
        )
        # The old row gave everything up; the batch holds every message in the current form.
        assert [row[0] for row in rows] == [2]
        current = [
            fingerprint("v", "orders", "k", b"\x00\x00", body)
            for body in (b"twice", b"twice", b"once", b"other")
        ]
        assert sorted(unpack(rows[0][1])) == sorted(current)
        # Its ack lost as well: the next session still recognises every one of them.
        again = await store.write_batch("v", redelivered, batch_id=3, forget=(), session_id=3)
        assert (again.stored, again.duplicates) == (0, 4)
    finally:
        await connection.close()


async def test_a_redelivery_is_recognised_when_another_daemon_takes_the_copy_it_first_found(
    store: PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two pending copies of one message, two daemons of the vhost each redelivered one.

    The other daemon takes the older copy and has not committed; this one read that copy too
    and waits for the row's lock. Once the other commits, this one must find the second copy.
    """
    twin = Delivery(1, False, "orders", "k", b"\x00\x00", b"twin")
    await store.write_batch("v", [twin], batch_id=1, forget=(), session_id=10)
    await store.write_batch("v", [twin], batch_id=2, forget=(), session_id=10)
    redelivered = dataclasses.replace(twin, redelivered=True)
    held, release = asyncio.Event(), asyncio.Event()
    real_copy = store_module._copy

    async def copy_then_hold(connection: Any, records: list[Any], ids: list[int] | None) -> None:
        await real_copy(connection, records, ids)
        if not held.is_set():  # only the first write: the other daemon's
            held.set()
            await release.wait()

    monkeypatch.setattr(store_module, "_copy", copy_then_hold)
    other_daemon = asyncio.create_task(
        store.write_batch("v", [redelivered], batch_id=3, forget=(), session_id=30)
    )
    await asyncio.wait_for(held.wait(), 10)
    this_daemon = asyncio.create_task(
        store.write_batch("v", [redelivered], batch_id=4, forget=(), session_id=20)
    )
    await asyncio.sleep(0.5)  # this one has read the pending rows and waits for the older one's lock
    release.set()
    other, this = await asyncio.wait_for(asyncio.gather(other_daemon, this_daemon), 10)
    assert (other.stored, other.duplicates) == (0, 1)
    assert (this.stored, this.duplicates) == (0, 1)
