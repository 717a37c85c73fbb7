"""The archive says what it does not hold: in `status`, in /metrics and in its coverage history."""

import json
import os
import subprocess
import time
from collections.abc import Callable
from typing import Any

import pika
import pytest

from tests.conftest import run_sql
from tests.support.daemon import CaptureProcess, command, wait_for
from tests.support.fake_management import FakeManagement
from tests.support.load import BackgroundPublisher
from tests.support.services import Services

pytestmark = pytest.mark.acceptance


def status_json(env: dict[str, str]) -> dict[str, Any]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RABBIT_ARCHIVE_")}
    result = subprocess.run(
        [command("rabbit-capture"), "status", "--json"],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "Traceback" not in result.stderr, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def events(database_url: str) -> list[tuple[Any, ...]]:
    rows = run_sql(
        database_url,
        "SELECT vhost, exchange, event, reason, messages FROM rabbit_archive.coverage_events ORDER BY id",
    )
    return [tuple(row) for row in rows]


def test_default_exchange_traffic_is_reported_under_bindings_and_captured_under_bindings_plus_default(
    start_capture: Callable[..., CaptureProcess],
    capture_env: dict[str, str],
    pika_channel: Any,
    amqp_url: str,
    vhost: str,
    database_url: str,
) -> None:
    pika_channel.queue_declare("celery")
    daemon = start_capture()
    # A task framework's producer: straight into the queue through the default exchange.
    producer = BackgroundPublisher(amqp_url, "", 1_000_000, rate=50, routing_key=lambda _: "celery").start()
    try:

        def default_gap() -> dict[str, Any] | None:
            for item in status_json(capture_env)["coverage"]:
                if item["exchange"] == "" and item["rate"]:
                    return item
            return None

        # The broker's statistics are refreshed every few seconds.
        wait_for(default_gap, 40, interval=1, what="status reporting the default exchange's traffic")
        gap = default_gap()
        assert gap is not None
        assert "default exchange" in gap["reason"]
        assert gap["rate"] > 0
        metric = [
            line
            for line in daemon.metrics().splitlines()
            if line.startswith("rabbit_archive_uncaptured_messages_per_second{")
            and 'exchange="(default)"' in line
        ]
        assert metric, daemon.metrics()
        assert (
            run_sql(database_url, "SELECT count(*) FROM rabbit_archive.messages WHERE exchange = ''")[0][0]
            == 0
        )
    finally:
        producer.stop()
        producer.join()
    assert daemon.stop() == 0
    history = events(database_url)
    assert (vhost, None, "source", "bindings", None) in history
    assert any(row[1] == "" and row[2] == "skipped" for row in history)
    verdict = coverage_json(capture_env, "--exchange", "", "--since", "1h")
    assert verdict["complete"] is False
    assert any(gap["exchange"] == "" and "default exchange" in gap["reason"] for gap in verdict["gaps"])

    # The same producer under SOURCE=bindings+default: archived, and replayed back into its queue.
    start_capture(source="bindings+default")
    pika_channel.basic_publish("", "celery", b"task-1", pika.BasicProperties(message_id="task-1"))
    wait_for(
        lambda: (
            run_sql(database_url, "SELECT count(*) FROM rabbit_archive.messages WHERE message_id = 'task-1'")[
                0
            ][0]
            == 1
        ),
        15,
        what="the task message archived",
    )
    pika_channel.queue_purge("celery")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RABBIT_ARCHIVE_")}
    replay = subprocess.run(
        [command("rabbit-replay"), "run", "--message-id", "task-1", "--to-queue", "celery", "--yes"],
        env={**clean, **capture_env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert replay.returncode == 0, replay.stderr
    method, properties, body = None, None, None
    deadline = time.monotonic() + 10
    while method is None and time.monotonic() < deadline:
        method, properties, body = pika_channel.basic_get("celery", auto_ack=True)
    assert body == b"task-1"
    assert properties is not None
    assert properties.message_id == "task-1"
    assert "x-replay-id" in properties.headers
    # The history is written every few seconds.
    wait_for(
        lambda: any(row[1] == "" and row[2] == "bound" for row in events(database_url)),
        15,
        what="the default exchange recorded as captured",
    )
    assert (vhost, None, "source", "bindings+default", None) in events(database_url)


def slow_binding_listings(path: str, answer: Any) -> Any:
    """A loaded broker's management API (FakeManagement's tamper): listing bindings takes a
    second, while the archive queue is consumed at once over AMQP."""
    if "/bindings/" in path:
        time.sleep(1)
    return answer


def archived_bodies(database_url: str) -> set[tuple[str, bytes]]:
    """(exchange, body) of every archived message."""
    rows = run_sql(database_url, "SELECT exchange, body FROM rabbit_archive.messages")
    return {(row[0], bytes(row[1])) for row in rows}


@pytest.mark.parametrize("source", ["bindings", "bindings+default"])
def test_what_is_published_as_soon_as_the_daemon_is_ready_is_archived(
    source: str,
    start_capture: Callable[..., CaptureProcess],
    pika_channel: Any,
    services: Services,
    database_url: str,
) -> None:
    exchanges = [f"orders.{index}" for index in range(30)]
    for exchange in exchanges:
        pika_channel.exchange_declare(exchange, "fanout")
    pika_channel.queue_declare("celery")

    with FakeManagement(services.management_url, slow_binding_listings) as management:
        start_capture(source=source, management_url=management.url)  # returns at the first 200 from /readyz
        for exchange in exchanges:
            pika_channel.basic_publish(exchange, "", exchange.encode())
        pika_channel.basic_publish("", "celery", b"task")
        expected = {(exchange, exchange.encode()) for exchange in exchanges}
        if source == "bindings+default":
            expected.add(("", b"task"))

        wait_for(
            lambda: archived_bodies(database_url) >= expected,
            15,
            what="every message published at readiness archived",
        )
        assert archived_bodies(database_url) == expected


def test_an_archive_queue_deleted_under_the_daemon_is_bound_again_before_it_is_ready(
    start_capture: Callable[..., CaptureProcess],
    pika_channel: Any,
    services: Services,
    database_url: str,
) -> None:
    exchanges = [f"orders.{index}" for index in range(10)]
    for exchange in exchanges:
        pika_channel.exchange_declare(exchange, "fanout")

    with FakeManagement(services.management_url, slow_binding_listings) as management:
        daemon = start_capture(management_url=management.url)
        pika_channel.queue_delete("rabbit-archive")  # an operator's mistake: its bindings go with it
        wait_for(lambda: not daemon.ready(), 10, interval=0.02, what="/readyz answering 503")
        # Declared again by the daemon, and ready only once bound again.
        daemon.wait_ready()
        for exchange in exchanges:
            pika_channel.basic_publish(exchange, "", exchange.encode())

        expected = {(exchange, exchange.encode()) for exchange in exchanges}
        wait_for(
            lambda: archived_bodies(database_url) >= expected,
            15,
            what="every message published at readiness archived",
        )
        assert archived_bodies(database_url) == expected


def coverage_json(env: dict[str, str], *args: str) -> dict[str, Any]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RABBIT_ARCHIVE_")}
    result = subprocess.run(
        [command("rabbit-replay"), "coverage", "--json", *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    verdict: dict[str, Any] = json.loads(result.stdout)
    return verdict


def test_an_exchange_declared_later_and_drops_are_in_the_coverage_history(
    start_capture: Callable[..., CaptureProcess],
    capture_env: dict[str, str],
    pika_channel: Any,
    vhost: str,
    database_url: str,
) -> None:
    daemon = start_capture(queue_max_bytes="20000")
    window_start = run_sql(database_url, "SELECT now() - interval '1 second'")[0][0]
    time.sleep(1)
    pika_channel.exchange_declare("late", "fanout")
    daemon.wait_bound("late")
    wait_for(
        lambda: any(row[1] == "late" and row[2] == "bound" for row in events(database_url)),
        15,
        what="the binding of 'late' in the coverage history",
    )
    # Fill the capped archive queue while the daemon is stopped: the oldest are dropped.
    assert daemon.stop() == 0
    for n in range(100):
        pika_channel.basic_publish("late", "", b"x" * 1000, pika.BasicProperties(message_id=f"d-{n}"))
    daemon = start_capture(queue_max_bytes="20000")
    stored = 0

    def dropped() -> int:
        return sum(row[4] or 0 for row in events(database_url) if row[2] == "dropped")

    def all_accounted() -> bool:
        nonlocal stored
        stored = run_sql(
            database_url, "SELECT count(*) FROM rabbit_archive.messages WHERE exchange = 'late'"
        )[0][0]
        return stored + dropped() == 100

    wait_for(all_accounted, 30, what="stored + dropped = published")
    assert dropped() > 0
    assert all(
        row[1] == "late" and row[3] == "QUEUE_MAX_BYTES reached"
        for row in events(database_url)
        if row[2] == "dropped"
    )

    # The verdict for a window that starts before 'late' was bound: a gap up to its binding,
    # and the drops with their count.
    time.sleep(6)  # the history is written every 5 s
    verdict = coverage_json(capture_env, "--exchange", "late", "--since", window_start.isoformat())
    assert verdict["complete"] is False
    reasons = [gap["reason"] for gap in verdict["gaps"]]
    assert reasons[0] == "no capture recorded for this exchange"
    assert verdict["gaps"][0]["from"] == window_start.isoformat()
    dropped_gaps = [gap for gap in verdict["gaps"] if gap["reason"].startswith("dropped")]
    assert sum(gap["messages"] for gap in dropped_gaps) == dropped()
    assert [item["exchange"] for item in verdict["captured"]] == ["late"]
    # The dry run (and the confirmation prompt, printed before it) tells the same.
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RABBIT_ARCHIVE_")}
    dry_run = subprocess.run(
        [
            command("rabbit-replay"),
            "run",
            "--exchange",
            "late",
            "--since",
            window_start.isoformat(),
            "--dry-run",
        ],
        env={**clean, **capture_env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert dry_run.returncode == 0, dry_run.stderr
    assert "coverage: INCOMPLETE" in dry_run.stdout
    assert "dropped: QUEUE_MAX_BYTES reached" in dry_run.stdout
    assert daemon.process is not None
    assert daemon.process.poll() is None
