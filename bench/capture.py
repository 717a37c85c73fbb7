"""`rabbit-capture run` in a subprocess: draining a backlog, then under a steady publish load.

Drain: the daemon declares and binds, stops, N messages are published to the `bench` exchange, and a
fresh daemon drains them; the rate is taken from the count of new rows, polled every 0.2 s.
Steady load: the same daemon keeps running while messages go to `bench-steady` at a fixed rate, each
with a `published_at_us` header (microseconds since the epoch, taken just before the publish).
Latency is publish → committed: for the load only, a statement trigger on the archive table (the
benchmark's own database; the daemon knows nothing of it) sends a NOTIFY carrying the last id the
writing session took, which PostgreSQL delivers when, and only if, the transaction commits; the
bench listens and stamps each notification on arrival, and a row's commit time is that of the
first notification whose id reaches the row's. The commit's own time is therefore included, and
the notification's way to the bench too (a fraction of a millisecond). Also reported: latency to
captured_at, the time the batch's transaction took its capture lock (before its COPY and commit).
"""

import asyncio
import bisect
import contextlib
import os
import signal
import sys
import tempfile
import time
from asyncio.subprocess import STDOUT
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import asyncpg
import httpx

from bench.common import (
    EXCHANGE,
    STEADY_EXCHANGE,
    Sizes,
    amqp_url,
    broker_pid,
    cpu_seconds,
    esc,
    fill,
    free_port,
    log,
    log_tail,
    peak_rss_mb,
    publish_steadily,
    settle_database,
)
from rabbit_archive.config.settings import Settings

ARCHIVE_QUEUE: str = Settings.model_fields["queue"].default
POLL = 0.2
CAPTURE = Path(sys.executable).parent / "rabbit-capture"
NEWEST_ID = "SELECT coalesce(max(id), 0) FROM rabbit_archive.messages"
# What the archive's partitions hold on disk: heap with TOAST, and indexes (for the sizing table).
ON_DISK = """
SELECT coalesce(sum(pg_table_size(c.oid)), 0)::bigint, coalesce(sum(pg_indexes_size(c.oid)), 0)::bigint
FROM pg_inherits AS i JOIN pg_class AS c ON c.oid = i.inhrelid
WHERE i.inhparent = 'rabbit_archive.messages'::regclass
"""
WAL_NOW = "SELECT pg_current_wal_lsn()::text"
WAL_SINCE = "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::text::pg_lsn)::bigint"
# Rows above an id: each measurement counts only its own (a database may serve several rounds).
ROWS = "SELECT count(*) FROM rabbit_archive.messages WHERE exchange = $1 AND id > $2"
STAMPS = """
SELECT id, (headers ->> 'published_at_us')::bigint AS published_us,
       (extract(epoch FROM captured_at) * 1000000)::bigint AS captured_us
FROM rabbit_archive.messages
WHERE exchange = $1 AND id > $2
ORDER BY id
"""
COMMITTED = "bench_committed"
# A NOTIFY is delivered at commit, never for a rolled-back transaction. currval is the last id this
# session took: with one writer, the statement's last row. Without a transition table, so the COPY
# keeps its multi-row inserts.
NOTIFY_COMMITS = """
CREATE FUNCTION rabbit_archive.bench_committed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('bench_committed', currval('rabbit_archive.messages_id_seq')::text);
    RETURN NULL;
END $$;
CREATE TRIGGER bench_committed AFTER INSERT ON rabbit_archive.messages
    FOR EACH STATEMENT EXECUTE FUNCTION rabbit_archive.bench_committed();
"""
STOP_NOTIFYING = """
DROP TRIGGER bench_committed ON rabbit_archive.messages;
DROP FUNCTION rabbit_archive.bench_committed();
"""


class Daemon:
    """`rabbit-capture run` in a subprocess, configured only by environment variables."""

    def __init__(
        self,
        vhost: str,
        database_url: str,
        output: IO[bytes],
        *,
        settings: Mapping[str, str] | None = None,
        build: Path | None = None,
    ) -> None:
        self.port = free_port()
        self.output = output
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RABBIT_ARCHIVE_")}
        self.env |= {
            "RABBIT_ARCHIVE_AMQP_URL": amqp_url(vhost),
            "RABBIT_ARCHIVE_DATABASE_URL": database_url,
            "RABBIT_ARCHIVE_HTTP_PORT": str(self.port),
            "RABBIT_ARCHIVE_LOG_LEVEL": "WARNING",
        }
        # Further settings by their variable's name without the prefix (SOURCE=firehose).
        self.env |= {f"RABBIT_ARCHIVE_{name}": value for name, value in (settings or {}).items()}
        self.command: list[str | Path] = [CAPTURE, "run"]
        if build is not None:
            # Another version of the code (a checkout with the repository's layout): its
            # src/rabbit_archive comes before the installed one on the import path.
            self.env["PYTHONPATH"] = str(build / "src")
            self.command = [sys.executable, "-m", "rabbit_archive.capture", "run"]
        self.process: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int | None:
        """The running daemon's pid."""
        return self.process.pid if self.process is not None and self.process.returncode is None else None

    async def start(self) -> int:
        """Start the daemon (cwd: a temp dir, so no .env is read); returns its pid."""
        self.process = await asyncio.create_subprocess_exec(
            *self.command, env=self.env, stdout=self.output, stderr=STDOUT, cwd=tempfile.gettempdir()
        )
        return self.process.pid

    async def metric_total(self, name: str) -> float:
        """A metric of the daemon's /metrics summed over its labels (0 if this build has none)."""
        async with httpx.AsyncClient() as client:
            text = (await client.get(f"http://127.0.0.1:{self.port}/metrics", timeout=5)).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))

    def check_running(self) -> None:
        """Fail with the daemon's log if it exited."""
        if self.process is not None and self.process.returncode is not None:
            raise RuntimeError(f"rabbit-capture exited {self.process.returncode}:\n{log_tail(self.output)}")

    async def stop(self) -> None:
        """SIGTERM and wait; SIGKILL if it takes more than 20 s."""
        if self.process is None or self.process.returncode is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.process.wait(), 20)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()


async def wait_bound(api: httpx.AsyncClient, daemon: Daemon, vhost: str) -> None:
    """Wait until /readyz is 200 and the archive queue is bound to both benchmark exchanges."""
    paths = [f"/api/bindings/{esc(vhost)}/e/{name}/q/{ARCHIVE_QUEUE}" for name in (EXCHANGE, STEADY_EXCHANGE)]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        daemon.check_running()
        with contextlib.suppress(httpx.HTTPError):
            ready = await api.get(f"http://127.0.0.1:{daemon.port}/readyz")
            bindings = [await api.get(path) for path in paths]
            if ready.status_code == 200 and all(b.status_code == 200 and b.json() for b in bindings):
                return
        await asyncio.sleep(0.1)
    raise RuntimeError("rabbit-capture did not become ready and bind the exchanges within 60 s")


async def on_disk(database: "asyncpg.Connection[asyncpg.Record]") -> tuple[int, int]:
    """Bytes of the archive's partitions: tables (with TOAST) and indexes."""
    row = await database.fetchrow(ON_DISK)
    assert row is not None  # an aggregate always returns a row
    return int(row[0]), int(row[1])


async def drain(
    daemon: Daemon, database: "asyncpg.Connection[asyncpg.Record]", vhost: str, sizes: Sizes
) -> dict[str, Any]:
    """Publish the backlog while the daemon is stopped, then time a fresh daemon draining it.

    Leaves the daemon running.
    """
    count = sizes.messages
    after_id = int(await database.fetchval(NEWEST_ID))
    log.log(f"rabbit-capture: publishing {count} messages to vhost {vhost}")
    await fill(vhost, sizes)
    await settle_database()
    log.log("rabbit-capture: draining")
    # WAL is the whole server's: the other databases of the machine should be quiet meanwhile.
    table_before, indexes_before = await on_disk(database)
    wal_from = await database.fetchval(WAL_NOW)
    started = time.perf_counter()
    pid = await daemon.start()
    first: tuple[float, int, float] | None = None  # when, rows then, daemon CPU seconds then
    tick = 0
    while True:
        rows = int(await database.fetchval(ROWS, EXCHANGE, after_id))
        now = time.perf_counter()
        if rows and first is None:
            first = (now, rows, cpu_seconds(pid))
        if rows >= count:
            break
        daemon.check_running()
        if now - started > sizes.timeout():
            raise RuntimeError(f"only {rows} of {count} rows after {now - started:.0f} s")
        tick += 1
        await asyncio.sleep(max(0.0, started + tick * POLL - time.perf_counter()))
    rss, cpu = peak_rss_mb(pid), cpu_seconds(pid)
    batches = await daemon.metric_total("rabbit_archive_batch_messages_count")
    beside = await daemon.metric_total("rabbit_archive_batches_beside_total")
    wal = int(await database.fetchval(WAL_SINCE, wal_from))
    table_after, indexes_after = await on_disk(database)
    assert first is not None
    span = now - first[0]
    if first[1] >= count:
        raise RuntimeError(f"all {count} rows arrived within one poll: use more --messages")
    return {
        "msg_per_s": (count - first[1]) / span,
        "first_to_last_s": span,
        "incl_startup_s": now - started,
        "incl_startup_msg_per_s": count / (now - started),
        "rows_at_first_poll": first[1],
        "rows_stored": rows,
        # Large batches are written two at a time (capture/consumer.py): how many went beside another.
        "batches": batches,
        "batches_beside": beside,
        "peak_rss_mb": rss,
        "cpu_seconds": cpu,
        "cpu_seconds_before_first_row": first[2],
        "cpu_s_per_10k_msgs": cpu / count * 10_000,
        # Sizing: one core of the daemon's, and the database's disk, per message stored.
        "msg_per_cpu_second": count / cpu,
        "table_bytes_per_msg": (table_after - table_before) / count,
        "index_bytes_per_msg": (indexes_after - indexes_before) / count,
        "wal_bytes_per_msg": wal / count,
    }


async def steady(
    daemon: Daemon,
    database: "asyncpg.Connection[asyncpg.Record]",
    vhost: str,
    sizes: Sizes,
    rate: float,
    seconds: float,
) -> tuple[dict[str, Any], list[float]]:
    """Publish at `rate` msg/s for `seconds` to the running daemon: latency percentiles, and each latency.

    The latencies (publish → commit, ms) in the order of the rows, for pooling several loads.
    """
    total = int(rate * seconds)
    log.log(f"rabbit-capture: steady load, {rate:,.0f} msg/s for {seconds:.0f} s")
    after_id = int(await database.fetchval(NEWEST_ID))
    commits: list[tuple[int, int]] = []  # (the last id of a committed statement, arrival in µs)

    def on_commit(_connection: object, _pid: int, _channel: str, payload: object) -> None:
        commits.append((int(str(payload)), time.time_ns() // 1000))

    await database.execute(NOTIFY_COMMITS)
    await database.add_listener(COMMITTED, on_commit)
    # CPU seconds of the daemon and of the broker (when this process may read its /proc entry).
    pids = {name: pid for name, pid in (("daemon", daemon.pid), ("broker", broker_pid())) if pid is not None}
    cpu = {name: cpu_seconds(pid) for name, pid in pids.items()}
    try:
        published_s = await publish_steadily(vhost, sizes, total, rate, check=daemon.check_running)
        deadline = time.perf_counter() + sizes.timeout(total)
        while (rows := int(await database.fetchval(ROWS, STEADY_EXCHANGE, after_id))) < total:
            daemon.check_running()
            if time.perf_counter() > deadline:
                raise RuntimeError(f"steady load: only {rows} of {total} rows stored")
            await asyncio.sleep(POLL)
        await asyncio.sleep(POLL)  # the last notification may still be on its way
        cpu = {
            name: cpu_seconds(pids[name]) - before for name, before in cpu.items() if pids[name] is not None
        }
    finally:
        await database.remove_listener(COMMITTED, on_commit)
        await database.execute(STOP_NOTIFYING)
    stamps = await database.fetch(STAMPS, STEADY_EXCHANGE, after_id)
    if len(stamps) != total or any(row["published_us"] is None for row in stamps):
        raise RuntimeError(f"steady load: {len(stamps)} rows with a published_at_us header, expected {total}")
    commits.sort()
    last_ids = [last_id for last_id, _ in commits]
    committed, started, writing = [], [], []
    for row in stamps:
        index = bisect.bisect_left(last_ids, row["id"])
        if index == len(commits):
            raise RuntimeError(f"steady load: no commit notification for row {row['id']}")
        committed.append((commits[index][1] - row["published_us"]) / 1000)
        started.append((row["captured_us"] - row["published_us"]) / 1000)
        writing.append((commits[index][1] - row["captured_us"]) / 1000)
    batches = len({commits[bisect.bisect_left(last_ids, row["id"])] for row in stamps})
    summary = {
        "rate_msg_per_s": rate,
        "seconds": seconds,
        "published": total,
        "achieved_msg_per_s": total / published_s,
        "latency_p50_ms": percentile(committed, 0.5),
        "latency_p99_ms": percentile(committed, 0.99),
        "latency_max_ms": max(committed),
        "to_write_start_p50_ms": percentile(started, 0.5),
        "to_write_start_p99_ms": percentile(started, 0.99),
        # From the capture lock to the commit's notification: the write itself, per message.
        "write_p50_ms": percentile(writing, 0.5),
        "write_p99_ms": percentile(writing, 0.99),
        "batches": batches,
        "mean_batch": total / batches,
        "daemon_cpu_s": cpu.get("daemon"),
        "broker_cpu_s": cpu.get("broker"),
    }
    return summary, committed


def percentile(values: Sequence[float], fraction: float) -> float:
    """Linear interpolation between the closest ranks, as PostgreSQL's percentile_cont."""
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


async def run(
    api: httpx.AsyncClient,
    vhost: str,
    database_url: str,
    sizes: Sizes,
    steady_rates: Sequence[float],
    steady_seconds: float,
    output: IO[bytes],
) -> dict[str, Any]:
    """The drain, then a steady load per rate, in one vhost and database; the daemon is stopped at the end."""
    daemon = Daemon(vhost, database_url, output)
    database = await asyncpg.connect(database_url)
    try:
        await prepare(api, daemon, vhost)
        drained = await drain(daemon, database, vhost, sizes)
        loads = [
            (await steady(daemon, database, vhost, sizes, rate, steady_seconds))[0] for rate in steady_rates
        ]
        await daemon.stop()
        return {"drain": drained, "steady": loads}
    finally:
        await daemon.stop()
        await database.close()


async def drain_alone(
    api: httpx.AsyncClient, vhost: str, database_url: str, sizes: Sizes, output: IO[bytes]
) -> dict[str, Any]:
    """Only the drain, in a vhost and database of its own (a further round beside the COPY baseline)."""
    daemon = Daemon(vhost, database_url, output)
    database = await asyncpg.connect(database_url)
    try:
        await prepare(api, daemon, vhost)
        return await drain(daemon, database, vhost, sizes)
    finally:
        await daemon.stop()
        await database.close()


async def prepare(api: httpx.AsyncClient, daemon: Daemon, vhost: str) -> None:
    """Declare the benchmark exchanges; let the daemon declare its queue and bind them, then stop it."""
    topic = {"type": "topic", "durable": True}
    for name in (EXCHANGE, STEADY_EXCHANGE):
        (await api.put(f"/api/exchanges/{esc(vhost)}/{name}", json=topic)).raise_for_status()
    await daemon.start()
    await wait_bound(api, daemon, vhost)
    await daemon.stop()
