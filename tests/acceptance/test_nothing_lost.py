"""Nothing lost, nothing stored twice: SIGKILL, SIGTERM, broker and PostgreSQL outages under load."""

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.conftest import run_sql
from tests.support.daemon import CaptureProcess, command, wait_for
from tests.support.load import BackgroundPublisher, queue_depth
from tests.support.proxy import TcpProxy
from tests.support.services import Services

pytestmark = pytest.mark.acceptance

STORED = "rabbit_archive_messages_stored_total"
DROPPED = "rabbit_archive_dropped_messages_total"


def stored_counts(database_url: str) -> tuple[int, int]:
    """(rows, distinct message ids) in the archive."""
    try:
        row = run_sql(
            database_url, "SELECT count(*), count(DISTINCT message_id) FROM rabbit_archive.messages"
        )[0]
    except Exception:  # schema not there yet, or the database is restarting
        return -1, -1
    return int(row[0]), int(row[1])


def assert_exactly_once(
    database_url: str, expected: int, timeout: float = 60, daemon: CaptureProcess | None = None
) -> None:
    """Wait until `expected` messages are stored, then check none is stored twice.

    On a timeout the daemon's log tail and the rows stored say where the rest went.
    """
    try:
        wait_for(lambda: stored_counts(database_url)[0] >= expected, timeout, what=f"{expected} rows")
    except AssertionError as timeout_error:
        if daemon is None:
            raise
        tail = "\n".join(daemon.log().splitlines()[-40:])
        raise AssertionError(
            f"{timeout_error}; stored {stored_counts(database_url)}; daemon log:\n{tail}"
        ) from None
    time.sleep(1.5)  # anything stored twice would arrive within a batch or two
    rows, distinct = stored_counts(database_url)
    assert (rows, distinct) == (expected, expected)
    ids = {row[0] for row in run_sql(database_url, "SELECT message_id FROM rabbit_archive.messages")}
    assert ids == {f"m-{index}" for index in range(expected)}


@pytest.fixture
def load_exchange(pika_channel: Any) -> str:
    """A topic exchange for the load."""
    pika_channel.exchange_declare("load", "topic", durable=True)
    return "load"


def test_sigkill_twice_during_load_stores_every_message_exactly_once(
    start_capture: Callable[..., CaptureProcess], amqp_url: str, database_url: str, load_exchange: str
) -> None:
    total = 20_000
    daemon = start_capture(batch_size="500")
    daemon.wait_bound(load_exchange)
    publisher = BackgroundPublisher(amqp_url, load_exchange, total, rate=4000).start()
    for _ in range(2):
        wait_for(lambda: stored_counts(database_url)[0] > 0, 20, what="capture under way")
        time.sleep(1.0)
        daemon.kill()
        daemon = start_capture(batch_size="500")
    assert publisher.join() == total
    assert_exactly_once(database_url, total, daemon=daemon)


def test_sigterm_exits_zero_within_ten_seconds_with_everything_acknowledged_stored(
    start_capture: Callable[..., CaptureProcess],
    amqp_url: str,
    database_url: str,
    load_exchange: str,
    services: Services,
    vhost: str,
) -> None:
    daemon = start_capture()
    daemon.wait_bound(load_exchange)
    publisher = BackgroundPublisher(amqp_url, load_exchange, 10_000, rate=3000).start()
    wait_for(lambda: stored_counts(database_url)[0] > 1000, 20, what="capture under way")
    started = time.monotonic()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(10) == 0
    assert time.monotonic() - started < 10
    published = publisher.join()
    rows, distinct = stored_counts(database_url)
    assert rows == distinct
    # What the daemon acknowledged is stored; the rest waits in the archive queue.
    assert rows + queue_depth(services.amqp_host, services.amqp_port, vhost, "rabbit-archive") == published
    assert '"event": "drained"' in daemon.log()


def test_broker_connection_cut_twice_during_load_loses_nothing(
    start_capture: Callable[..., CaptureProcess],
    amqp_url: str,
    database_url: str,
    load_exchange: str,
    services: Services,
    vhost: str,
) -> None:
    total = 10_000
    with TcpProxy(services.amqp_host, services.amqp_port) as proxy:
        proxied = f"amqp://guest:guest@127.0.0.1:{proxy.port}/{vhost}"
        daemon = start_capture(amqp_url=proxied)
        daemon.wait_bound(load_exchange)
        publisher = BackgroundPublisher(amqp_url, load_exchange, total, rate=3000).start()
        for _ in range(2):
            wait_for(lambda: stored_counts(database_url)[0] > 0, 20, what="capture under way")
            time.sleep(0.7)
            proxy.block()  # the broker is gone for the daemon: connections cut, new ones refused
            wait_for(lambda: not daemon.ready(), 10, what="/readyz to report not ready")
            time.sleep(2)
            proxy.unblock()
            daemon.wait_ready(30)
        assert publisher.join() == total
        assert_exactly_once(database_url, total, daemon=daemon)
        assert "broker_session_lost" in daemon.log()


def test_database_outage_through_a_proxy_pauses_capture_and_loses_nothing(
    start_capture: Callable[..., CaptureProcess],
    amqp_url: str,
    database_url: str,
    load_exchange: str,
    services: Services,
) -> None:
    total = 8_000
    with TcpProxy(services.postgres_host, services.postgres_port) as proxy:
        name = database_url.rsplit("/", 1)[1]
        proxied = services.database_url(name, host="127.0.0.1", port=proxy.port)
        daemon = start_capture(database_url=proxied)
        daemon.wait_bound(load_exchange)
        publisher = BackgroundPublisher(amqp_url, load_exchange, total, rate=2000).start()
        wait_for(lambda: stored_counts(database_url)[0] > 0, 20, what="capture under way")
        proxy.block()
        wait_for(lambda: not daemon.ready(), 15, what="/readyz to report not ready")
        frozen = stored_counts(database_url)[0]
        time.sleep(3)
        assert stored_counts(database_url)[0] == frozen  # nothing written, nothing acknowledged
        proxy.unblock()
        wait_for(daemon.ready, 30, what="/readyz to report ready again")
        assert publisher.join() == total
        assert_exactly_once(database_url, total, daemon=daemon)


@pytest.fixture
def postgres_restarter() -> Iterator[Callable[[], None]]:
    """Restarts the local PostgreSQL cluster; always leaves it running."""
    version = subprocess.run(["ls", "/etc/postgresql"], capture_output=True, text=True, check=True)
    cluster = version.stdout.split()[0]
    command = ["pg_ctlcluster", "--skip-systemctl-redirect", cluster, "main"]

    def restart() -> None:
        subprocess.run([*command, "restart"], check=True, capture_output=True, timeout=60)

    try:
        yield restart
    finally:
        subprocess.run([*command, "start"], check=False, capture_output=True, timeout=60)


def test_postgresql_restart_during_load_loses_nothing(
    start_capture: Callable[..., CaptureProcess],
    amqp_url: str,
    database_url: str,
    load_exchange: str,
    postgres_restarter: Callable[[], None],
) -> None:
    total = 8_000
    daemon = start_capture()
    daemon.wait_bound(load_exchange)
    publisher = BackgroundPublisher(amqp_url, load_exchange, total, rate=2000).start()
    wait_for(lambda: stored_counts(database_url)[0] > 0, 20, what="capture under way")
    postgres_restarter()
    assert publisher.join() == total
    assert_exactly_once(database_url, total, daemon=daemon)
    wait_for(daemon.ready, 30, what="ready after the restart")


@pytest.fixture
def broker_restarter() -> Iterator[Callable[[], None]]:
    """Stops and starts the local RabbitMQ application; always leaves it running."""

    def restart() -> None:
        subprocess.run(["rabbitmqctl", "stop_app"], check=True, capture_output=True, timeout=120)
        subprocess.run(["rabbitmqctl", "start_app"], check=True, capture_output=True, timeout=120)
        subprocess.run(["rabbitmqctl", "await_startup"], check=True, capture_output=True, timeout=120)

    try:
        yield restart
    finally:
        subprocess.run(["rabbitmqctl", "start_app"], check=False, capture_output=True, timeout=120)


def test_broker_restart_while_draining_a_backlog_loses_nothing(
    start_capture: Callable[..., CaptureProcess],
    amqp_url: str,
    database_url: str,
    load_exchange: str,
    broker_restarter: Callable[[], None],
) -> None:
    before, after = 30_000, 2_000
    daemon = start_capture()
    daemon.wait_bound(load_exchange)
    assert daemon.stop() == 0  # the archive queue and its bindings stay
    assert BackgroundPublisher(amqp_url, load_exchange, before).start().join() == before
    daemon = start_capture()
    wait_for(lambda: stored_counts(database_url)[0] > 0, 20, what="draining under way")
    # Restart the broker while the daemon is still working through the backlog.
    assert stored_counts(database_url)[0] < before
    broker_restarter()
    wait_for(daemon.ready, 60, what="ready after the broker restart")
    # The second publisher continues the numbering where the first stopped.
    publisher = BackgroundPublisher(amqp_url, load_exchange, before + after, first=before)
    assert publisher.start().join() == before + after
    assert_exactly_once(database_url, before + after, timeout=90, daemon=daemon)


def test_a_minute_long_database_outage_under_steady_load_loses_nothing(
    start_capture: Callable[..., CaptureProcess],
    amqp_url: str,
    database_url: str,
    load_exchange: str,
    services: Services,
    vhost: str,
) -> None:
    rate, outage = 1000, 60.0
    total = int(rate * (outage + 15))
    with TcpProxy(services.postgres_host, services.postgres_port) as proxy:
        name = database_url.rsplit("/", 1)[1]
        proxied = services.database_url(name, host="127.0.0.1", port=proxy.port)
        daemon = start_capture(database_url=proxied)
        daemon.wait_bound(load_exchange)
        publisher = BackgroundPublisher(amqp_url, load_exchange, total, rate=rate).start()
        wait_for(lambda: stored_counts(database_url)[0] > 2 * rate, 20, what="capture under way")
        proxy.block()
        wait_for(lambda: not daemon.ready(), 15, what="/readyz to report not ready")
        frozen = stored_counts(database_url)[0]
        blocked_at = time.monotonic()
        while time.monotonic() - blocked_at < outage:
            assert not daemon.ready()
            time.sleep(1)
        # Nothing written and nothing acknowledged: the archive queue holds the backlog.
        assert stored_counts(database_url)[0] == frozen
        backlog = queue_depth(services.amqp_host, services.amqp_port, vhost, "rabbit-archive")
        assert backlog > rate * outage / 2
        proxy.unblock()
        wait_for(daemon.ready, 120, what="/readyz to report ready again")
        assert publisher.join() == total
        assert_exactly_once(database_url, total, timeout=120, daemon=daemon)
        assert queue_depth(services.amqp_host, services.amqp_port, vhost, "rabbit-archive") == 0


def test_queue_cap_drops_oldest_during_an_outage_and_counts_every_dropped_message(
    start_capture: Callable[..., CaptureProcess],
    amqp_url: str,
    database_url: str,
    load_exchange: str,
    services: Services,
) -> None:
    total = 3_000
    with TcpProxy(services.postgres_host, services.postgres_port) as proxy:
        name = database_url.rsplit("/", 1)[1]
        proxied = services.database_url(name, host="127.0.0.1", port=proxy.port)
        daemon = start_capture(database_url=proxied, queue_max_bytes="100000", prefetch="100")
        daemon.wait_bound(load_exchange)
        proxy.block()
        assert BackgroundPublisher(amqp_url, load_exchange, total, rate=3000).start().join() == total
        wait_for(lambda: not daemon.ready(), 15, what="/readyz to report not ready")
        wait_for(lambda: daemon.metric_total(DROPPED) > 0, 30, what="dropped messages counted")
        proxy.unblock()
        wait_for(daemon.ready, 60, what="/readyz to report ready again")
        # Every message is either stored (once) or counted as dropped.
        wait_for(
            lambda: stored_counts(database_url)[0] + daemon.metric_total(DROPPED) >= total,
            60,
            what="stored + dropped = published",
        )
        time.sleep(1.5)
        rows, distinct = stored_counts(database_url)
        dropped = daemon.metric_total(DROPPED)
        assert rows == distinct
        assert rows + dropped == total
        assert dropped > total / 2  # the cap (100 kB) holds far fewer than 3,000 messages of 256 bytes
        assert '"event": "message_dropped"' in daemon.log()
        assert '"exchange": "load"' in daemon.log()


def test_two_daemons_one_active_consumer_takes_over_after_sigkill_in_publish_order(
    start_capture: Callable[..., CaptureProcess], amqp_url: str, database_url: str, load_exchange: str
) -> None:
    total = 20_000
    first, second = start_capture(), start_capture()
    first.wait_bound(load_exchange)
    publisher = BackgroundPublisher(amqp_url, load_exchange, total, rate=3000).start()
    wait_for(lambda: stored_counts(database_url)[0] > 3000, 30, what="capture under way")
    # x-single-active-consumer: exactly one daemon has stored anything.
    stored = {daemon: daemon.metric_total(STORED) for daemon in (first, second)}
    active = max(stored, key=lambda daemon: stored[daemon])
    standby = second if active is first else first
    assert stored[standby] == 0
    active.kill()
    wait_for(lambda: standby.metric_total(STORED) > 0, 15, what="the standby to take over")
    assert publisher.join() == total
    assert_exactly_once(database_url, total, daemon=standby)
    archived = [
        row[0] for row in run_sql(database_url, "SELECT message_id FROM rabbit_archive.messages ORDER BY id")
    ]
    assert archived == [f"m-{index}" for index in range(total)]  # archive order is publish order


def test_prune_during_load_drops_old_days_and_loses_nothing_being_written(
    start_capture: Callable[..., CaptureProcess],
    capture_env: dict[str, str],
    amqp_url: str,
    database_url: str,
    load_exchange: str,
) -> None:
    total = 15_000
    daemon = start_capture()
    daemon.wait_bound(load_exchange)
    # A month of old days, each in its own partition, 1,000 rows a day.
    run_sql(database_url, "SELECT rabbit_archive.ensure_partitions(current_date - 40, 30)")
    run_sql(
        database_url,
        """INSERT INTO rabbit_archive.messages
               (captured_at, vhost, exchange, routing_key, redelivered, properties_raw, properties,
                body, body_size)
           SELECT current_date - 40 + (i % 30) + time '12:00', '/', 'old', 'rk', false, '\\x0000',
                  '{}', 'b', 1
           FROM generate_series(1, 30000) AS i""",
    )
    publisher = BackgroundPublisher(amqp_url, load_exchange, total, rate=3000).start()
    wait_for(lambda: stored_counts(database_url)[0] > 30_000 + 1000, 20, what="capture under way")
    result = subprocess.run(
        [command("rabbit-capture"), "prune", "--older-than", "10d", "--yes"],
        env={**{k: v for k, v in os.environ.items() if not k.startswith("RABBIT_ARCHIVE_")}, **capture_env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "dropped 30 daily partitions" in result.stdout  # whole days, not rows
    assert publisher.join() == total
    old = run_sql(database_url, "SELECT count(*) FROM rabbit_archive.messages WHERE exchange = 'old'")
    assert old[0][0] == 0
    run_sql(database_url, "DELETE FROM rabbit_archive.messages WHERE exchange = 'old'")
    assert_exactly_once(database_url, total, daemon=daemon)


def test_large_batches_written_two_at_a_time_keep_publish_order_and_store_each_message_once(
    start_capture: Callable[..., CaptureProcess], amqp_url: str, database_url: str, load_exchange: str
) -> None:
    """Batches of large rows are written two at a time on two connections (here every batch is
    large: BATCH_MAX_BYTES of 16 KiB and 1 KiB bodies); ids still follow delivery order."""
    total = 6_000
    daemon = start_capture(batch_max_bytes=str(16 * 1024))
    daemon.wait_bound(load_exchange)
    assert daemon.stop() == 0  # the queue and its bindings stay: a backlog builds up
    assert BackgroundPublisher(amqp_url, load_exchange, total, body_size=1024).start().join() == total
    daemon = start_capture(batch_max_bytes=str(16 * 1024))
    assert_exactly_once(database_url, total, daemon=daemon)
    assert daemon.metric_total("rabbit_archive_batches_beside_total") > 0
    archived = [
        row[0] for row in run_sql(database_url, "SELECT message_id FROM rabbit_archive.messages ORDER BY id")
    ]
    assert archived == [f"m-{index}" for index in range(total)]  # archive order is publish order
