"""Catch-up subscriptions: `run --follow` replays the selection, then what is archived later.

Against the real daemon, broker and database: the target queue receives every message once,
in archive order, the live ones shortly after their capture; a follower killed with SIGKILL
and resumed misses nothing; retention dropping what a follower has not reached is reported.
"""

import signal
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import pika
import pytest

from tests.acceptance.test_replay import assert_one_line_error, json_lines, ok, replay_command
from tests.acceptance.test_replay_resume import archived, start_replay
from tests.conftest import run_sql
from tests.support.daemon import CaptureProcess, wait_for
from tests.support.load import BackgroundPublisher
from tests.support.services import Services

pytestmark = pytest.mark.acceptance


class Receiver:
    """Consumes a queue in a thread, keeping each message's archive id and arrival time."""

    def __init__(self, services: Services, vhost: str, queue: str) -> None:
        self.received: list[tuple[int, float]] = []
        self._parameters = pika.ConnectionParameters(
            host=services.amqp_host,
            port=services.amqp_port,
            virtual_host=vhost,
            credentials=pika.PlainCredentials("guest", "guest"),
        )
        self._queue = queue
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="test-receiver", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        connection = pika.BlockingConnection(self._parameters)
        try:
            channel = connection.channel()
            for method, properties, _body in channel.consume(
                self._queue, auto_ack=True, inactivity_timeout=0.1
            ):
                if method is not None:
                    self.received.append((properties.headers["x-replay-archive-id"], time.time()))
                if self._stop.is_set():
                    break
            channel.cancel()
        finally:
            connection.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)


def stored(database_url: str) -> list[tuple[int, datetime]]:
    rows = run_sql(database_url, "SELECT id, captured_at FROM rabbit_archive.messages ORDER BY id")
    return [(row[0], row[1]) for row in rows]


def settled(receiver: Receiver) -> bool:
    """True once nothing more arrived for half a second."""
    before = len(receiver.received)
    time.sleep(0.5)
    return len(receiver.received) == before


def followers(env: dict[str, str]) -> list[dict[str, Any]]:
    return json_lines(ok(replay_command(env, "followers", "--json")))


@pytest.fixture
def receiver(services: Services, vhost: str, pika_channel: Any) -> Iterator[Receiver]:
    pika_channel.queue_declare("rebuilt", durable=True)
    started = Receiver(services, vhost, "rebuilt")
    try:
        yield started
    finally:
        started.close()


@pytest.fixture
def daemon(start_capture: Callable[..., CaptureProcess], pika_channel: Any) -> Iterator[CaptureProcess]:
    running = start_capture()
    pika_channel.exchange_declare("load", "fanout", durable=True)
    running.wait_bound("load")
    return running


def stop(process: Any) -> str:
    """SIGTERM the follower; its stderr."""
    process.send_signal(signal.SIGTERM)
    _out, err = process.communicate(timeout=40)
    return str(err)


def test_a_follower_replays_the_history_then_the_live_messages_once_in_order(
    daemon: CaptureProcess,
    receiver: Receiver,
    capture_env: dict[str, str],
    amqp_url: str,
    database_url: str,
) -> None:
    BackgroundPublisher(amqp_url, "load", 10_000).start().join()
    wait_for(lambda: archived(database_url) >= 10_000, 60, what="10,000 archived messages")
    process = start_replay(
        capture_env,
        "run",
        "--exchange",
        "load",
        "--to-queue",
        "rebuilt",
        "--follow",
        "--name",
        "orders-view",
        "--yes",
    )
    try:
        wait_for(lambda: len(receiver.received) >= 10_000, 60, what="the history replayed")
        live = BackgroundPublisher(amqp_url, "load", 12_000, rate=1_000, first=10_000).start()
        live.join()
        wait_for(lambda: len(receiver.received) >= 12_000, 30, what="the live messages replayed")
        wait_for(lambda: followers(capture_env)[0]["lag_rows"] == 0, 30, what="the follower's lag at 0")
        lag = followers(capture_env)
        assert [(f["name"], f["status"], f["lag_rows"]) for f in lag] == [("orders-view", "running", 0)]
    finally:
        err = stop(process)
    assert process.returncode == 1, err
    assert "resume with 'rabbit-replay resume" in err
    rows = stored(database_url)
    ids = [archive_id for archive_id, _ in receiver.received]
    assert ids == [archive_id for archive_id, _ in rows]  # each once, in archive order
    captured = dict(rows)
    latencies = sorted(at - captured[archive_id].timestamp() for archive_id, at in receiver.received[10_000:])
    p50, p99 = statistics.median(latencies), latencies[int(len(latencies) * 0.99)]
    print(f"\ncapture -> follower delivery: p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms")
    assert p99 < 2.0
    record = json_lines(ok(replay_command(capture_env, "history", "--json")))[-1]
    assert record["status"] == "interrupted"
    assert record["follower"] == "orders-view"
    assert record["confirmed"] == 12_000


def test_a_killed_follower_resumes_and_misses_nothing(
    daemon: CaptureProcess,
    receiver: Receiver,
    capture_env: dict[str, str],
    amqp_url: str,
    database_url: str,
) -> None:
    BackgroundPublisher(amqp_url, "load", 3_000).start().join()
    wait_for(lambda: archived(database_url) >= 3_000, 60, what="3,000 archived messages")
    process = start_replay(
        capture_env, "run", "--exchange", "load", "--to-queue", "rebuilt", "--follow", "--yes"
    )
    try:
        wait_for(lambda: len(receiver.received) >= 1_000, 60, what="the follower under way")
        process.send_signal(signal.SIGKILL)
        process.wait(10)
    finally:
        process.kill()
        replay_id = process.stdout.readline().strip() if process.stdout else ""
        process.communicate()
    # What the killed follower had got to the broker (frames it wrote may still be landing).
    wait_for(lambda: settled(receiver), 10, what="the killed follower's last messages to arrive")
    sent_before_kill = max(archive_id for archive_id, _ in receiver.received)
    killed = json_lines(ok(replay_command(capture_env, "history", "--json")))[-1]
    assert killed["replay_id"] == replay_id
    assert killed["status"] == "interrupted"
    BackgroundPublisher(amqp_url, "load", 4_000, first=3_000).start().join()
    wait_for(lambda: archived(database_url) >= 4_000, 60, what="1,000 more archived")

    resumed = start_replay(capture_env, "resume", replay_id, "--yes")
    try:
        wait_for(lambda: len({i for i, _ in receiver.received}) >= 4_000, 60, what="the resumed follower")
    finally:
        stop(resumed)
    counts = Counter(archive_id for archive_id, _ in receiver.received)
    assert set(counts) == {archive_id for archive_id, _ in stored(database_url)}  # nothing missing
    twice = sorted(archive_id for archive_id, seen in counts.items() if seen > 1)
    # Only what was sent after the cursor saved before the kill comes twice (the unconfirmed
    # window, and what was confirmed since the last save, at most 0.2 s of it), once more each.
    assert all(killed["confirmed_cursor"] < archive_id <= sent_before_kill for archive_id in twice)
    assert all(seen <= 2 for seen in counts.values())


def test_retention_that_drops_what_a_follower_has_not_reached_is_a_reported_gap(
    daemon: CaptureProcess,
    receiver: Receiver,
    capture_env: dict[str, str],
    amqp_url: str,
    database_url: str,
) -> None:
    BackgroundPublisher(amqp_url, "load", 200).start().join()
    wait_for(lambda: archived(database_url) >= 200, 60, what="200 archived messages")
    process = start_replay(
        capture_env, "run", "--exchange", "load", "--to-queue", "rebuilt", "--follow", "--yes"
    )
    wait_for(lambda: len(receiver.received) >= 200, 60, what="the follower caught up")
    replay_id = process.stdout.readline().strip() if process.stdout else ""
    stop(process)
    BackgroundPublisher(amqp_url, "load", 500, first=200).start().join()
    wait_for(lambda: archived(database_url) >= 500, 60, what="300 more archived")
    cursor = json_lines(ok(replay_command(capture_env, "history", "--json")))[-1]["confirmed_cursor"]
    # Retention drops the oldest rows, here also the first 100 the stopped follower had not reached
    # (as a day's partition would go).
    newer = [archive_id for archive_id, _ in stored(database_url) if archive_id > cursor]
    run_sql(database_url, "DELETE FROM rabbit_archive.messages WHERE id <= $1", newer[99])

    resumed = start_replay(capture_env, "resume", replay_id, "--yes")
    try:
        wait_for(lambda: any(f["gaps"] for f in followers(capture_env)), 30, what="the gap reported")
    finally:
        err = stop(resumed)
    assert "replay.follow_gap" in err
    [follower] = followers(capture_env)
    assert [(gap["from"], gap["until"]) for gap in follower["gaps"]] == [(cursor + 1, newer[99])]
    # What was left after the gap was still replayed.
    received = {archive_id for archive_id, _ in receiver.received}
    assert {archive_id for archive_id, _ in stored(database_url)} <= received
    assert not received & set(newer[:100])


def test_follow_refuses_what_cannot_follow(capture_env: dict[str, str], database_url: str) -> None:
    for args, fragment in (
        (["--name", "x", "--exchange", "a"], "--name names a follower"),
        (["--follow", "--from-file", "f.jsonl"], "leave out --from-file"),
        (["--follow", "--exchange", "a", "--include-replays"], "never replays replays"),
    ):
        assert_one_line_error(replay_command(capture_env, "run", *args, "--yes"), 2, fragment)
