"""A payment ledger that applies each payment once, originals, redeliveries and replays alike.

An aio-pika consumer writing to PostgreSQL through `rabbit_archive.inbox`. Adding an amount to a
balance is not idempotent (twice is wrong), so the inbox records each message's key in the same
transaction as the ledger writes: a replay or a redelivery of a payment already applied is
recognised and acknowledged without touching the balance. See README "Handling replays in your
consumers".

Run it (the tables are created if missing):

    python examples/inbox_consumer.py --amqp-url amqp://guest:guest@localhost:5672/ \
        --database-url postgresql://localhost/shop

then publish to exchange `payments`, routing key `payment.<anything>`, a JSON body such as
{"account": "alice", "amount_cents": 1250}. It prints one JSON line per message and stops on
SIGTERM or Ctrl-C.
"""

import argparse
import asyncio
import json
import os
import signal
from typing import Any

import aio_pika
import asyncpg
from aio_pika.abc import AbstractIncomingMessage

from rabbit_archive.inbox import Connection, Handler, Inbox, Outcome, message_key

EXCHANGE = "payments"
BINDING = "payment.#"
SCHEMA = """
CREATE TABLE IF NOT EXISTS balances (
    account text PRIMARY KEY,
    balance_cents bigint NOT NULL
);
CREATE TABLE IF NOT EXISTS ledger_entries (
    id bigserial PRIMARY KEY,
    account text NOT NULL,
    amount_cents bigint NOT NULL,
    message_key text NOT NULL,
    replay_id text,
    pid integer NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS unreadable_payments (
    id bigserial PRIMARY KEY,
    message_key text NOT NULL,
    body bytea NOT NULL,
    reason text NOT NULL
);
"""


async def apply_payment(message: AbstractIncomingMessage, connection: Connection) -> None:
    """Add the payment to its account: runs inside the inbox's transaction, so once per message."""
    key = message_key(message)
    try:
        payment = json.loads(message.body)
        account, amount = str(payment["account"]), int(payment["amount_cents"])
    except (ValueError, KeyError, TypeError) as error:
        # Kept for a person to look at: retrying cannot fix it, and dropping it would lose it.
        await connection.execute(
            "INSERT INTO unreadable_payments (message_key, body, reason) VALUES ($1, $2, $3)",
            key,
            message.body,
            f"{type(error).__name__}: {error}",
        )
        return
    replay_id = message.headers.get("x-replay-id")
    await connection.execute(
        "INSERT INTO ledger_entries (account, amount_cents, message_key, replay_id, pid)"
        " VALUES ($1, $2, $3, $4, $5)",
        account,
        amount,
        key,
        replay_id if isinstance(replay_id, str) else None,
        os.getpid(),
    )
    await connection.execute(
        "INSERT INTO balances (account, balance_cents) VALUES ($1, $2) ON CONFLICT (account)"
        " DO UPDATE SET balance_cents = balances.balance_cents + EXCLUDED.balance_cents",
        account,
        amount,
    )


def report(outcome: Outcome, key: str | None, message: AbstractIncomingMessage) -> None:
    """One JSON line per message on stdout."""
    replay_id = message.headers.get("x-replay-id")
    line = {"event": outcome.value, "key": key, "replay_id": replay_id, "pid": os.getpid()}
    print(json.dumps(line, default=str), flush=True)


async def prepare(pool: "asyncpg.Pool[asyncpg.Record]") -> None:
    """Create the example's tables; the lock lets several copies start at once."""
    async with pool.acquire() as connection, connection.transaction():
        await connection.execute("SELECT pg_advisory_xact_lock(hashtext('examples.inbox_consumer'))")
        await connection.execute(SCHEMA)


async def consume(
    amqp_url: str,
    database_url: str,
    *,
    queue_name: str = "ledger",
    prefetch: int = 10,
    handle: Handler = apply_payment,
) -> None:
    """Consume the queue until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    # One connection per message in flight: a handler holds its connection until the commit.
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=prefetch)
    try:
        await prepare(pool)
        inbox = Inbox(pool, consumer="ledger", on_outcome=report)
        await inbox.setup()
        async with await aio_pika.connect_robust(amqp_url) as connection:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=prefetch)
            exchange = await channel.declare_exchange(EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
            queue = await channel.declare_queue(
                queue_name, durable=True, arguments={"x-queue-type": "quorum"}
            )
            await queue.bind(exchange, BINDING)
            consumer_tag = await queue.consume(inbox.handler(handle))
            print(json.dumps({"event": "consuming", "queue": queue_name, "pid": os.getpid()}), flush=True)
            await stop.wait()
            # Unacknowledged messages go back to the queue when the channel closes.
            await queue.cancel(consumer_tag)
    finally:
        try:
            await asyncio.wait_for(pool.close(), 10)
        except TimeoutError:
            # A handler still holds its connection: its transaction rolls back and the broker
            # redelivers the message, so closing hard loses nothing.
            pool.terminate()
    stats: dict[str, Any] = {"event": "stopped", "pid": os.getpid()}
    stats |= {name: getattr(inbox.stats, name) for name in ("processed", "duplicates", "replays_processed")}
    print(json.dumps(stats), flush=True)


def main() -> None:
    """Parse the options and consume."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--amqp-url", default=os.environ.get("AMQP_URL", "amqp://guest:guest@localhost:5672/")
    )
    parser.add_argument(
        "--database-url", default=os.environ.get("DATABASE_URL", "postgresql://localhost/shop")
    )
    parser.add_argument("--queue", default="ledger")
    parser.add_argument("--prefetch", type=int, default=10)
    args = parser.parse_args()
    asyncio.run(consume(args.amqp_url, args.database_url, queue_name=args.queue, prefetch=args.prefetch))


if __name__ == "__main__":
    main()
