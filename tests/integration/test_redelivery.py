"""A message redelivered after a crash between commit and ack is recognised and not stored twice."""

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiormq
import aiormq.abc
import pika
import pytest

from archive import content_header
from archive.db import create_pool
from archive.migrate import apply_migrations
from capture.batching import Delivery
from capture.store import PostgresStore

pytestmark = pytest.mark.integration


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[PostgresStore]:
    """A migrated archive in the test's database."""
    pool = await create_pool(database_url, create_database=True)
    async with pool.acquire() as connection:
        await apply_migrations(connection)
    try:
        yield PostgresStore(pool)
    finally:
        await pool.close()


@pytest.fixture
def raw_headers() -> Any:
    """Keep raw content-header bytes in this process, as the daemon does, for this test only."""
    content_header.install()
    try:
        yield
    finally:
        content_header.uninstall()


async def receive(
    amqp_url: str, queue: str, count: int
) -> tuple[aiormq.abc.AbstractConnection, list[Delivery]]:
    """Consume `count` messages without acknowledging them; returns the open connection too."""
    connection = await aiormq.connect(amqp_url)
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


async def row_count(store: PostgresStore, database_url: str) -> int:
    """Rows in the archive."""
    import asyncpg

    connection = await asyncpg.connect(database_url)
    try:
        return int(await connection.fetchval("SELECT count(*) FROM rabbit_archive.messages"))
    finally:
        await connection.close()


@pytest.mark.usefixtures("raw_headers")
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
    result = await store.write_batch(vhost, committed, batch_id=1, forget=())
    assert result.stored == 11
    await connection.close()

    connection, again = await receive(amqp_url, "archive", 12)
    try:
        assert all(delivery.redelivered for delivery in again)
        assert all(b"x-delivery-count" in delivery.properties_raw for delivery in again)
        result = await store.write_batch(vhost, again, batch_id=2, forget=())
    finally:
        await connection.close()
    assert (result.duplicates, result.stored) == (11, 1)
    assert await row_count(store, database_url) == 12


@pytest.mark.usefixtures("raw_headers")
async def test_fingerprints_of_acknowledged_batches_are_forgotten(
    store: PostgresStore, pika_channel: Any, amqp_url: str, database_url: str, vhost: str
) -> None:
    pika_channel.queue_declare("archive", durable=True, arguments={"x-queue-type": "quorum"})
    pika_channel.basic_publish("", "archive", b"once", pika.BasicProperties(message_id="m"))
    connection, first = await receive(amqp_url, "archive", 1)
    await store.write_batch(vhost, first, batch_id=7, forget=())
    # The ack was fenced: the fingerprint goes, so a later identical message is a new one.
    await store.forget_pending([7])
    await connection.close()
    connection, again = await receive(amqp_url, "archive", 1)
    try:
        result = await store.write_batch(vhost, again, batch_id=8, forget=())
    finally:
        await connection.close()
    assert (result.duplicates, result.stored) == (0, 1)
    assert await row_count(store, database_url) == 2


@pytest.mark.usefixtures("raw_headers")
async def test_an_empty_header_table_redelivered_with_a_delivery_count_is_recognised(
    store: PostgresStore, pika_channel: Any, amqp_url: str, database_url: str, vhost: str
) -> None:
    # aio-pika sends an empty header table by default; the quorum queue then adds its counter.
    pika_channel.queue_declare("archive", durable=True, arguments={"x-queue-type": "quorum"})
    pika_channel.basic_publish("", "archive", b"e", pika.BasicProperties(message_id="e", headers={}))
    connection, first = await receive(amqp_url, "archive", 1)
    await store.write_batch(vhost, first, batch_id=1, forget=())
    await connection.close()
    connection, again = await receive(amqp_url, "archive", 1)
    try:
        result = await store.write_batch(vhost, again, batch_id=2, forget=())
    finally:
        await connection.close()
    assert (result.duplicates, result.stored) == (1, 0)
    assert await row_count(store, database_url) == 1


@pytest.mark.usefixtures("raw_headers")
async def test_fingerprints_forgotten_in_the_same_transaction_are_not_claimed(
    store: PostgresStore, pika_channel: Any, amqp_url: str, database_url: str, vhost: str
) -> None:
    # Batch 1 held message A and was acknowledged (fenced); an identical A delivered later and
    # redelivered after a lost connection is a new message and must be stored.
    pika_channel.queue_declare("archive", durable=True, arguments={"x-queue-type": "quorum"})
    pika_channel.basic_publish("", "archive", b"same", pika.BasicProperties(message_id="a"))
    connection, first = await receive(amqp_url, "archive", 1)
    await store.write_batch(vhost, first, batch_id=1, forget=())
    await connection.close()
    connection, again = await receive(amqp_url, "archive", 1)
    try:
        result = await store.write_batch(vhost, again, batch_id=2, forget=[1])
    finally:
        await connection.close()
    assert (result.duplicates, result.stored) == (0, 1)
    assert await row_count(store, database_url) == 2


@pytest.mark.usefixtures("raw_headers")
async def test_a_retried_batch_that_did_commit_is_not_written_again(
    store: PostgresStore, pika_channel: Any, amqp_url: str, database_url: str, vhost: str
) -> None:
    pika_channel.queue_declare("archive", durable=True, arguments={"x-queue-type": "quorum"})
    pika_channel.basic_publish("", "archive", b"once", pika.BasicProperties(message_id="r"))
    connection, first = await receive(amqp_url, "archive", 1)
    try:
        await store.write_batch(vhost, first, batch_id=5, forget=())
        # The COMMIT reply was lost: the daemon retries the same batch.
        result = await store.write_batch(vhost, first, batch_id=5, forget=(), retry=True)
    finally:
        await connection.close()
    assert result.already_committed
    assert await row_count(store, database_url) == 1
