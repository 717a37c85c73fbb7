"""A selection by time walks only the ids near its window, and still finds every row in it.

Archive ids follow the order in which capture transactions took them, and a row's id is taken
at most CAPTURE_MARGIN after its captured_at (a slower batch is rolled back and retried). So a
`--since`/`--until` window starts its id walk at a row captured a margin before it, instead of
at the archive's first id: `find` of the last two hours of a large archive reads a few pages,
with or without planner statistics.
"""

import asyncio
import random
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rabbit_archive.archive import queries
from rabbit_archive.archive.amqp_codec import Properties, encode_properties
from rabbit_archive.archive.db import create_pool
from rabbit_archive.archive.errors import DatabaseUnavailable
from rabbit_archive.archive.migrate import apply_migrations
from rabbit_archive.archive.records import CAPTURE_MARGIN
from rabbit_archive.capture import store as store_module
from rabbit_archive.capture.batching import Delivery
from rabbit_archive.capture.store import PostgresStore
from rabbit_archive.replay import selection
from rabbit_archive.replay.filters import Filters, where_clause
from tests.integration.test_redelivery import store  # noqa: F401  (the migrated-store fixture)
from tests.integration.test_selection_watermark import (
    buffers,
    explain,
    reader,  # noqa: F401  (a fixture)
)

pytestmark = pytest.mark.integration

INSERT_ROWS = """
INSERT INTO rabbit_archive.messages
    (id, captured_at, vhost, exchange, routing_key, redelivered, properties_raw, properties, body, body_size)
SELECT id, at, '/', 'orders', 'eu.created', false, $3, '{}'::jsonb, convert_to(repeat('x', 200), 'UTF8'), 200
FROM unnest($1::bigint[], $2::timestamptz[]) AS row (id, at)
"""


async def migrated(database_url: str) -> None:
    pool = await create_pool(database_url, create_database=True)
    try:
        async with pool.acquire() as connection:
            await apply_migrations(connection)
    finally:
        await pool.close()


# --- every row of the window, whatever the skew within the margin ----------------------------

ROWS = 2000
START = datetime(2026, 11, 2, 8, 0, tzinfo=UTC)  # an old day: its rows land in the default partition


def skewed_rows(seed: int) -> list[tuple[int, datetime]]:
    """Rows one second apart in id order, each captured up to a margin before its id was taken.

    That is what concurrent capture transactions produce: a batch takes captured_at, then its
    ids during its COPY, while another batch that took a later captured_at may take ids first.
    """
    rng = random.Random(seed)
    margin = CAPTURE_MARGIN.total_seconds()
    return [
        (index + 1, START + timedelta(seconds=index - rng.uniform(0, margin * 0.999)))
        for index in range(ROWS)
    ]


async def seed(connection: asyncpg.Connection, rows: list[tuple[int, datetime]]) -> None:
    ids, times = zip(*rows, strict=True)
    await connection.execute(INSERT_ROWS, list(ids), list(times), encode_properties(Properties()))


def test_a_window_selects_exactly_the_rows_captured_in_it(database_url: str) -> None:
    rows = skewed_rows(seed=7)
    by_time = sorted(rows, key=lambda row: row[1])
    asyncio.run(migrated(database_url))

    async def seeded() -> None:
        connection = await asyncpg.connect(database_url)
        try:
            await seed(connection, rows)
        finally:
            await connection.close()

    asyncio.run(seeded())
    span = (by_time[-1][1] - by_time[0][1]).total_seconds()
    offsets = st.floats(min_value=-120, max_value=span + 120, allow_nan=False)

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(offsets, st.one_of(st.none(), st.floats(min_value=1, max_value=1500)), st.sampled_from([7, 500]))
    def check(since_offset: float, length: float | None, page_rows: int) -> None:
        since = by_time[0][1] + timedelta(seconds=since_offset)
        until = since + timedelta(seconds=length) if length is not None else None
        wanted = sorted(row_id for row_id, at in rows if at >= since and (until is None or at < until))

        async def selected() -> list[int]:
            connection = await asyncpg.connect(database_url)
            await selection.setup_codecs(connection)
            try:
                filters = Filters(since=since, until=until)
                return [m.id async for m in selection.messages(connection, filters, page_rows=page_rows)]
            finally:
                await connection.close()

        assert asyncio.run(selected()) == wanted

    check()


# --- a slow batch is rolled back instead of breaking the margin -------------------------------


def delivery(tag: int) -> Delivery:
    return Delivery(tag, False, "orders", "eu.created", encode_properties(Properties()), b"m%d" % tag)


async def test_a_batch_slower_than_the_margin_is_rolled_back_and_then_stored(
    store: PostgresStore,  # noqa: F811
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(store_module, "CAPTURE_MARGIN", timedelta(0))
    with pytest.raises(DatabaseUnavailable, match="rolled back to be retried"):
        await store.write_batch("/", [delivery(1), delivery(2)], batch_id=11, forget=[])
    connection = await asyncpg.connect(database_url)
    try:
        assert await connection.fetchval("SELECT count(*) FROM rabbit_archive.messages") == 0
        monkeypatch.setattr(store_module, "CAPTURE_MARGIN", CAPTURE_MARGIN)
        result = await store.write_batch("/", [delivery(1), delivery(2)], batch_id=11, forget=[], retry=True)
        assert result.stored == 2
        assert await connection.fetchval("SELECT count(*) FROM rabbit_archive.messages") == 2
    finally:
        await connection.close()


# --- find of two hours of a large archive, without statistics ---------------------------------

DAYS = 3
ROWS_PER_DAY = 100_000


async def seed_days(connection: asyncpg.Connection) -> datetime:
    """ROWS_PER_DAY rows spread over each of DAYS past days, ids in capture order; the last row's time."""
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    first = today - timedelta(days=DAYS)
    await connection.execute(queries.ENSURE_PARTITIONS, first.date(), DAYS + 1)
    step = 86_400 / ROWS_PER_DAY
    await connection.execute(
        """
        INSERT INTO rabbit_archive.messages
            (captured_at, vhost, exchange, routing_key, redelivered, properties_raw, properties, body,
             body_size)
        SELECT $1::timestamptz + n * make_interval(secs => $2::double precision), '/', 'orders', 'eu.created',
               false, $3, '{}'::jsonb, convert_to(repeat('x', 200), 'UTF8'), 200
        FROM generate_series(0, $4::integer - 1) AS n
        """,
        first,
        step,
        encode_properties(Properties()),
        DAYS * ROWS_PER_DAY,
    )
    return first + timedelta(seconds=step * (DAYS * ROWS_PER_DAY - 1))


def plan_nodes(plan: Any) -> list[Any]:
    nodes, stack = [], [plan]
    while stack:
        node = stack.pop()
        nodes.append(node)
        stack.extend(node.get("Plans", []))
    return nodes


@pytest.mark.parametrize("plan_mode", ["force_custom_plan", "force_generic_plan"])
async def test_find_of_two_hours_reads_only_their_pages_without_statistics(
    reader: asyncpg.Connection,  # noqa: F811
    plan_mode: str,
) -> None:
    last = await seed_days(reader)
    await reader.execute(f"SET plan_cache_mode = {plan_mode}")
    assert (
        await reader.fetchval(
            "SELECT count(*) FROM pg_stats WHERE schemaname = 'rabbit_archive' AND tablename LIKE 'messages%'"
        )
        == 0
    )
    # The last two hours but the final thirty minutes: both ends of the window are inside the day.
    until = last - timedelta(minutes=30)
    since = until - timedelta(hours=2)
    filters = Filters(since=since, until=until)

    for probe, bound in (
        (queries.SELECTION_ID_FLOOR, since - CAPTURE_MARGIN),
        (queries.SELECTION_ID_CEILING, until + CAPTURE_MARGIN),
    ):
        plan = await explain(reader, probe, bound)
        kinds = {node["Node Type"] for node in plan_nodes(plan)}
        assert "Seq Scan" not in kinds, kinds
        # One probe of each partition's captured_at index.
        assert buffers(plan) < 60, buffers(plan)

    newest = await selection.watermark(reader)
    cursor, through = await selection.id_range(reader, filters, 0, newest)
    in_window = await reader.fetch(
        "SELECT id FROM rabbit_archive.messages WHERE captured_at >= $1 AND captured_at < $2 ORDER BY id",
        since,
        until,
    )
    rows_per_margin = ROWS_PER_DAY * CAPTURE_MARGIN.total_seconds() / 86_400
    # The walk starts and ends within a margin's worth of rows of the window.
    assert 0 <= in_window[0]["id"] - cursor <= 2 * rows_per_margin + 2
    assert 0 <= through - in_window[-1]["id"] <= 2 * rows_per_margin + 2
    where, params = where_clause(filters, after_id=cursor, through_id=cursor + selection.ID_WINDOW)
    page = await explain(
        reader, queries.SELECTION_PAGE_IDS.format(where=where, limit=selection.PAGE_ROWS), *params
    )
    assert buffers(page) < 100, buffers(page)

    started = time.perf_counter()
    found = [m.id async for m in selection.messages(reader, filters, limit=100)]
    elapsed = time.perf_counter() - started
    assert found == [row["id"] for row in in_window[:100]]
    print(
        f"\n{plan_mode}: find of two hours of {DAYS * ROWS_PER_DAY:,} rows, "
        f"first 100: {elapsed * 1000:.1f} ms"
    )


# --- the daemon analyses a day's partition once the day is over -------------------------------


async def test_closed_days_are_analysed_once_and_today_is_left_alone(
    store: PostgresStore,  # noqa: F811
    reader: asyncpg.Connection,  # noqa: F811
) -> None:
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    await reader.execute(queries.ENSURE_PARTITIONS, (today - timedelta(days=3)).date(), 4)
    # Two closed days with rows, one without any, and today with rows.
    for day in (today - timedelta(days=2), today - timedelta(days=1), today):
        await seed(reader, [(int(day.timestamp()) + n, day + timedelta(minutes=n)) for n in range(50)])

    statistics_of = "SELECT count(*) FROM pg_stats WHERE schemaname = 'rabbit_archive' AND tablename = $1"

    closed = [f"messages_{today - timedelta(days=n):%Y%m%d}" for n in (2, 1)]
    empty = f"messages_{today - timedelta(days=3):%Y%m%d}"
    assert await store.analyze_closed_partitions() == sorted([empty, *closed])
    for partition in closed:
        assert await reader.fetchval(statistics_of, partition) > 0
    assert await reader.fetchval(statistics_of, f"messages_{today:%Y%m%d}") == 0
    # Analysed once: the next upkeep round has nothing to do, the empty day included.
    assert await store.analyze_closed_partitions() == []


# --- a replay of one exchange reads only its page, without statistics ------------------------


@pytest.mark.parametrize("plan_mode", ["force_custom_plan", "force_generic_plan"])
async def test_a_page_of_one_exchange_reads_only_its_rows_without_statistics(
    reader: asyncpg.Connection,  # noqa: F811
    plan_mode: str,
) -> None:
    await seed_days(reader)  # every row is of exchange 'orders': the densest selection there is
    await reader.execute(f"SET plan_cache_mode = {plan_mode}")
    middle = await reader.fetchval("SELECT max(id) / 2 FROM rabbit_archive.messages")
    filters = Filters(exchanges=("orders",))
    where, params = where_clause(filters, after_id=middle, through_id=middle + selection.ID_WINDOW)
    plan = await explain(
        reader, queries.SELECTION_PAGE_IDS.format(where=where, limit=selection.PAGE_ROWS), *params
    )
    # Without (exchange, id) PostgreSQL combined the whole (exchange, captured_at) index of every
    # partition with the id window: over 1,000 buffers per page here, a day's worth on a real one.
    print(f"\n{plan_mode}: buffers read by a page of one exchange", buffers(plan))
    assert buffers(plan) < 100, buffers(plan)
    page = [
        m.id
        async for m in selection.messages(reader, Filters(exchanges=("orders",), from_id=middle + 1), limit=5)
    ]
    assert page == list(range(middle + 1, middle + 6))
