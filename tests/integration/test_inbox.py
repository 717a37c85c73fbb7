"""The inbox on the real broker and database: failures, concurrent copies, crashes; each side effect once."""

import asyncio
import datetime
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aio_pika
import asyncpg
import pytest
from aio_pika.abc import AbstractIncomingMessage

from rabbit_archive.inbox import Connection, Inbox, InboxError, Outcome, message_key
from tests.conftest import run_sql
from tests.support.inbox import EXCHANGE, QUEUE, Consumer, fresh_database, payment, publish, replay_copy
from tests.support.services import Services

pytestmark = pytest.mark.integration

PAIRS = 200


@pytest.fixture
def app_database(services: Services) -> Iterator[str]:
    """A fresh database for the consuming application."""
    with fresh_database(services) as url:
        yield url


@pytest.fixture
async def pool(app_database: str) -> AsyncIterator["asyncpg.Pool[asyncpg.Record]"]:
    pool = await asyncpg.create_pool(app_database, min_size=1, max_size=4)
    async with pool.acquire() as connection:
        await connection.execute("CREATE TABLE effects (key text NOT NULL, attempt integer NOT NULL)")
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
async def channel(amqp_url: str) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    async with await aio_pika.connect(amqp_url) as connection:
        yield await connection.channel()


async def quorum_queue(
    channel: aio_pika.abc.AbstractChannel, name: str = "work"
) -> aio_pika.abc.AbstractQueue:
    # A quorum queue adds x-delivery-count on redelivery: the key must not see it.
    return await channel.declare_queue(name, durable=True, arguments={"x-queue-type": "quorum"})


async def wait_until(predicate: Any) -> None:
    """Poll a condition that callbacks of the running loop make true (the test's timeout bounds it)."""
    while not predicate():  # noqa: ASYNC110 - the condition is a counter, there is no event to await
        await asyncio.sleep(0.02)


@pytest.mark.timeout(30)
async def test_a_handler_that_fails_once_has_its_side_effect_once_and_its_key_once(
    pool: "asyncpg.Pool[asyncpg.Record]", channel: aio_pika.abc.AbstractChannel, amqp_url: str
) -> None:
    queue = await quorum_queue(channel)
    seen: list[tuple[bool | None, Any]] = []
    outcomes: list[Outcome] = []

    async def handle(message: AbstractIncomingMessage, connection: Connection) -> None:
        seen.append((message.redelivered, message.headers.get("x-delivery-count")))
        await connection.execute("INSERT INTO effects VALUES ($1, $2)", message_key(message), len(seen))
        if len(seen) == 1:
            raise RuntimeError("the first attempt fails after its write")

    inbox = Inbox(pool, "work", on_outcome=lambda outcome, key, message: outcomes.append(outcome))
    await inbox.setup()
    await queue.consume(inbox.handler(handle))
    # No message_id (aio-pika would add a random one): the key is the digest, and the redelivery
    # carries x-delivery-count.
    await publish(amqp_url, [("", "work", *payment("alice", 1))])
    await wait_until(lambda: inbox.stats.processed == 1)

    assert seen == [(False, None), (True, 1)]
    async with pool.acquire() as connection:
        effects = await connection.fetch("SELECT key, attempt FROM effects")
        keys = await connection.fetch("SELECT key, replay_id FROM rabbit_archive_inbox")
    assert [tuple(row) for row in effects] == [(keys[0]["key"], 2)]  # the first write was rolled back
    assert len(keys) == 1
    assert keys[0]["key"].startswith("sha256:")
    assert keys[0]["replay_id"] is None
    assert outcomes == [Outcome.FAILED, Outcome.PROCESSED]
    assert (inbox.stats.failed, inbox.stats.duplicates) == (1, 0)
    await asyncio.sleep(0.2)
    declared = await quorum_queue(channel)
    assert declared.declaration_result.message_count == 0  # acknowledged after the commit


@pytest.mark.timeout(30)
async def test_the_transaction_form_duplicates_and_counters(
    pool: "asyncpg.Pool[asyncpg.Record]", channel: aio_pika.abc.AbstractChannel, amqp_url: str
) -> None:
    queue = await quorum_queue(channel)
    raw, body = payment("alice", 100)
    replay_id = str(uuid.uuid4())
    await publish(amqp_url, [("", "work", replay_copy(raw, "payment.eu", replay_id, 7), body)] * 2)
    await publish(amqp_url, [("", "work", raw, b"another")])
    first, second, third = [await queue.get(timeout=5) for _ in range(3)]
    inbox = Inbox(pool, "transactions")
    await inbox.setup()

    async with inbox.transaction(first) as tx:
        assert not tx.duplicate
        assert tx.replay_id == replay_id
        await tx.connection.execute("INSERT INTO effects VALUES ($1, 1)", tx.key)
    await first.ack()
    async with inbox.transaction(second) as tx:
        assert tx.duplicate
        assert tx.key == message_key(first)
    await second.ack()

    async def fail_inside() -> None:
        async with inbox.transaction(third) as tx:
            await tx.connection.execute("INSERT INTO effects VALUES ($1, 3)", tx.key)
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await fail_inside()
    await third.reject(requeue=True)

    async with pool.acquire() as connection:
        assert await connection.fetchval("SELECT count(*) FROM effects") == 1
        rows = await connection.fetch("SELECT consumer, key, replay_id FROM rabbit_archive_inbox")
    assert [tuple(row) for row in rows] == [("transactions", message_key(first), replay_id)]
    stats = inbox.stats
    assert (stats.processed, stats.duplicates, stats.replays_processed, stats.failed) == (1, 1, 1, 1)


@pytest.mark.timeout(30)
async def test_a_failing_outcome_hook_changes_no_outcome(
    pool: "asyncpg.Pool[asyncpg.Record]", channel: aio_pika.abc.AbstractChannel, amqp_url: str
) -> None:
    queue = await quorum_queue(channel)
    await publish(amqp_url, [("", "work", *payment("carol", 5))])

    def broken(outcome: Outcome, key: str | None, message: AbstractIncomingMessage) -> None:
        raise RuntimeError("metrics are down")

    inbox = Inbox(pool, "work", on_outcome=broken)
    await inbox.setup()
    await queue.consume(inbox.handler(lambda message, connection: asyncio.sleep(0)))
    await wait_until(lambda: inbox.stats.processed == 1)
    await asyncio.sleep(0.2)
    assert inbox.stats.failed == 0
    assert (await quorum_queue(channel)).declaration_result.message_count == 0


@pytest.mark.timeout(30)
async def test_retention_forgets_old_keys_of_its_own_consumer_only(
    pool: "asyncpg.Pool[asyncpg.Record]",
) -> None:
    mine, other = Inbox(pool, "mine", table="keys_in_test"), Inbox(pool, "other", table="keys_in_test")
    await mine.setup()
    async with pool.acquire() as connection:
        await connection.execute(
            """INSERT INTO keys_in_test (consumer, key, processed_at)
               SELECT consumer, 'k' || n, now() - make_interval(days => n)
               FROM unnest(ARRAY['mine', 'other']) AS consumer, generate_series(0, 9) AS n"""
        )
    assert await mine.delete_older_than(datetime.timedelta(days=5, hours=12)) == 4
    assert await other.delete_older_than(datetime.timedelta(days=9, hours=12)) == 0
    async with pool.acquire() as connection:
        left = await connection.fetch("SELECT consumer, count(*) FROM keys_in_test GROUP BY 1 ORDER BY 1")
    assert [tuple(row) for row in left] == [("mine", 6), ("other", 10)]


@pytest.mark.timeout(30)
async def test_setup_is_safe_to_race_and_refuses_a_table_of_another_layout(
    pool: "asyncpg.Pool[asyncpg.Record]",
) -> None:
    async with pool.acquire() as connection:
        await connection.execute("CREATE SCHEMA billing")
        await connection.execute("CREATE TABLE billing.not_an_inbox (consumer text, key text)")
    # Replicas that start at once: the advisory lock keeps CREATE TABLE from racing.
    await asyncio.gather(*(Inbox(pool, f"c{n}", table="billing.inbox").setup() for n in range(4)))
    await Inbox(pool, "again", table="billing.inbox").setup()
    with pytest.raises(InboxError, match=r"billing\.not_an_inbox cannot be used"):
        await Inbox(pool, "c", table="billing.not_an_inbox").setup()
    with pytest.raises(InboxError, match=r"missing_schema\.inbox"):
        await Inbox(pool, "c", table="missing_schema.inbox").setup()


@pytest.mark.timeout(30)
async def test_a_key_function_that_returns_no_usable_key_fails_the_message_instead_of_skipping_it(
    pool: "asyncpg.Pool[asyncpg.Record]", channel: aio_pika.abc.AbstractChannel
) -> None:
    queue = await quorum_queue(channel)
    await channel.default_exchange.publish(aio_pika.Message(b"x"), "work")
    message = await queue.get(timeout=5)
    inbox = Inbox(pool, "work", key=lambda message: "")
    await inbox.setup()
    with pytest.raises(InboxError, match="non-empty string"):
        async with inbox.transaction(message):
            pass
    await message.reject(requeue=True)
    assert inbox.stats.failed == 1


@pytest.mark.timeout(60)
def test_two_consumer_processes_receiving_originals_and_replays_at_once_apply_each_payment_once(
    amqp_url: str, app_database: str
) -> None:
    # One message in hand each: the broker gives an original to one process and its copy, published
    # right after it, to the other, and both INSERT the same key at the same moment.
    consumers = [Consumer(amqp_url, app_database, prefetch=1) for _ in range(2)]
    try:
        for consumer in consumers:
            consumer.wait_consuming()
        messages = []
        expected: Counter[str] = Counter()
        for n in range(PAIRS):
            # Half with a message_id, half keyed by the digest of the message as first published.
            raw, body = payment(f"acct-{n % 7}", n + 1, message_id=f"pay-{n}" if n % 2 else None, seq=n)
            copy = replay_copy(raw, "payment.eu", "5f0c4c1e-6a43-4c52-9a35-0b3d1c3f2a10", n + 1)
            # Back to back, so that the broker hands the original and its copy to the two processes.
            messages += [(EXCHANGE, "payment.eu", raw, body), ("", QUEUE, copy, body)]
            expected[f"acct-{n % 7}"] += n + 1
        asyncio.run(publish(amqp_url, messages))
        consumers[0].wait_for(
            lambda: sum(len(c.handled()) for c in consumers) >= 2 * PAIRS, 40, f"{2 * PAIRS} handled"
        )
        for consumer in consumers:
            assert consumer.stop() == 0, consumer.output()
        events = [event for consumer in consumers for event in consumer.handled()]
        processed_by = {consumer.pid: len(consumer.events("processed")) for consumer in consumers}
    finally:
        for consumer in consumers:
            consumer.close()

    by_key: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        by_key.setdefault(event["key"], []).append(event)
    assert len(by_key) == PAIRS
    assert all(sorted(e["event"] for e in pair) == ["duplicate", "processed"] for pair in by_key.values())
    # The two copies of a message were with different processes, at the same time, most of the time.
    split = sum(1 for pair in by_key.values() if pair[0]["pid"] != pair[1]["pid"])
    print(f"pairs split across the two processes: {split} of {PAIRS}")
    assert split >= PAIRS // 2
    assert all(processed_by.values()), processed_by

    ledger = run_sql(app_database, "SELECT message_key, count(*) AS n FROM ledger_entries GROUP BY 1")
    assert len(ledger) == PAIRS
    assert {row["n"] for row in ledger} == {1}
    assert {row["message_key"] for row in ledger} == set(by_key)
    balances = run_sql(app_database, "SELECT account, balance_cents FROM balances")
    assert {row["account"]: row["balance_cents"] for row in balances} == expected
    assert run_sql(app_database, "SELECT count(*) FROM rabbit_archive_inbox")[0][0] == PAIRS


@pytest.mark.timeout(60)
@pytest.mark.parametrize("moment", ["before-commit", "after-commit"])
def test_a_consumer_killed_mid_message_applies_it_exactly_once_after_restart(
    amqp_url: str, app_database: str, moment: str
) -> None:
    """SIGKILL between the handler's writes and the commit (and between the commit and the ack)."""
    worker = Consumer(amqp_url, app_database, worker_mode=moment)
    restarted: Consumer | None = None
    try:
        worker.wait_consuming()
        raw, body = payment("bob", 4200)  # no message_id: the redelivery must give the same digest
        asyncio.run(publish(amqp_url, [(EXCHANGE, "payment.eu", raw, body)]))
        if moment == "before-commit":
            worker.wait_for(lambda: bool(worker.events("paused")), 20, "the handler's writes")
            [paused] = worker.events("paused")
            key = paused["key"]
            # Written, not committed: nobody sees the entry yet.
            assert run_sql(app_database, "SELECT count(*) FROM ledger_entries")[0][0] == 0
            worker.kill()
        else:
            assert worker.process.wait(20) == -9, worker.output()
            [processed] = worker.events("processed")
            key = processed["key"]
            assert run_sql(app_database, "SELECT count(*) FROM ledger_entries")[0][0] == 1

        restarted = Consumer(amqp_url, app_database).wait_consuming()
        restarted.wait_handled(1)
        [event] = restarted.handled()
        # The redelivery (with a quorum queue's x-delivery-count) has the same key.
        assert event["key"] == key
        assert event["event"] == ("processed" if moment == "before-commit" else "duplicate")
    finally:
        worker.close()
        if restarted is not None:
            restarted.close()
    rows = run_sql(app_database, "SELECT message_key, amount_cents FROM ledger_entries")
    assert [tuple(row) for row in rows] == [(key, 4200)]
    assert run_sql(app_database, "SELECT balance_cents FROM balances WHERE account = 'bob'")[0][0] == 4200
    keys = run_sql(app_database, "SELECT key FROM rabbit_archive_inbox WHERE consumer = 'ledger'")
    assert [row["key"] for row in keys] == [key]
