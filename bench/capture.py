"""`rabbit-capture run` in a subprocess: draining a backlog, then under a steady publish load.

Drain: the daemon declares and binds, stops, N messages are published to the `bench` exchange, and a
fresh daemon drains them; the rate is taken from the row count, polled every 0.2 s.
Steady load: the same daemon keeps running while messages go to `bench-steady` at a fixed rate, each
with a `published_at_us` header (microseconds since the epoch, taken just before the publish);
latency is computed in SQL as captured_at minus that header. captured_at is the start time of the
transaction that stored the row's batch, so the COPY and commit of the batch are not included.
"""

import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import time
from asyncio.subprocess import STDOUT
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import aio_pika
import asyncpg
import httpx

from bench.common import (
    EXCHANGE,
    STEADY_EXCHANGE,
    Sizes,
    amqp_url,
    cancel,
    cpu_seconds,
    esc,
    free_port,
    log,
    log_tail,
    message,
    peak_rss_mb,
    publish,
)
from rabbit_archive.config.settings import Settings

ARCHIVE_QUEUE: str = Settings.model_fields["queue"].default
POLL = 0.2
CAPTURE = Path(sys.executable).parent / "rabbit-capture"
ROWS = "SELECT count(*) FROM rabbit_archive.messages WHERE exchange = $1"
LATENCY = """
SELECT count(*) AS n,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_us) / 1000 AS p50_ms,
       percentile_cont(0.99) WITHIN GROUP (ORDER BY latency_us) / 1000 AS p99_ms,
       max(latency_us) / 1000 AS max_ms
FROM (
    SELECT extract(epoch FROM captured_at) * 1000000 - (headers ->> 'published_at_us')::numeric AS latency_us
    FROM rabbit_archive.messages
    WHERE exchange = $1
) AS latencies
"""


class Daemon:
    """`rabbit-capture run` in a subprocess, configured only by environment variables."""

    def __init__(
        self, vhost: str, database_url: str, output: IO[bytes], *, settings: Mapping[str, str] | None = None
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
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> int:
        """Start the daemon (cwd: a temp dir, so no .env is read); returns its pid."""
        self.process = await asyncio.create_subprocess_exec(
            CAPTURE, "run", env=self.env, stdout=self.output, stderr=STDOUT, cwd=tempfile.gettempdir()
        )
        return self.process.pid

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


async def drain(
    daemon: Daemon, database: "asyncpg.Connection[asyncpg.Record]", vhost: str, sizes: Sizes
) -> dict[str, Any]:
    """Publish the backlog while the daemon is stopped, then time a fresh daemon draining it.

    Leaves the daemon running.
    """
    count = sizes.messages
    log.log(f"rabbit-capture: publishing {count} messages to vhost {vhost}")
    await publish(vhost, sizes)
    log.log("rabbit-capture: draining")
    started = time.perf_counter()
    pid = await daemon.start()
    first: tuple[float, int, float] | None = None  # when, rows then, daemon CPU seconds then
    tick = 0
    while True:
        rows = int(await database.fetchval(ROWS, EXCHANGE))
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
        "peak_rss_mb": rss,
        "cpu_seconds": cpu,
        "cpu_seconds_before_first_row": first[2],
        "cpu_s_per_10k_msgs": cpu / count * 10_000,
    }


async def steady(
    daemon: Daemon,
    database: "asyncpg.Connection[asyncpg.Record]",
    vhost: str,
    sizes: Sizes,
    rate: float,
    seconds: float,
) -> dict[str, Any]:
    """Publish at `rate` msg/s for `seconds` to the running daemon; latency percentiles from the rows."""
    body = sizes.body
    total = int(rate * seconds)
    log.log(f"rabbit-capture: steady load, {rate:,.0f} msg/s for {seconds:.0f} s")
    async with await aio_pika.connect(amqp_url(vhost)) as connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(STEADY_EXCHANGE, ensure=False)
        confirms: list[asyncio.Task[Any]] = []
        try:
            started = time.perf_counter()
            while len(confirms) < total:
                due = min(total, int((time.perf_counter() - started) * rate) + 1)
                while len(confirms) < due:
                    index = sizes.messages + len(confirms)  # message ids apart from the backlog's
                    stamped = message(index, body, published_at_us=time.time_ns() // 1000)
                    confirms.append(asyncio.create_task(exchange.publish(stamped, routing_key="steady")))
                daemon.check_running()
                await asyncio.sleep(max(0.0, started + due / rate - time.perf_counter()))
            published_s = time.perf_counter() - started
            await asyncio.wait_for(asyncio.gather(*confirms), timeout=sizes.timeout(total))
        finally:
            await cancel(confirms)
    deadline = time.perf_counter() + sizes.timeout(total)
    while (rows := int(await database.fetchval(ROWS, STEADY_EXCHANGE))) < total:
        daemon.check_running()
        if time.perf_counter() > deadline:
            raise RuntimeError(f"steady load: only {rows} of {total} rows stored")
        await asyncio.sleep(POLL)
    stats = await database.fetchrow(LATENCY, STEADY_EXCHANGE)
    assert stats is not None
    if stats["n"] != total or stats["p99_ms"] is None:
        raise RuntimeError(f"steady load: {stats['n']} rows with a published_at_us header, expected {total}")
    return {
        "rate_msg_per_s": rate,
        "seconds": seconds,
        "published": total,
        "achieved_msg_per_s": total / published_s,
        "latency_p50_ms": float(stats["p50_ms"]),
        "latency_p99_ms": float(stats["p99_ms"]),
        "latency_max_ms": float(stats["max_ms"]),
    }


async def run(
    api: httpx.AsyncClient,
    vhost: str,
    database_url: str,
    sizes: Sizes,
    steady_rate: float,
    steady_seconds: float,
    output: IO[bytes],
) -> dict[str, Any]:
    """Both capture phases in one vhost and database; the daemon is stopped at the end."""
    topic = {"type": "topic", "durable": True}
    for name in (EXCHANGE, STEADY_EXCHANGE):
        (await api.put(f"/api/exchanges/{esc(vhost)}/{name}", json=topic)).raise_for_status()
    daemon = Daemon(vhost, database_url, output)
    database = await asyncpg.connect(database_url)
    try:
        await daemon.start()
        await wait_bound(api, daemon, vhost)
        await daemon.stop()
        drained = await drain(daemon, database, vhost, sizes)
        loaded = await steady(daemon, database, vhost, sizes, steady_rate, steady_seconds)
        await daemon.stop()
        return {"drain": drained, "steady": loaded}
    finally:
        await daemon.stop()
        await database.close()
