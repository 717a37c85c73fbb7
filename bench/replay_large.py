"""A replay of a large, freshly filled archive without planner statistics, beside the plain publisher.

Fills a fresh database with N archived messages (default 1,000,000; 512 random bytes, persistent,
three headers, exchange `bench` of a fresh vhost) straight through SQL, as capture would have
stored them but in a fraction of the time, gathers no statistics (as during an incident, when
nobody can wait for autovacuum), then runs in this order: the plain confirming publisher of N
messages into a quorum queue (bench.baseline.publisher) and `rabbit-replay run --exchange bench
--to-queue <fresh queue> --yes` of the N archived ones (bench.replay.run). The vhost and database
are deleted at the end. Run: .venv/bin/python -m bench.replay_large [--messages N]
"""

import argparse
import asyncio
import json
import tempfile
import time
import uuid
from typing import Any

import asyncpg
import httpx

from bench import baseline, replay
from bench.common import EXCHANGE, MANAGEMENT, Sizes, git_state, log, scratch_database, scratch_vhost
from rabbit_archive.archive import queries
from rabbit_archive.archive.amqp_codec import Properties, encode_properties
from rabbit_archive.archive.migrate import apply_migrations

FILL_CHUNK = 250_000  # rows per INSERT statement


async def fill(database_url: str, vhost: str, sizes: Sizes) -> float:
    """Archive N messages of vhost's `bench` exchange, one second apart up to now; returns seconds."""
    headers = [(b"seq", ("I", 1)), (b"source", ("S", b"bench")), (b"tenant", ("S", b"t-1"))]
    properties = encode_properties(Properties(headers=headers, delivery_mode=2))
    connection = await asyncpg.connect(database_url)
    try:
        await apply_migrations(connection)
        started = time.perf_counter()
        first = await connection.fetchval(
            "SELECT now() - make_interval(secs => $1::double precision)", sizes.messages
        )
        days = sizes.messages // 86_400 + 2
        await connection.execute(queries.ENSURE_PARTITIONS, first.date(), days)
        for start in range(0, sizes.messages, FILL_CHUNK):
            count = min(FILL_CHUNK, sizes.messages - start)
            await connection.execute(
                """
                INSERT INTO rabbit_archive.messages
                    (captured_at, vhost, exchange, routing_key, redelivered, properties_raw, properties,
                     headers, message_id, body, body_size)
                SELECT $1::timestamptz + n * interval '1 second', $2, $3, 'bench.' || (n % 10), false, $4,
                       '{"delivery_mode": 2}'::jsonb, '{"seq": 1, "source": "bench", "tenant": "t-1"}'::jsonb,
                       'm-' || n, $5::bytea, octet_length($5::bytea)
                FROM generate_series($6::bigint, $7::bigint - 1) AS n
                """,
                first,
                vhost,
                EXCHANGE,
                properties,
                sizes.body,
                start,
                start + count,
            )
            log.log(f"replay_large: archived {start + count:,} messages")
        return time.perf_counter() - started
    finally:
        await connection.close()


async def measure(sizes: Sizes) -> dict[str, Any]:
    """Fill, publish, replay; the vhost and database are removed whatever happens."""
    tag = uuid.uuid4().hex[:8]
    async with (
        httpx.AsyncClient(base_url=MANAGEMENT, auth=("guest", "guest"), timeout=10) as api,
        scratch_vhost(api, f"bench-replay-large-{tag}") as vhost,
        scratch_database(f"bench_replay_large_{tag}") as database_url,
    ):
        fill_s = await fill(database_url, vhost, sizes)
        publisher = await baseline.publisher(vhost, sizes)
        with tempfile.TemporaryFile() as output:
            replayed = await replay.run(vhost, database_url, sizes, False, output)
    return {
        "messages": sizes.messages,
        "body_size": sizes.body_size,
        "fill_s": round(fill_s, 1),
        "publisher_msg_per_s": round(publisher["msg_per_s"]),
        "replay_publishing_msg_per_s": round(replayed["publishing_msg_per_s"]),
        "ratio": round(replayed["publishing_msg_per_s"] / publisher["msg_per_s"], 2),
        "replay": replayed,
    }


def main() -> None:
    """Command line: python -m bench.replay_large."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--body-size", type=int, default=512)
    args = parser.parse_args()
    result = asyncio.run(measure(Sizes(args.messages, args.body_size)))
    print(json.dumps({**git_state(), **result}, indent=2))


if __name__ == "__main__":
    main()
