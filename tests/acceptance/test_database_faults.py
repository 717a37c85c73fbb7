"""A database that refuses writes (read-only after a failover) holds capture back, never ends it."""

import asyncio
import contextlib
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import asyncpg
import httpx
import pika
import pytest

from tests.conftest import run_sql
from tests.support.daemon import CaptureProcess, command, wait_for
from tests.support.services import Services

pytestmark = pytest.mark.acceptance

QUEUE = "rabbit-archive"


def database_name(database_url: str) -> str:
    return unquote(urlsplit(database_url).path[1:])


def set_read_only(services: Services, name: str, read_only: bool) -> None:
    """What a failover to a standby looks like to the daemon: every new session is read-only.

    The setting applies to new sessions only, so the database's sessions are ended.
    """
    value = "on" if read_only else "off"
    run_sql(services.postgres_url, f'ALTER DATABASE "{name}" SET default_transaction_read_only = {value}')
    run_sql(
        services.postgres_url,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = $1 AND pid <> pg_backend_pid()",
        name,
    )


@contextlib.contextmanager
def table_locked(database_url: str, table: str) -> Iterator[None]:
    """Hold an ACCESS EXCLUSIVE lock on a table (from a thread of its own) while inside."""
    locked, release = threading.Event(), threading.Event()
    failure: list[BaseException] = []

    async def hold() -> None:
        connection = await asyncpg.connect(database_url)
        try:
            async with connection.transaction():
                await connection.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
                locked.set()
                await asyncio.to_thread(release.wait, 120)
        finally:
            await connection.close()

    def run() -> None:
        try:
            asyncio.run(hold())
        except BaseException as error:  # reported below
            failure.append(error)
            locked.set()

    thread = threading.Thread(target=run, name="test-table-lock", daemon=True)
    thread.start()
    locked.wait(10)
    if failure:
        raise failure[0]
    try:
        yield
    finally:
        release.set()
        thread.join(10)


def stored_ids(database_url: str) -> list[str]:
    """The message ids in the archive, one per row."""
    return [row[0] for row in run_sql(database_url, "SELECT message_id FROM rabbit_archive.messages")]


def publish(channel: Any, exchange: str, indexes: range) -> None:
    for index in indexes:
        channel.basic_publish(
            exchange,
            f"order.{index}",
            f"body {index}".encode(),
            pika.BasicProperties(message_id=f"m-{index}", delivery_mode=2),
        )


def queue_messages(management: httpx.Client, vhost: str) -> int:
    """Ready and unacknowledged messages of the archive queue (management stats, a few seconds late)."""
    answer = management.get(f"/api/queues/{quote(vhost, safe='')}/{QUEUE}").json()
    return int(answer.get("messages") or 0)


def readyz(daemon: CaptureProcess) -> int:
    return httpx.get(f"http://127.0.0.1:{daemon.http_port}/readyz", timeout=2).status_code


def assert_stored_exactly_once(database_url: str, count: int) -> None:
    wait_for(lambda: len(stored_ids(database_url)) >= count, 60, what=f"{count} rows")
    time.sleep(1.5)  # anything stored twice would arrive within a batch or two
    ids = stored_ids(database_url)
    assert sorted(ids) == sorted(f"m-{index}" for index in range(count))


def running(daemon: CaptureProcess) -> bool:
    return daemon.process is not None and daemon.process.poll() is None


def assert_alive_without_traceback(daemon: CaptureProcess) -> None:
    assert running(daemon), f"rabbit-capture exited:\n{daemon.log()}"
    assert "Traceback" not in daemon.log()


def test_a_database_gone_read_only_holds_the_messages_in_the_queue_until_writable(
    start_capture: Callable[..., CaptureProcess],
    services: Services,
    database_url: str,
    management: httpx.Client,
    vhost: str,
    pika_channel: Any,
) -> None:
    # A full batch is written at once; an idle daemon cleans the batch's redelivery fingerprints
    # FLUSH_INTERVAL later, which here falls in the read-only window.
    daemon = start_capture(batch_size="10", flush_interval="3")
    pika_channel.exchange_declare("orders", "topic", durable=True)
    daemon.wait_bound("orders")
    publish(pika_channel, "orders", range(10))
    wait_for(lambda: len(stored_ids(database_url)) == 10, 20, what="the first batch stored")
    name = database_name(database_url)
    try:
        set_read_only(services, name, True)
        time.sleep(5)  # idle: the fingerprint cleanup meets the read-only database
        assert_alive_without_traceback(daemon)
        publish(pika_channel, "orders", range(10, 35))
        wait_for(lambda: not daemon.ready(), 20, what="/readyz to fail")
        assert readyz(daemon) == 503
        assert "database unavailable" in httpx.get(f"http://127.0.0.1:{daemon.http_port}/readyz").text
        wait_for(lambda: "read-only" in daemon.log(), 20, what="the refusal in the log")
        wait_for(lambda: queue_messages(management, vhost) == 25, 30, what="25 messages held in the queue")
        assert_alive_without_traceback(daemon)
        assert len(stored_ids(database_url)) == 10
        assert readyz(daemon) == 503
    finally:
        set_read_only(services, name, False)
    assert_stored_exactly_once(database_url, 35)
    wait_for(daemon.ready, 30, what="/readyz to answer 200 again")
    wait_for(lambda: queue_messages(management, vhost) == 0, 30, what="the archive queue to drain")
    assert_alive_without_traceback(daemon)
    assert daemon.stop() == 0


def test_a_daemon_started_on_a_read_only_database_waits_then_captures(
    start_capture: Callable[..., CaptureProcess],
    services: Services,
    database_url: str,
    pika_channel: Any,
) -> None:
    name = database_name(database_url)
    run_sql(services.postgres_url, f'CREATE DATABASE "{name}"')
    try:
        set_read_only(services, name, True)
        daemon = start_capture(wait=False)
        wait_for(lambda: "read-only" in daemon.log() or not running(daemon), 30, what="the refused migration")
        time.sleep(2)  # a retry or two
        assert_alive_without_traceback(daemon)
        assert '"event": "database_unavailable"' in daemon.log()
        assert readyz(daemon) == 503
    finally:
        set_read_only(services, name, False)
    daemon.wait_ready(30)
    pika_channel.exchange_declare("orders", "topic", durable=True)
    daemon.wait_bound("orders")
    publish(pika_channel, "orders", range(5))
    assert_stored_exactly_once(database_url, 5)
    assert_alive_without_traceback(daemon)
    assert daemon.stop() == 0


def test_partition_upkeep_that_times_out_on_a_lock_is_retried_not_fatal(
    start_capture: Callable[..., CaptureProcess],
    capture_env: dict[str, str],
    services: Services,
    database_url: str,
    pika_channel: Any,
) -> None:
    migrated = subprocess.run(
        [command("rabbit-capture"), "migrate"], env=capture_env, capture_output=True, text=True, timeout=60
    )
    assert migrated.returncode == 0, migrated.stderr
    name = database_name(database_url)
    run_sql(services.postgres_url, f"ALTER DATABASE \"{name}\" SET lock_timeout = '500ms'")
    try:
        with table_locked(database_url, "rabbit_archive.messages"):
            daemon = start_capture(wait=False)
            # Creating today's partition needs a lock on messages: LockNotAvailableError.
            wait_for(
                lambda: "maintenance_failed" in daemon.log() or not running(daemon),
                30,
                what="the failed partition upkeep",
            )
            assert_alive_without_traceback(daemon)
            assert "lock" in daemon.log().split("maintenance_failed", 1)[1].splitlines()[0]
    finally:
        run_sql(services.postgres_url, f'ALTER DATABASE "{name}" RESET lock_timeout')
    wait_for(lambda: "partitions_created" in daemon.log(), 30, what="the partitions on the next attempt")
    daemon.wait_ready(30)
    pika_channel.exchange_declare("orders", "topic", durable=True)
    daemon.wait_bound("orders")
    publish(pika_channel, "orders", range(5))
    assert_stored_exactly_once(database_url, 5)
    assert_alive_without_traceback(daemon)
    assert daemon.stop() == 0
