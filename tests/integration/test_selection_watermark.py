"""A selection is fixed safely under concurrent capture commits, and a page reads only its partitions.

Archive ids are taken when a batch is copied but become visible when it commits: with two
capture transactions in flight, a lower id can appear after a reader saw a higher one. A
reader must never pass such an id (a replay's cursor would skip it for good), and a batch's
capture time must be later than any selection fixed before it committed, so that consecutive
`--since`/`--until` slices close to now never lose a batch.
"""

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from rabbit_archive.archive import queries
from rabbit_archive.archive.amqp_codec import Properties, encode_properties
from rabbit_archive.capture import store as store_module
from rabbit_archive.capture.batching import Delivery
from rabbit_archive.capture.store import PostgresStore
from rabbit_archive.replay import selection
from rabbit_archive.replay.filters import Filters, where_clause
from tests.integration.test_redelivery import store  # noqa: F401  (the migrated-store fixture)

pytestmark = pytest.mark.integration

BODY = store_module.MESSAGE_COLUMNS.index("body")


def delivery(tag: int, body: bytes) -> Delivery:
    return Delivery(tag, False, "orders", "eu.created", encode_properties(Properties()), body)


@pytest.fixture
async def reader(database_url: str, store: PostgresStore) -> AsyncIterator[asyncpg.Connection]:  # noqa: F811
    connection = await asyncpg.connect(database_url)
    await selection.setup_codecs(connection)
    try:
        yield connection
    finally:
        await connection.close()


async def test_a_lower_id_committed_after_a_higher_one_is_not_skipped(
    store: PostgresStore,  # noqa: F811
    reader: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    copied, release = asyncio.Event(), asyncio.Event()
    real_copy = store_module._copy

    async def copy_then_hold(connection: Any, records: list[Any], ids: list[int] | None) -> None:
        await real_copy(connection, records, ids)
        if records and records[0][BODY] == b"first":
            copied.set()
            await release.wait()  # the first batch has its ids but has not committed

    monkeypatch.setattr(store_module, "_copy", copy_then_hold)
    first = asyncio.create_task(store.write_batch("/", [delivery(1, b"first")], batch_id=1, forget=[]))
    await asyncio.wait_for(copied.wait(), 10)
    await store.write_batch("/", [delivery(2, b"second")], batch_id=2, forget=[])  # higher id, committed

    async def listed() -> list[bytes]:
        return [message.body async for message in selection.messages(reader, Filters())]

    listing = asyncio.create_task(listed())
    await asyncio.sleep(0.5)
    # The reader waits for the transaction in flight instead of fixing the selection past it.
    assert not listing.done()
    release.set()
    await first
    assert await asyncio.wait_for(listing, 10) == [b"first", b"second"]


async def test_a_batch_committed_after_a_selection_is_fixed_is_captured_after_it(
    store: PostgresStore,  # noqa: F811
    reader: asyncpg.Connection,
) -> None:
    # A reader fixing a selection holds the fence; a batch that starts meanwhile waits for it.
    transaction = reader.transaction()
    await transaction.start()
    await reader.execute(queries.FENCE_SELECTION)
    batch = asyncio.create_task(store.write_batch("/", [delivery(1, b"late")], batch_id=1, forget=[]))
    await asyncio.sleep(0.5)
    assert not batch.done()
    fixed_at: datetime = await reader.fetchval("SELECT clock_timestamp()")
    assert await reader.fetchval(queries.NEWEST_ID) == 0
    await transaction.commit()
    await asyncio.wait_for(batch, 10)
    captured_at = await reader.fetchval("SELECT captured_at FROM rabbit_archive.messages")
    # So a slice `--until fixed_at` (which missed it) and the next `--since fixed_at` (which
    # has it) together hold it: the capture time is not the batch transaction's start.
    assert captured_at > fixed_at
    until = await selection.count(reader, Filters(until=fixed_at))
    since = await selection.count(reader, Filters(since=fixed_at))
    assert (until, since) == (0, 1)


async def test_the_watermark_is_every_committed_id(
    store: PostgresStore,  # noqa: F811
    reader: asyncpg.Connection,
) -> None:
    assert await selection.watermark(reader) == 0
    await store.write_batch("/", [delivery(n, b"m%d" % n) for n in range(1, 4)], batch_id=1, forget=[])
    newest = await reader.fetchval("SELECT max(id) FROM rabbit_archive.messages")
    assert await selection.watermark(reader) == newest


# --- item 6: a page's row fetch is bounded to the page's partitions ---------------------------

DAYS = 6
ROWS_PER_DAY = 3000


async def seed_days(connection: asyncpg.Connection) -> list[tuple[str, datetime]]:
    """ROWS_PER_DAY rows on each of DAYS past days, ids in capture order; the partitions and days."""
    first = date.today() - timedelta(days=DAYS + 1)
    await connection.execute(queries.ENSURE_PARTITIONS, first, DAYS)
    properties = encode_properties(Properties())
    for day in range(DAYS):
        start = datetime(first.year, first.month, first.day, tzinfo=UTC) + timedelta(days=day)
        await connection.execute(
            """
            INSERT INTO rabbit_archive.messages
                (captured_at, vhost, exchange, routing_key, redelivered, properties_raw, properties,
                 body, body_size)
            SELECT $1::timestamptz + n * interval '1 second', '/', 'orders', 'eu.created', false, $2,
                   '{}'::jsonb, convert_to(repeat('x', 200), 'UTF8'), 200
            FROM generate_series(0, $3::integer - 1) AS n
            """,
            start,
            properties,
            ROWS_PER_DAY,
        )
    days = [datetime(first.year, first.month, first.day, tzinfo=UTC) + timedelta(days=n) for n in range(DAYS)]
    return [(f"messages_{day:%Y%m%d}", day) for day in days]


def scanned(plan: Any) -> set[str]:
    """Names of the relations an executed plan read."""
    names: set[str] = set()
    stack = [plan]
    while stack:
        node = stack.pop()
        if node.get("Actual Loops", 1) and "Relation Name" in node:
            names.add(node["Relation Name"])
        stack.extend(node.get("Plans", []))
    return names


def buffers(plan: Any) -> int:
    return int(plan["Shared Hit Blocks"]) + int(plan["Shared Read Blocks"])


async def explain(connection: asyncpg.Connection, query: str, *args: Any) -> Any:
    text = await connection.fetchval("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + query, *args)
    return json.loads(text)[0]["Plan"]


@pytest.mark.parametrize("statistics", [False, True], ids=["no-statistics", "analyzed"])
@pytest.mark.parametrize("plan_mode", ["force_custom_plan", "force_generic_plan"])
async def test_a_page_reads_only_the_partitions_it_touches(
    reader: asyncpg.Connection, statistics: bool, plan_mode: str
) -> None:
    partitions = await seed_days(reader)
    if statistics:
        await reader.execute("ANALYZE rabbit_archive.messages")
    await reader.execute(f"SET plan_cache_mode = {plan_mode}")
    # The third day's middle page, as selection.messages reads it.
    partition, day = partitions[2]
    day_start = await reader.fetchval(
        "SELECT min(id) FROM rabbit_archive.messages WHERE captured_at >= $1", day
    )
    cursor = day_start + 1000
    where, params = where_clause(Filters(), after_id=cursor, through_id=cursor + selection.ID_WINDOW)
    page_query = queries.SELECTION_PAGE_IDS.format(where=where, limit=selection.PAGE_ROWS)
    page = await reader.fetch(page_query, *params)
    assert len(page) == selection.PAGE_ROWS
    ids = [row["id"] for row in page]
    times = [row["captured_at"] for row in page]

    rows_plan = await explain(reader, queries.SELECTION_PAGE_ROWS, ids, min(times), max(times))
    assert scanned(rows_plan) == {partition}
    ids_plan = await explain(reader, page_query, *params)
    # Without the bounds each id probed every partition's index: about 500 x 6 x 2 buffers.
    # With them, and the id window of the page-id query, both stay near the page's own pages.
    print(f"\n{plan_mode}, statistics {statistics}: buffers read by the row fetch", buffers(rows_plan))
    print(f"{plan_mode}, statistics {statistics}: buffers read by the page-id query", buffers(ids_plan))
    assert buffers(rows_plan) < 600, buffers(rows_plan)
    assert buffers(ids_plan) < 600, buffers(ids_plan)

    read = [m.id async for m in selection.messages(reader, Filters(from_id=cursor + 1), limit=len(ids))]
    assert read == ids
