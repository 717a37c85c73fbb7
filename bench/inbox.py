"""The inbox phase: a consumer applying each message in a PostgreSQL transaction, with and without the inbox.

Every variant does the same work per message: one transaction on a connection from a pool of
POOL_SIZE that inserts one row, then an acknowledgement, PREFETCH messages in flight. With the
inbox (`rabbit_archive.inbox`, `inbox.handler`) the transaction also records the message's key;
"digest keys" computes the key from the message's content (as for producers that set no
message_id) instead of taking the message_id. Each drain empties a fresh quorum queue of N / ROUNDS
messages (timed from the first delivery to the last ack); the variants take turns, ROUNDS times,
in alternating order (A B C, C B A, ...), so that the load of a shared machine, which drifts over
seconds, weighs on each of them alike. A variant's rate is its messages over its drain time.

Alone (its own vhost and database, deleted afterwards): .venv/bin/python -m bench.inbox [--messages N]
"""

import argparse
import asyncio
import hashlib
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
import asyncpg
import httpx
from aio_pika.abc import AbstractIncomingMessage

from bench.common import MANAGEMENT, POSTGRES, Sizes, admin_sql, amqp_url, esc, fill, log
from rabbit_archive.inbox import Connection, Inbox, canonical_form

PREFETCH = 50
POOL_SIZE = 10
MAX_MESSAGES = 12_000  # per variant, over all rounds
QUICK_MAX_MESSAGES = 6_000  # the same with --quick, which stays under a minute
QUICK_ROUNDS = 4
ROUNDS = 6
VARIANTS = ("plain", "inbox", "inbox_digest")
EFFECTS = """
CREATE TABLE IF NOT EXISTS bench_effects (
    id bigserial PRIMARY KEY, message_id text, body_size integer NOT NULL, variant text NOT NULL
)"""
INSERT_EFFECT = "INSERT INTO bench_effects (message_id, body_size, variant) VALUES ($1, $2, $3)"


def digest_key(message: AbstractIncomingMessage) -> str:
    """message_key's digest path, taken even though the bench messages carry a message_id."""
    return "sha256:" + hashlib.sha256(canonical_form(message)).hexdigest()


async def drain(
    vhost: str, pool: "asyncpg.Pool[asyncpg.Record]", sizes: Sizes, variant: str, number: int
) -> float:
    """msg/s of one variant draining sizes.messages messages, first delivery to last ack."""
    queue_name = f"inbox-bench-{number}"
    async with await aio_pika.connect(amqp_url(vhost)) as connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(queue_name, durable=True, arguments={"x-queue-type": "quorum"})
        await fill(vhost, sizes, queue=queue_name)
        await channel.set_qos(prefetch_count=PREFETCH)
        done = asyncio.Event()
        received, first = 0, 0.0

        async def apply(message: AbstractIncomingMessage, connection: Connection) -> None:
            await connection.execute(INSERT_EFFECT, message.message_id, len(message.body), variant)

        async def plain(message: AbstractIncomingMessage) -> None:
            async with pool.acquire() as connection, connection.transaction():
                await connection.execute(INSERT_EFFECT, message.message_id, len(message.body), variant)
            await message.ack()

        handler: Callable[[AbstractIncomingMessage], Awaitable[None]] = plain
        if variant != "plain":
            # A consumer name per run: the same message ids come back in every run.
            name = f"bench-{number}"
            inbox = Inbox(pool, name, key=digest_key) if variant == "inbox_digest" else Inbox(pool, name)
            await inbox.setup()
            handler = inbox.handler(apply)

        async def on_message(message: AbstractIncomingMessage) -> None:
            nonlocal received, first
            if received == 0:
                first = time.perf_counter()
            await handler(message)
            received += 1
            if received == sizes.messages:
                done.set()

        tag = await queue.consume(on_message)
        await asyncio.wait_for(done.wait(), timeout=sizes.timeout())
        elapsed = time.perf_counter() - first
        await queue.cancel(tag)
        await queue.delete(if_unused=False, if_empty=False)
    log.log(
        f"inbox phase: {variant} drained {sizes.messages} messages at {sizes.messages / elapsed:,.0f} msg/s"
    )
    return sizes.messages / elapsed


async def run(vhost: str, database_url: str, sizes: Sizes, *, quick: bool = False) -> dict[str, Any]:
    """ROUNDS rounds of every variant (QUICK_ROUNDS, fewer messages: quick), in alternating order;
    rates and ratios to the plain consumer."""
    rounds = QUICK_ROUNDS if quick else ROUNDS
    per_drain = Sizes(
        max(1, min(sizes.messages, QUICK_MAX_MESSAGES if quick else MAX_MESSAGES) // rounds), sizes.body_size
    )
    pool = await asyncpg.create_pool(database_url, min_size=POOL_SIZE, max_size=POOL_SIZE)
    try:
        async with pool.acquire() as connection:
            await connection.execute(EFFECTS)
        seconds: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
        number = 0
        for round_number in range(rounds):
            for variant in VARIANTS if round_number % 2 == 0 else reversed(VARIANTS):
                rate = await drain(vhost, pool, per_drain, variant, number)
                seconds[variant].append(per_drain.messages / rate)
                number += 1
        async with pool.acquire() as connection:
            stored = await connection.fetchval("SELECT count(*) FROM bench_effects")
    finally:
        await pool.close()
    expected = rounds * len(VARIANTS) * per_drain.messages
    if stored != expected:
        raise RuntimeError(f"inbox phase: {stored} effects stored, expected {expected}")
    # Each variant's rate over all its rounds; the ratio also per round, where drift is smallest.
    rates = {variant: rounds * per_drain.messages / sum(times) for variant, times in seconds.items()}
    per_round = sorted(plain / inbox for plain, inbox in zip(seconds["plain"], seconds["inbox"], strict=True))
    return {
        "messages": rounds * per_drain.messages,
        "rounds": rounds,
        "prefetch": PREFETCH,
        "pool_size": POOL_SIZE,
        "drain_seconds": seconds,
        "plain_msg_per_s": rates["plain"],
        "inbox_msg_per_s": rates["inbox"],
        "inbox_digest_msg_per_s": rates["inbox_digest"],
        "ratio": rates["inbox"] / rates["plain"],
        "ratio_median_of_rounds": per_round[len(per_round) // 2],
        "digest_ratio": rates["inbox_digest"] / rates["plain"],
    }


async def alone(sizes: Sizes) -> dict[str, Any]:
    """The phase in its own vhost and database, deleted afterwards whatever happens."""
    tag = uuid.uuid4().hex[:10]
    vhost, database = f"bench-{tag}-inbox", f"bench_{tag}"
    async with httpx.AsyncClient(base_url=MANAGEMENT, auth=("guest", "guest"), timeout=10) as api:
        try:
            (await api.put(f"/api/vhosts/{esc(vhost)}")).raise_for_status()
            everything = {"configure": ".*", "write": ".*", "read": ".*"}
            (await api.put(f"/api/permissions/{esc(vhost)}/guest", json=everything)).raise_for_status()
            await admin_sql(f'CREATE DATABASE "{database}"')
            return await run(vhost, f"{POSTGRES}/{database}", sizes)
        finally:
            await api.delete(f"/api/vhosts/{esc(vhost)}")
            await admin_sql(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


def main() -> None:
    """Run the inbox phase alone and print its result as JSON."""
    parser = argparse.ArgumentParser(prog="python -m bench.inbox", description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=MAX_MESSAGES, help="messages per variant")
    parser.add_argument("--body-size", type=int, default=512)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(alone(Sizes(args.messages, args.body_size))), indent=2))


if __name__ == "__main__":
    main()
