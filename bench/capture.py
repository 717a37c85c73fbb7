"""Drain rate of `rabbit-capture run` against a plain aio-pika consumer, on the local broker and database.

Both drain the same N pre-published messages from a quorum queue, each in a fresh vhost; the daemon
writes into a fresh database. Everything created is deleted at the end. Run: scripts/bench --quick
"""

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import tempfile
import time
import uuid
from asyncio.subprocess import STDOUT
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

import aio_pika
import asyncpg
import httpx
from aio_pika.abc import AbstractIncomingMessage
from rich.console import Console
from rich.table import Table

from config.settings import Settings

AMQP = "amqp://guest:guest@127.0.0.1:5672"
MANAGEMENT = "http://127.0.0.1:15672"
POSTGRES = "postgresql://root@127.0.0.1:5432"
EXCHANGE = "bench"
ARCHIVE_QUEUE: str = Settings.model_fields["queue"].default
PREFETCH: int = Settings.model_fields["prefetch"].default  # the daemon's default, not the environment's
ACK_EVERY = 1000
CONFIRM_WINDOW = 1000
BODY = b"x" * 512
POLL = 0.2
CAPTURE = Path(sys.executable).parent / "rabbit-capture"
log = Console(stderr=True)


def esc(vhost: str) -> str:
    """A vhost name as one URL path segment."""
    return quote(vhost, safe="")


def message(index: int) -> aio_pika.Message:
    """The index-th benchmark message: 512-byte body, 3 headers, persistent."""
    headers: dict[str, Any] = {"seq": index, "source": "bench", "tenant": f"t-{index % 7}"}
    return aio_pika.Message(
        BODY, message_id=f"m-{index}", headers=headers, delivery_mode=aio_pika.DeliveryMode.PERSISTENT
    )


async def publish(vhost: str, count: int) -> None:
    """Publish count messages to EXCHANGE, CONFIRM_WINDOW confirms in flight at a time."""
    async with await aio_pika.connect(f"{AMQP}/{esc(vhost)}") as connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(EXCHANGE, ensure=False)
        for start in range(0, count, CONFIRM_WINDOW):
            window = range(start, min(count, start + CONFIRM_WINDOW))
            await asyncio.gather(
                *(exchange.publish(message(i), routing_key=f"bench.{i % 10}") for i in window)
            )


async def baseline(vhost: str, count: int) -> float:
    """msg/s of a consumer that stores nothing, first delivery to last, from a quorum-queue backlog."""
    async with await aio_pika.connect(f"{AMQP}/{esc(vhost)}") as connection:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue("baseline", durable=True, arguments={"x-queue-type": "quorum"})
        await queue.bind(exchange, "#")
        log.log(f"publishing {count} messages to vhost {vhost}")
        await publish(vhost, count)
        await channel.set_qos(prefetch_count=PREFETCH)
        done = asyncio.Event()
        received, first = 0, 0.0

        async def on_message(delivered: AbstractIncomingMessage) -> None:
            nonlocal received, first
            received += 1
            if received == 1:
                first = time.perf_counter()
            if received % ACK_EVERY == 0 or received == count:
                await delivered.ack(multiple=True)
            if received == count:
                done.set()

        log.log("baseline: draining")
        tag = await queue.consume(on_message)
        await asyncio.wait_for(done.wait(), timeout=60 + count / 500)
        elapsed = time.perf_counter() - first
        await queue.cancel(tag)
    return (count - 1) / elapsed


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float:
    """VmHWM of a process in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


class Daemon:
    """`rabbit-capture run` in a subprocess, configured only by environment variables."""

    def __init__(self, vhost: str, database_url: str, output: IO[bytes]) -> None:
        self.port = free_port()
        self.output = output
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RABBIT_ARCHIVE_")}
        self.env |= {
            "RABBIT_ARCHIVE_AMQP_URL": f"{AMQP}/{esc(vhost)}",
            "RABBIT_ARCHIVE_DATABASE_URL": database_url,
            "RABBIT_ARCHIVE_HTTP_PORT": str(self.port),
            "RABBIT_ARCHIVE_LOG_LEVEL": "WARNING",
        }
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
            self.output.flush()
            text = Path(self.output.name).read_text(errors="replace")[-4000:]
            raise RuntimeError(f"rabbit-capture exited {self.process.returncode}:\n{text}")

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
    """Wait until /readyz is 200 and the archive queue is bound to EXCHANGE."""
    path = f"/api/bindings/{esc(vhost)}/e/{EXCHANGE}/q/{ARCHIVE_QUEUE}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        daemon.check_running()
        with contextlib.suppress(httpx.HTTPError):
            ready = await api.get(f"http://127.0.0.1:{daemon.port}/readyz")
            bindings = await api.get(path)
            if ready.status_code == 200 and bindings.status_code == 200 and bindings.json():
                return
        await asyncio.sleep(0.1)
    raise RuntimeError("rabbit-capture did not become ready and bind the exchange within 60 s")


async def capture(
    api: httpx.AsyncClient, vhost: str, database_url: str, count: int, output: IO[bytes]
) -> dict[str, Any]:
    """Let the daemon declare and bind, stop it, publish the backlog, then time a fresh daemon draining it."""
    topic = {"type": "topic", "durable": True}
    (await api.put(f"/api/exchanges/{esc(vhost)}/{EXCHANGE}", json=topic)).raise_for_status()
    daemon = Daemon(vhost, database_url, output)
    database = await asyncpg.connect(database_url)
    try:
        await daemon.start()
        await wait_bound(api, daemon, vhost)
        await daemon.stop()
        log.log(f"publishing {count} messages to vhost {vhost}")
        await publish(vhost, count)
        log.log("rabbit-capture: draining")
        started = time.perf_counter()
        pid = await daemon.start()
        first: tuple[float, int, float] | None = None  # when, rows then, daemon CPU seconds then
        tick = 0
        while True:
            rows = int(await database.fetchval("SELECT count(*) FROM rabbit_archive.messages"))
            now = time.perf_counter()
            if rows and first is None:
                first = (now, rows, cpu_seconds(pid))
            if rows >= count:
                break
            daemon.check_running()
            if now - started > 60 + count / 500:
                raise RuntimeError(f"only {rows} of {count} rows after {now - started:.0f} s")
            tick += 1
            await asyncio.sleep(max(0.0, started + tick * POLL - time.perf_counter()))
        rss, cpu = peak_rss_mb(pid), cpu_seconds(pid)
        await daemon.stop()
        assert first is not None
        span = now - first[0]
        if first[1] >= count:
            raise RuntimeError(f"all {count} rows arrived within one poll: use more --messages")
        return {
            "capture_msg_per_s": (count - first[1]) / span,
            "capture_first_to_last_s": span,
            "capture_incl_startup_s": now - started,
            "capture_incl_startup_msg_per_s": count / (now - started),
            "rows_at_first_poll": first[1],
            "rows_stored": int(await database.fetchval("SELECT count(*) FROM rabbit_archive.messages")),
            "peak_rss_mb": rss,
            "cpu_seconds": cpu,
            "cpu_seconds_before_first_row": first[2],
            "cpu_s_per_10k_msgs": cpu / count * 10_000,
        }
    finally:
        await daemon.stop()
        await database.close()


async def admin_sql(sql: str) -> None:
    """Run one statement in the server's postgres database, on a fresh connection (retried 3 times)."""
    for attempt in range(3):
        try:
            admin = await asyncpg.connect(f"{POSTGRES}/postgres")
            try:
                await admin.execute(sql)
            finally:
                await admin.close()
            return
        except (OSError, asyncpg.InterfaceError, asyncpg.CannotConnectNowError):
            if attempt == 2:
                raise
            await asyncio.sleep(1)


async def run(count: int, output: IO[bytes]) -> dict[str, Any]:
    """Create two vhosts and a database, measure, and delete them again whatever happens."""
    tag = uuid.uuid4().hex[:10]
    vhosts = {"baseline": f"bench-{tag}-baseline", "capture": f"bench-{tag}-capture"}
    database = f"bench_{tag}"
    async with httpx.AsyncClient(base_url=MANAGEMENT, auth=("guest", "guest"), timeout=10) as api:
        try:
            for vhost in vhosts.values():
                (await api.put(f"/api/vhosts/{esc(vhost)}")).raise_for_status()
                everything = {"configure": ".*", "write": ".*", "read": ".*"}
                (await api.put(f"/api/permissions/{esc(vhost)}/guest", json=everything)).raise_for_status()
            await admin_sql(f'CREATE DATABASE "{database}"')
            baseline_rate = await baseline(vhosts["baseline"], count)
            result = await capture(api, vhosts["capture"], f"{POSTGRES}/{database}", count, output)
        finally:
            for vhost in vhosts.values():
                try:
                    await api.delete(f"/api/vhosts/{esc(vhost)}")
                except httpx.HTTPError as error:
                    log.log(f"[red]could not delete vhost {vhost}: {error}")
            try:
                await admin_sql(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
                log.log(f"[red]could not drop database {database}: {error}")
    ratio = result["capture_msg_per_s"] / baseline_rate
    return {
        "messages": count,
        "prefetch": PREFETCH,
        "baseline_msg_per_s": baseline_rate,
        "ratio": ratio,
        **result,
    }


def show(result: dict[str, Any]) -> None:
    """Print the one-row results table."""
    table = Table(title="rabbit-capture drain benchmark")
    columns = {
        "messages": f"{result['messages']:,}",
        "baseline msg/s": f"{result['baseline_msg_per_s']:,.0f}",
        "capture msg/s\n(first→last row)": f"{result['capture_msg_per_s']:,.0f}",
        "ratio": f"{result['ratio']:.2f}",
        "capture incl.\nstart-up (s)": f"{result['capture_incl_startup_s']:.2f}",
        "peak RSS\nMB": f"{result['peak_rss_mb']:.1f}",
        "CPU s/10k\nmsgs": f"{result['cpu_s_per_10k_msgs']:.2f}",
    }
    for header in columns:
        table.add_column(header, justify="right")
    table.add_row(*columns.values())
    console = Console()
    console.width = max(console.width, 100)  # a pipe's default 80 columns would cut the headers
    console.print(table)


def main() -> None:
    """Parse options, run the benchmark once, print the table and write the JSON."""
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000, help="backlog size (default 100000)")
    parser.add_argument("--quick", action="store_true", help="20000 messages")
    parser.add_argument("--output", type=Path, default=Path("bench-results/capture.json"))
    args = parser.parse_args()
    count = 20_000 if args.quick else args.messages
    if count < 2 * ACK_EVERY:
        parser.error(f"--messages must be at least {2 * ACK_EVERY}")
    with tempfile.NamedTemporaryFile(prefix="bench-capture-", suffix=".log") as output:
        result = asyncio.run(run(count, output))
    show(result)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    log.log(f"wrote {args.output}")


if __name__ == "__main__":
    main()
