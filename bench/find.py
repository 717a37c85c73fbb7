"""Selections by time on a large archive without planner statistics: `find` of a two-hour slice.

Fills a fresh database with N rows (default 10 million, 200-byte bodies) spread evenly over the
last D days, ids in capture order, and gathers no statistics (autovacuum may be off or behind
during an incident: that is the case this measures). Then, each timed R times (median):
- find: the first 100 messages of the two hours ending one hour before the newest row (the table
  `rabbit-replay find` prints by default), through replay.selection as the command reads them;
- slice: every message of those two hours, page by page, as a replay reads them;
- baseline: the same first 100 with the id walk starting at the archive's first id, as selections
  by time did before the capture margin (replay.selection.id_range) existed; run once.
The database is dropped at the end. Run: .venv/bin/python -m bench.find [--rows N]
"""

import argparse
import asyncio
import json
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from bench.common import git_state, log, scratch_database
from rabbit_archive.archive import queries
from rabbit_archive.archive.amqp_codec import Properties, encode_properties
from rabbit_archive.archive.migrate import apply_migrations
from rabbit_archive.replay import selection
from rabbit_archive.replay.filters import Filters

FILL_CHUNK = 1_000_000  # rows per INSERT statement
FIND_ROWS = 100  # rabbit-replay find's table default


async def fill(connection: asyncpg.Connection, rows: int, days: int, body_size: int) -> datetime:
    """Insert the rows, oldest first, across `days` days ending now; returns the newest row's time."""
    now = datetime.now(UTC)
    first = now - timedelta(days=days)
    await connection.execute(queries.ENSURE_PARTITIONS, first.date(), days + 2)
    step = days * 86_400 / rows
    properties = encode_properties(Properties())
    for start in range(0, rows, FILL_CHUNK):
        count = min(FILL_CHUNK, rows - start)
        await connection.execute(
            """
            INSERT INTO rabbit_archive.messages
                (captured_at, vhost, exchange, routing_key, redelivered, properties_raw, properties,
                 body, body_size)
            SELECT $1::timestamptz + n * make_interval(secs => $2::double precision), '/',
                   'orders-' || (n % 10), 'eu.created', false, $3, '{}'::jsonb,
                   convert_to(repeat('x', $4::integer), 'UTF8'), $4::integer
            FROM generate_series($5::bigint, $6::bigint - 1) AS n
            """,
            first,
            step,
            properties,
            body_size,
            start,
            start + count,
        )
        log.print(f"  filled {start + count:,} rows")
    return first + timedelta(seconds=step * (rows - 1))


async def timed(action: Callable[[], Awaitable[int]], repeat: int) -> tuple[float, int]:
    """Median seconds of `repeat` runs of action, and what it returned."""
    times: list[float] = []
    result = 0
    for _ in range(repeat):
        started = time.perf_counter()
        result = await action()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


async def measure(rows: int, days: int, body_size: int, repeat: int) -> dict[str, Any]:
    """Fill a fresh database, time the selections, drop the database whatever happens."""
    async with scratch_database(f"bench_find_{uuid.uuid4().hex[:10]}") as database_url:
        connection = await asyncpg.connect(database_url)
        try:
            await apply_migrations(connection)
            await selection.setup_codecs(connection)
            await connection.execute("SET plan_cache_mode = force_generic_plan")
            started = time.perf_counter()
            newest = await fill(connection, rows, days, body_size)
            fill_s = time.perf_counter() - started
            analysed = await connection.fetchval(
                "SELECT count(*) FROM pg_stats WHERE schemaname = 'rabbit_archive'"
            )
            until = newest - timedelta(hours=1)
            filters = Filters(since=until - timedelta(hours=2), until=until)

            async def first_page() -> int:
                return len([m async for m in selection.messages(connection, filters, limit=FIND_ROWS)])

            async def whole_slice() -> int:
                return len([m async for m in selection.messages(connection, filters)])

            find_s, found = await timed(first_page, repeat)
            slice_s, sliced = await timed(whole_slice, max(1, repeat // 2))
            real_id_range = selection.id_range

            async def unbounded(
                _connection: Any, _filters: Filters, after_id: int, newest: int
            ) -> tuple[int, int]:
                return after_id, newest

            selection.id_range = unbounded  # type: ignore[assignment]
            try:
                baseline_s, baseline_found = await timed(first_page, 1)
            finally:
                selection.id_range = real_id_range
            assert baseline_found == found
        finally:
            await connection.close()
    return {
        "rows": rows,
        "days": days,
        "body_size": body_size,
        "statistics_rows": analysed,
        "fill_s": round(fill_s, 1),
        "find_first_100_ms": round(find_s * 1000, 1),
        "slice_messages": sliced,
        "slice_s": round(slice_s, 2),
        "slice_msg_per_s": round(sliced / slice_s),
        "baseline_walk_from_first_id_ms": round(baseline_s * 1000, 1),
        "baseline_ratio": round(baseline_s / find_s, 1),
    }


def main() -> None:
    """Command line: python -m bench.find."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--days", type=int, default=5)
    parser.add_argument("--body-size", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    result = asyncio.run(measure(args.rows, args.days, args.body_size, args.repeat))
    print(json.dumps({**git_state(), **result}, indent=2))


if __name__ == "__main__":
    main()
