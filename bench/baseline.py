"""The baselines: what plain aio-pika does on this broker, storing nothing.

- consumer: drains N pre-published messages from a quorum queue with the daemon's prefetch, acking in
  batches;
- publisher: publishes N messages straight into a quorum queue with publisher confirms, as many in
  flight as the replay allows itself (500, or 16 MiB of bodies);
- latency: under a steady load published as for the capture's (bench.common.publish_steadily), the
  time from publish to delivery to a consumer of a quorum queue: the broker's share of the capture
  latency, its floor on this machine at that moment.
"""

import asyncio
import time
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from bench.common import (
    EXCHANGE,
    REPLAY_WINDOW,
    REPLAY_WINDOW_BYTES,
    STEADY_EXCHANGE,
    Sizes,
    amqp_url,
    log,
    publish,
    publish_steadily,
    window_size,
)
from rabbit_archive.config.settings import Settings

PREFETCH: int = Settings.model_fields["prefetch"].default  # the daemon's default, not the environment's
ACK_EVERY = 1000


async def consumer(vhost: str, sizes: Sizes) -> dict[str, Any]:
    """msg/s of a consumer that stores nothing, first delivery to last, from a quorum-queue backlog."""
    count = sizes.messages
    async with await aio_pika.connect(amqp_url(vhost)) as connection:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue("baseline", durable=True, arguments={"x-queue-type": "quorum"})
        await queue.bind(exchange, "#")
        log.log(f"baseline consumer: publishing {count} messages to vhost {vhost}")
        await publish(vhost, sizes)
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

        log.log("baseline consumer: draining")
        tag = await queue.consume(on_message)
        await asyncio.wait_for(done.wait(), timeout=sizes.timeout())
        elapsed = time.perf_counter() - first
        await queue.cancel(tag)
        await queue.delete(if_unused=False, if_empty=False)
    return {"msg_per_s": (count - 1) / elapsed, "prefetch": PREFETCH, "ack_every": ACK_EVERY}


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
