"""Demo producer for deploy/compose.yaml: one JSON order a second on the topic exchange demo.orders.

Runs in the rabbit-archive image (aio-pika is installed there); reads DEMO_AMQP_URL.
"""

import asyncio
import json
import os
import random
import uuid
from datetime import UTC, datetime

import aio_pika

REGIONS = ("eu", "us", "ap")


async def main() -> None:
    url = os.environ.get("DEMO_AMQP_URL", "amqp://guest:guest@localhost:5672/")
    connection = await aio_pika.connect_robust(url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.declare_exchange("demo.orders", aio_pika.ExchangeType.TOPIC, durable=True)
        # A consumer's queue, so the messages also have somewhere to go besides the archive.
        queue = await channel.declare_queue("demo.billing", durable=True, arguments={"x-max-length": 1000})
        await queue.bind(exchange, "#")
        number = 0
        while True:
            number += 1
            region = random.choice(REGIONS)
            body = {"order": number, "region": region, "amount": round(random.uniform(5, 500), 2)}
            message = aio_pika.Message(
                json.dumps(body).encode(),
                content_type="application/json",
                message_id=str(uuid.uuid4()),
                timestamp=datetime.now(UTC),
                headers={"tenant": random.choice(("acme", "globex")), "attempt": 1},
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            )
            await exchange.publish(message, routing_key=f"{region}.created")
            print(f"published order {number} to demo.orders {region}.created", flush=True)
            await asyncio.sleep(1)


if __name__ == "__main__":
    asyncio.run(main())
