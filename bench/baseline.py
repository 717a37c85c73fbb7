"""The baselines: what plain aio-pika does on this broker, storing nothing.

- consumer: drains N pre-published messages from a quorum queue with the daemon's prefetch, acking in
  batches;
- publisher: publishes N messages straight into a quorum queue with publisher confirms, as many in
  flight as the replay allows itself (500, or 16 MiB of bodies);
- latency: under a steady load published as for the capture's (bench.common.publish_steadily), the
  time from publish to delivery to a consumer of a quorum queue: the broker's share of the capture
  latency, its floor on this machine at that moment;
- copy: PostgreSQL alone, taking the rows the daemon would write for N messages (built before the
  clock starts, by the daemon's own archive.records.message_row) into the archive table of a
  database of its own, in full batches (as many rows as the daemon's batcher takes under
  BATCH_SIZE and BATCH_MAX_BYTES), each one COPY and a commit: the database's share of the
  capture's drain, its bound.
"""

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

import aio_pika
import asyncpg
from aio_pika.abc import AbstractIncomingMessage

from bench.common import (
    EXCHANGE,
    REPLAY_WINDOW,
    REPLAY_WINDOW_BYTES,
    STEADY_EXCHANGE,
    Sizes,
    amqp_url,
    backlog_properties,
    fill,
    log,
    publish,
    publish_steadily,
    settle_database,
    window_size,
)
from rabbit_archive.archive.migrate import apply_migrations
from rabbit_archive.archive.records import MESSAGE_COLUMNS, message_row
from rabbit_archive.capture.batching import Batcher, Delivery
from rabbit_archive.config.settings import Settings

PREFETCH: int = Settings.model_fields["prefetch"].default  # the daemon's default, not the environment's
ACK_EVERY = 1000
BATCH_SIZE: int = Settings.model_fields["batch_size"].default
BATCH_MAX_BYTES: int = Settings.model_fields["batch_max_bytes"].default
COPY_COLUMNS = (*MESSAGE_COLUMNS, "captured_at")  # as capture/store.py writes them


async def consumer(vhost: str, sizes: Sizes, *, barrier: asyncio.Barrier | None = None) -> dict[str, Any]:
    """msg/s of a consumer that stores nothing, first delivery to last, from a quorum-queue backlog.

    With a barrier, the drain starts when the other parties are ready too (consumer_and_copy).
    """
    count = sizes.messages
    async with await aio_pika.connect(amqp_url(vhost)) as connection:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue("baseline", durable=True, arguments={"x-queue-type": "quorum"})
        await queue.bind(exchange, "#")
        log.log(f"baseline consumer: publishing {count} messages to vhost {vhost}")
        await fill(vhost, sizes)
        await channel.set_qos(prefetch_count=PREFETCH)
        done = asyncio.Event()
        received, first = 0, 0.0

        async def on_message(delivered: AbstractIncomingMessage) -> None:
            nonlocal received, first
            received += 1
            if received == 1:
                first = time.perf_counter()
            if received % ACK_EVERY == 0 or received == count:
                await delivered.ack(multiple=True)
            if received == count:
                done.set()

        if barrier is not None:
            await barrier.wait()
        log.log("baseline consumer: draining")
        started = time.perf_counter()
        tag = await queue.consume(on_message)
        await asyncio.wait_for(done.wait(), timeout=sizes.timeout())
        elapsed = time.perf_counter() - first
        await queue.cancel(tag)
        await queue.delete(if_unused=False, if_empty=False)
    return {
        "msg_per_s": (count - 1) / elapsed,
        "prefetch": PREFETCH,
        "ack_every": ACK_EVERY,
        "seconds_from_start": time.perf_counter() - started,
    }


async def publisher(vhost: str, sizes: Sizes) -> dict[str, Any]:
    """msg/s of a confirming publisher into a fresh quorum queue, first publish to last confirm."""
    async with await aio_pika.connect(amqp_url(vhost)) as connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(
            "baseline-publish", durable=True, arguments={"x-queue-type": "quorum"}
        )
        log.log(f"baseline publisher: publishing {sizes.messages} messages")
        seconds = await asyncio.wait_for(
            publish(vhost, sizes, queue=queue.name, window=REPLAY_WINDOW, window_bytes=REPLAY_WINDOW_BYTES),
            timeout=sizes.timeout(),
        )
        await queue.delete(if_unused=False, if_empty=False)
    return {
        "msg_per_s": sizes.messages / seconds,
        "seconds": seconds,
        "in_flight": window_size(sizes.body_size, REPLAY_WINDOW, REPLAY_WINDOW_BYTES),
    }


async def latency(vhost: str, sizes: Sizes, rate: float, seconds: float) -> list[float]:
    """Publish → delivered, in ms, of each message of a steady load at `rate` msg/s for `seconds`."""
    total = int(rate * seconds)
    delivered: list[float] = []
    done = asyncio.Event()
    async with await aio_pika.connect(amqp_url(vhost)) as connection:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(STEADY_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue("latency", durable=True, arguments={"x-queue-type": "quorum"})
        await queue.bind(exchange, "#")
        await channel.set_qos(prefetch_count=PREFETCH)

        async def on_message(message: AbstractIncomingMessage) -> None:
            published_us = message.headers["published_at_us"]
            assert isinstance(published_us, int)
            delivered.append((time.time_ns() // 1000 - published_us) / 1000)
            # Often enough that the prefetch window never closes at these rates.
            if len(delivered) % 100 == 0 or len(delivered) == total:
                await message.ack(multiple=True)
            if len(delivered) == total:
                done.set()

        tag = await queue.consume(on_message)
        await publish_steadily(vhost, sizes, total, rate)
        await asyncio.wait_for(done.wait(), timeout=sizes.timeout(total))
        await queue.cancel(tag)
        await queue.delete(if_unused=False, if_empty=False)
    return delivered


async def copy(database_url: str, sizes: Sizes, *, barrier: asyncio.Barrier | None = None) -> dict[str, Any]:
    """rows/s of COPY alone: the rows of N messages into the archive table, a transaction per full batch.

    With a barrier, the copying starts when the other parties are ready too (consumer_and_copy).
    """
    body = sizes.body
    # The daemon's own batcher decides how many go in a transaction: it counts each delivery's
    # properties and bookkeeping against BATCH_MAX_BYTES, so 1 MiB bodies make batches of 15.
    batcher = Batcher(BATCH_SIZE, BATCH_MAX_BYTES)
    for index in range(min(BATCH_SIZE, sizes.messages)):
        # The properties `fill` publishes the backlog with, so these are the rows capture stores.
        batcher.add(
            Delivery(index + 1, False, "bench", f"bench.{index % 10}", backlog_properties(index), body)
        )
        if batcher.full:
            break
    captured_at = datetime.now(UTC)
    rows = [
        (
            *message_row("bench", item.exchange, item.routing_key, False, item.properties_raw, item.body),
            captured_at,
        )
        for item in batcher.take()
    ]
    per_batch = len(rows)
    connection = await asyncpg.connect(database_url)
    try:
        await apply_migrations(connection)
        await settle_database()
        if barrier is not None:
            await barrier.wait()
        seconds, copied = 0.0, 0
        while copied < sizes.messages:
            batch = rows[: sizes.messages - copied]
            started = time.perf_counter()
            async with connection.transaction():
                await connection.copy_records_to_table(
                    "messages", schema_name="rabbit_archive", columns=COPY_COLUMNS, records=batch
                )
            seconds += time.perf_counter() - started
            copied += len(batch)
        await connection.execute("TRUNCATE rabbit_archive.messages")
    finally:
        await connection.close()
    log.log(f"baseline copy: {copied} rows at {copied / seconds:,.0f} rows/s, {per_batch} per transaction")
    return {"rows_per_s": copied / seconds, "seconds": seconds, "rows_per_transaction": per_batch}


async def consumer_and_copy(vhost: str, database_url: str, sizes: Sizes) -> dict[str, Any]:
    """The consumer and the COPY at once in this one process: the machine doing both, as capture does.

    Capture receives and stores together, on the same cores and in one process; each baseline
    above runs alone. The pair's rate is N over the longer of the two: what a daemon without any
    of capture's promises (fingerprints, fences, checks, the JSON views) could store at best.
    """
    barrier = asyncio.Barrier(2)
    consumed, copied = await asyncio.gather(
        consumer(vhost, sizes, barrier=barrier), copy(database_url, sizes, barrier=barrier)
    )
    seconds = max(consumed["seconds_from_start"], copied["seconds"])
    return {
        "msg_per_s": sizes.messages / seconds,
        "consumer_msg_per_s": consumed["msg_per_s"],
        "copy_rows_per_s": copied["rows_per_s"],
    }
