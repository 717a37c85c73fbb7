"""`rabbit-replay run --exchange bench --to-queue <q> --yes` of the archived backlog into a fresh queue.

The command runs under a tiny Python wrapper that times it and reports its peak RSS
(getrusage(RUSAGE_CHILDREN).ru_maxrss) and CPU time. Two rates are reported:
- including start-up: messages / wall time of the whole command (interpreter start, imports,
  connections, the preview queries, publishing, the last confirm, exit);
- publishing only: confirmed messages / (finished_at - started_at) of the replay's history row, i.e.
  from just before the first message is read from the archive to the last confirm.
"""

import asyncio
import json
import os
import signal
import sys
import tempfile
from asyncio.subprocess import PIPE
from pathlib import Path
from typing import IO, Any

import aio_pika
import asyncpg

from bench.common import EXCHANGE, Sizes, amqp_url, log, log_tail, settle_database

REPLAY = Path(sys.executable).parent / "rabbit-replay"
TARGET_QUEUE = "replay-target"
# Runs argv[1:] with stdout sent to stderr; prints one JSON line: wall seconds, peak RSS, CPU seconds.
WRAPPER = """
import json, resource, subprocess, sys, time
started = time.perf_counter()
code = subprocess.call(sys.argv[1:], stdout=sys.stderr)
wall = time.perf_counter() - started
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"returncode": code, "wall_s": wall, "maxrss_kib": usage.ru_maxrss,
                  "cpu_s": usage.ru_utime + usage.ru_stime}))
"""
# Whether PostgreSQL has statistics for the archive's partitions yet (autovacuum analyzes them about
# a minute after they fill): the replay's page queries are planned from them.
ANALYZED = """
SELECT coalesce(bool_and(last_analyze IS NOT NULL OR last_autoanalyze IS NOT NULL), false)
FROM pg_stat_user_tables
WHERE schemaname = 'rabbit_archive' AND relname LIKE 'messages\\_%' AND n_live_tup > 0
"""
HISTORY = """
SELECT status, selected, published, confirmed, returned, nacked,
       extract(epoch FROM finished_at - started_at) AS seconds
FROM rabbit_archive.replays
"""


async def queue_depth(channel: aio_pika.abc.AbstractChannel, expected: int) -> int:
    """Messages in the target queue, read again for up to 5 s while fewer than expected."""
    for _ in range(25):
        declared = await channel.declare_queue(TARGET_QUEUE, passive=True)
        depth = int(declared.declaration_result.message_count or 0)
        if depth >= expected:
            break
        await asyncio.sleep(0.2)
    return depth


async def analyzed(database_url: str) -> bool:
    """True when every archive partition holding rows has been analyzed."""
    database = await asyncpg.connect(database_url)
    try:
        return bool(await database.fetchval(ANALYZED))
    finally:
        await database.close()


# The replay every phase runs: the archived backlog into TARGET_QUEUE (with replay_env).
COMMAND = [str(REPLAY), "run", "--exchange", EXCHANGE, "--to-queue", TARGET_QUEUE, "--yes"]


def replay_env(vhost: str, database_url: str) -> dict[str, str]:
    """This environment without RABBIT_ARCHIVE_ variables, plus the vhost's broker and the database."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RABBIT_ARCHIVE_")}
    return env | {
        "RABBIT_ARCHIVE_AMQP_URL": amqp_url(vhost),
        "RABBIT_ARCHIVE_DATABASE_URL": database_url,
        "RABBIT_ARCHIVE_LOG_LEVEL": "WARNING",
    }


async def completed(database_url: str, sizes: Sizes) -> "asyncpg.Record":
    """The replay's history row; RuntimeError unless it is the only one, completed, all confirmed."""
    database = await asyncpg.connect(database_url)
    try:
        history = await database.fetch(HISTORY)
    finally:
        await database.close()
    if len(history) != 1 or history[0]["status"] != "completed" or history[0]["confirmed"] != sizes.messages:
        raise RuntimeError(f"unexpected replay history: {[dict(row) for row in history]}")
    return history[0]


async def run(
    vhost: str, database_url: str, sizes: Sizes, analyze: bool, output: IO[bytes]
) -> dict[str, Any]:
    """Replay the backlog captured in database_url into a fresh quorum queue of vhost (ANALYZE it first?)."""
    if analyze:
        database = await asyncpg.connect(database_url)
        try:
            await database.execute("ANALYZE rabbit_archive.messages")
        finally:
            await database.close()
    analyzed_before = await analyzed(database_url)
    await settle_database()  # the replay writes its history and reads the archive the capture left
    async with await aio_pika.connect(amqp_url(vhost)) as connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(TARGET_QUEUE, durable=True, arguments={"x-queue-type": "quorum"})
        log.log(f"rabbit-replay: replaying {sizes.messages} messages")
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", WRAPPER, *COMMAND,
            env=replay_env(vhost, database_url), stdout=PIPE, stderr=output, cwd=tempfile.gettempdir(),
            start_new_session=True,
        )  # fmt: skip
        try:
            stdout, _ = await asyncio.wait_for(process.communicate(), timeout=sizes.timeout())
        finally:
            if process.returncode is None:
                os.killpg(process.pid, signal.SIGKILL)  # the wrapper and rabbit-replay under it
                await process.wait()
        measured = json.loads(stdout)
        if measured["returncode"] != 0:
            raise RuntimeError(f"rabbit-replay exited {measured['returncode']}:\n{log_tail(output)}")
        depth = await queue_depth(channel, sizes.messages)
        await queue.delete(if_unused=False, if_empty=False)
    history = await completed(database_url, sizes)
    if depth != sizes.messages:
        raise RuntimeError(f"{depth} messages in {TARGET_QUEUE} after the replay, expected {sizes.messages}")
    publishing_s = float(history["seconds"])
    return {
        "wall_s": measured["wall_s"],
        "incl_startup_msg_per_s": sizes.messages / measured["wall_s"],
        "publishing_s": publishing_s,
        "publishing_msg_per_s": sizes.messages / publishing_s,
        "peak_rss_mb": measured["maxrss_kib"] / 1024,
        "cpu_seconds": measured["cpu_s"],
        "cpu_s_per_10k_msgs": measured["cpu_s"] / sizes.messages * 10_000,
        "returned": history["returned"],
        "queue_depth_after": depth,
        "archive_analyzed_before": analyzed_before,
        "archive_analyzed_after": await analyzed(database_url),
    }
