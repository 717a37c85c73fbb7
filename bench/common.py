"""What every benchmark phase shares: addresses, the benchmark messages, a confirming publisher, /proc."""

import asyncio
import contextlib
import hashlib
import os
import random
import socket
import subprocess
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

import aio_pika
import asyncpg
import httpx
from rich.console import Console

from rabbit_archive.archive.amqp_codec import Properties, encode_properties
from rabbit_archive.archive.frames import table_from_json
from rabbit_archive.replay.publisher import Publisher

AMQP = "amqp://guest:guest@127.0.0.1:5672"
MANAGEMENT = "http://127.0.0.1:15672"
POSTGRES = "postgresql://root@127.0.0.1:5432"
EXCHANGE = "bench"  # the backlog: drained by both consumers, then replayed
STEADY_EXCHANGE = "bench-steady"  # the steady load: kept apart so that `--exchange bench` selects the backlog
# The replay's publisher bounds: 500 confirms in flight and 16 MiB of bodies (replay/runner.py).
REPLAY_WINDOW = 500
REPLAY_WINDOW_BYTES = 16 * 1024 * 1024
# Publishing the backlog (not measured): a wider window, still bounded in bytes.
BACKLOG_WINDOW = 1000
BACKLOG_WINDOW_BYTES = 64 * 1024 * 1024
log = Console(stderr=True)


@dataclass(frozen=True)
class Sizes:
    """How many messages of what size one run uses, and the time limits that follow from them."""

    messages: int
    body_size: int

    @property
    def body(self) -> bytes:
        """The body of every message: random bytes, so PostgreSQL cannot compress big ones away."""
        return random.Random(self.body_size).randbytes(self.body_size)

    def timeout(self, count: int | None = None, per_second: int = 500) -> float:
        """A generous limit for moving count messages (default: all): 60 s + 2 ms each + 10 MB/s."""
        count = self.messages if count is None else count
        return 60 + count / per_second + count * self.body_size / 10_000_000


def esc(vhost: str) -> str:
    """A vhost name as one URL path segment."""
    return quote(vhost, safe="")


def amqp_url(vhost: str) -> str:
    """The broker URL of a vhost."""
    return f"{AMQP}/{esc(vhost)}"


def bench_headers(index: int) -> dict[str, Any]:
    """The 3 headers of the index-th benchmark message."""
    return {"seq": index, "source": "bench", "tenant": f"t-{index % 7}"}


def message(index: int, body: bytes, **extra_headers: Any) -> aio_pika.Message:
    """The index-th benchmark message: the body, 3 headers (plus extra ones), persistent."""
    headers = bench_headers(index) | extra_headers
    return aio_pika.Message(
        body, message_id=f"m-{index}", headers=headers, delivery_mode=aio_pika.DeliveryMode.PERSISTENT
    )


def window_size(body_size: int, count: int, max_bytes: int) -> int:
    """Publishes in flight under both bounds: count messages and max_bytes of bodies."""
    return max(1, min(count, -(-max_bytes // max(body_size, 1))))


async def publish(
    vhost: str,
    sizes: Sizes,
    *,
    exchange: str = EXCHANGE,
    queue: str | None = None,
    window: int = BACKLOG_WINDOW,
    window_bytes: int = BACKLOG_WINDOW_BYTES,
) -> float:
    """Publish sizes.messages messages with confirms, a sliding window of them in flight; returns seconds.

    To `exchange` with routing keys bench.0..bench.9, or with `queue` straight into that queue through
    the default exchange. The time runs from the first publish to the last confirm.
    """
    body = sizes.body
    in_flight = window_size(sizes.body_size, window, window_bytes)
    async with await aio_pika.connect(amqp_url(vhost)) as connection:
        channel = await connection.channel(publisher_confirms=True)
        target = channel.default_exchange if queue else await channel.get_exchange(exchange, ensure=False)
        pending: deque[asyncio.Task[Any]] = deque()
        try:
            started = time.perf_counter()
            for index in range(sizes.messages):
                while len(pending) >= in_flight:
                    await pending.popleft()
                routing_key = queue or f"bench.{index % 10}"
                publishing = target.publish(message(index, body), routing_key=routing_key)
                pending.append(asyncio.create_task(publishing))
            await asyncio.gather(*pending)
            return time.perf_counter() - started
        finally:
            await cancel(pending)


def backlog_properties(index: int, **extra_headers: int) -> bytes:
    """The property bytes of `message`'s message (plus integer headers), for Publisher."""
    headers = table_from_json(bench_headers(index) | extra_headers)
    return encode_properties(Properties(headers=headers, delivery_mode=2, message_id=f"m-{index}".encode()))


async def fill(vhost: str, sizes: Sizes, *, exchange: str = EXCHANGE, queue: str | None = None) -> None:
    """Publish the backlog a phase drains (as `publish`, not timed) with the replay's publisher: about
    three times faster than aio-pika here, which keeps `--quick` under a minute."""
    body = sizes.body
    in_flight = window_size(sizes.body_size, BACKLOG_WINDOW, BACKLOG_WINDOW_BYTES)
    publisher = Publisher(amqp_url(vhost), vhost)
    await publisher.connect()
    pending: deque[asyncio.Future[None]] = deque()
    try:
        for index in range(sizes.messages):
            while len(pending) >= in_flight:
                await pending.popleft()
            routing_key = queue or f"bench.{index % 10}"
            pending.append(
                publisher.publish("" if queue else exchange, routing_key, backlog_properties(index), body)
            )
        await asyncio.wait_for(asyncio.gather(*pending), timeout=sizes.timeout())
    finally:
        await publisher.close()


async def publish_steadily(
    vhost: str, sizes: Sizes, total: int, rate: float, *, check: Callable[[], None] = lambda: None
) -> float:
    """Publish `total` messages at `rate` to STEADY_EXCHANGE with routing key `steady`; returns seconds.

    Each message carries a `published_at_us` header (microseconds since the epoch) taken as its
    bytes are written for the socket. The publisher is the replay's (rabbit_archive.replay.publisher:
    frames written as bytes, one socket write per tick, confirms settled by tag): aio-pika's, with a
    task per publish, fell behind at 5,000 msg/s on two cores shared with the broker and the
    daemon, so the stamps aged in the benchmark's own event loop for seconds before the broker saw
    them. `check` runs at every tick (it raises to stop). The time runs from the first publish to
    the last one; the confirms are awaited after it.
    """
    body = sizes.body
    publisher = Publisher(amqp_url(vhost), vhost)
    await publisher.connect()
    confirms: list[asyncio.Future[None]] = []
    try:
        started = time.perf_counter()
        while len(confirms) < total:
            due = min(total, int((time.perf_counter() - started) * rate) + 1)
            while len(confirms) < due:
                index = sizes.messages + len(confirms)  # message ids apart from the backlog's
                properties = backlog_properties(index, published_at_us=time.time_ns() // 1000)
                confirms.append(publisher.publish(STEADY_EXCHANGE, "steady", properties, body))
            check()
            await asyncio.sleep(max(0.0, started + due / rate - time.perf_counter()))
        published_s = time.perf_counter() - started
        await asyncio.wait_for(asyncio.gather(*confirms), timeout=sizes.timeout(total))
    finally:
        await publisher.close()
    return published_s


async def cancel(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel the tasks not done yet and wait for them all, their outcome ignored."""
    tasks = list(tasks)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


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


@contextlib.asynccontextmanager
async def scratch_vhost(api: httpx.AsyncClient, vhost: str) -> AsyncIterator[str]:
    """A new vhost where guest may do everything, deleted afterwards whatever happens."""
    (await api.put(f"/api/vhosts/{esc(vhost)}")).raise_for_status()
    try:
        everything = {"configure": ".*", "write": ".*", "read": ".*"}
        (await api.put(f"/api/permissions/{esc(vhost)}/guest", json=everything)).raise_for_status()
        yield vhost
    finally:
        with contextlib.suppress(httpx.HTTPError):
            await api.delete(f"/api/vhosts/{esc(vhost)}")


async def settle_database() -> None:
    """A CHECKPOINT before a timed phase that writes to PostgreSQL.

    Each phase leaves dirty buffers and WAL behind it; without this, the next phase pays for the
    checkpoint they bring on (measured: a capture drain of 16 KB messages right after the COPY
    baselines wrote 140-190 MB/s to the disk instead of 80-90, and drained 3,600-4,100 msg/s
    instead of 4,050-4,760). Every timed phase that writes starts from the same clean state.
    """
    await admin_sql("CHECKPOINT")


@contextlib.asynccontextmanager
async def scratch_database(name: str) -> AsyncIterator[str]:
    """A new database, its URL yielded, dropped afterwards whatever happens."""
    await admin_sql(f'CREATE DATABASE "{name}"')
    try:
        yield f"{POSTGRES}/{name}"
    finally:
        await admin_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def git_state() -> dict[str, Any]:
    """The commit measured, and whether (and where) the tracked files differ from it (taken at start)."""

    def git(*args: str) -> str:
        repository = Path(__file__).resolve().parent.parent
        done = subprocess.run(["git", *args], capture_output=True, text=True, check=True, cwd=repository)
        return done.stdout.strip()

    changed = git("status", "--porcelain", "--untracked-files=no").splitlines()
    diff = hashlib.sha256(git("diff", "HEAD").encode()).hexdigest()[:12] if changed else None
    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "dirty": bool(changed),
        "changed": changed,
        "diff_sha256": diff,  # tells apart runs of different uncommitted states
    }


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def broker_pid() -> int | None:
    """The pid of the process listening on the broker's AMQP port (readable when run as root), if found."""
    port = int(AMQP.rsplit(":", 1)[1])
    listed = subprocess.run(["ss", "-Hltnp", f"sport = :{port}"], capture_output=True, text=True, check=False)
    for line in listed.stdout.splitlines():
        _, found, rest = line.partition("pid=")
        if found:
            return int(rest.split(",", 1)[0])
    return None


def peak_rss_mb(pid: int) -> float:
    """VmHWM of a process in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


def log_tail(output: IO[bytes]) -> str:
    """The last 4,000 characters written to a subprocess's log file."""
    output.flush()
    return Path(output.name).read_text(errors="replace")[-4000:]
