"""Interrupted replays (SIGKILL, SIGINT, a lost broker connection) show as interrupted and resume."""

import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from tests.acceptance.test_replay import assert_one_line_error, json_lines, ok, replay_command
from tests.conftest import run_sql
from tests.support.daemon import CaptureProcess, command, wait_for
from tests.support.load import BackgroundPublisher
from tests.support.proxy import TcpProxy
from tests.support.services import Services

pytestmark = pytest.mark.acceptance


def archived(database_url: str) -> int:
    return int(run_sql(database_url, "SELECT count(*) FROM rabbit_archive.messages")[0][0])


def depth(channel: Any, queue: str) -> int:
    return int(channel.queue_declare(queue, passive=True).method.message_count)


def drain(channel: Any, queue: str) -> list[dict[str, Any]]:
    """The headers of every message in the queue, in queue order."""
    headers: list[dict[str, Any]] = []
    for method, properties, _body in channel.consume(queue, auto_ack=True, inactivity_timeout=1.0):
        if method is None:
            break
        headers.append(properties.headers)
    channel.cancel()
    return headers


def start_replay(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RABBIT_ARCHIVE_")}
    return subprocess.Popen(
        [command("rabbit-replay"), *args],
        env={**clean, **env},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def history(env: dict[str, str]) -> list[dict[str, Any]]:
    return json_lines(ok(replay_command(env, "history", "--json")))


@pytest.fixture
def backlog(
    start_capture: Callable[..., CaptureProcess],
    pika_channel: Any,
    amqp_url: str,
    database_url: str,
) -> Callable[[int], None]:
    """Archive `count` messages published to fanout exchange 'load'; declares queue 'target'."""

    def make(count: int) -> None:
        daemon = start_capture()
        pika_channel.exchange_declare("load", "fanout", durable=True)
        pika_channel.queue_declare("target", durable=True)
        daemon.wait_bound("load")
        BackgroundPublisher(amqp_url, "load", count).start().join()
        wait_for(lambda: archived(database_url) >= count, 60, what=f"{count} archived messages")
        daemon.stop()

    return make


def test_sigkill_mid_replay_then_resume_delivers_every_archive_id(
    backlog: Callable[[int], None], capture_env: dict[str, str], pika_channel: Any, database_url: str
) -> None:
    total = 20_000
    backlog(total)
    process = start_replay(
        capture_env, "run", "--exchange", "load", "--to-queue", "target", "--rate", "5000", "--yes"
    )
    try:
        wait_for(lambda: depth(pika_channel, "target") > total // 4, 30, what="replay under way")
        process.send_signal(signal.SIGKILL)
        process.wait(10)
    finally:
        process.kill()
        replay_id = process.stdout.readline().strip() if process.stdout else ""
        process.communicate()
    killed = history(capture_env)[0]
    assert killed["replay_id"] == replay_id
    assert killed["status"] == "interrupted"
    assert killed["confirmed_cursor"] > 0
    # Frames the killed process wrote may still be landing on a loaded broker: read the depth
    # once it stopped growing.
    sent_before_kill = -1
    for _ in range(40):
        now = depth(pika_channel, "target")
        if now == sent_before_kill:
            break
        sent_before_kill = now
        time.sleep(0.5)
    assert sent_before_kill < total

    resumed = replay_command(capture_env, "resume", replay_id, "--yes")
    assert ok(resumed).splitlines()[0] == replay_id
    done = history(capture_env)[0]
    assert done["status"] == "completed"
    assert done["selected"] == total

    delivered = drain(pika_channel, "target")
    ids = Counter(headers["x-replay-archive-id"] for headers in delivered)
    # Archive ids come from a sequence and may have gaps: compare with the stored ones.
    stored = [row[0] for row in run_sql(database_url, "SELECT id FROM rabbit_archive.messages ORDER BY id")]
    assert set(ids) == set(stored)  # every archive id at least once
    assert {headers["x-replay-id"] for headers in delivered} == {replay_id}
    duplicates = sorted(archive_id for archive_id, seen in ids.items() if seen > 1)
    # Copies sent twice lie after the cursor saved before the kill, within what had been sent.
    last_sent = stored[sent_before_kill - 1]
    assert all(killed["confirmed_cursor"] < archive_id <= last_sent for archive_id in duplicates)
    assert all(seen <= 2 for seen in ids.values())


def test_sigint_waits_for_confirms_saves_the_cursor_and_resume_sends_each_once(
    backlog: Callable[[int], None], capture_env: dict[str, str], pika_channel: Any
) -> None:
    total = 3_000
    backlog(total)
    process = start_replay(
        capture_env, "run", "--exchange", "load", "--to-queue", "target", "--rate", "1000", "--yes"
    )
    wait_for(lambda: depth(pika_channel, "target") > 300, 30, what="replay under way")
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 1, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("rabbit-replay: error:")]
    assert len(errors) == 1, stderr
    replay_id = stdout.splitlines()[0]
    assert f"rabbit-replay resume {replay_id}" in errors[0]
    stopped = history(capture_env)[0]
    assert stopped["status"] == "interrupted"
    # Every publish was confirmed before exiting: the cursor covers exactly what is in the queue.
    assert stopped["confirmed"] == stopped["published"] == depth(pika_channel, "target") < total

    ok(replay_command(capture_env, "resume", replay_id, "--yes"))
    delivered = drain(pika_channel, "target")
    ids = Counter(headers["x-replay-archive-id"] for headers in delivered)
    assert len(ids) == total
    assert set(ids.values()) == {1}
    assert history(capture_env)[0]["status"] == "completed"
    assert_one_line_error(replay_command(capture_env, "resume", replay_id, "--yes"), 2, "completed")


def test_lost_broker_connection_interrupts_and_resume_completes(
    backlog: Callable[[int], None],
    capture_env: dict[str, str],
    pika_channel: Any,
    services: Services,
    vhost: str,
) -> None:
    total = 5_000
    backlog(total)
    with TcpProxy(services.amqp_host, services.amqp_port) as proxy:
        proxied = {
            **capture_env,
            "RABBIT_ARCHIVE_AMQP_URL": f"amqp://guest:guest@127.0.0.1:{proxy.port}/{vhost}",
        }
        process = start_replay(
            proxied, "run", "--exchange", "load", "--to-queue", "target", "--rate", "2000", "--yes"
        )
        wait_for(lambda: depth(pika_channel, "target") > 500, 30, what="replay under way")
        proxy.cut()
        stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 1, stderr
    assert "Traceback" not in stderr
    replay_id = stdout.splitlines()[0]
    assert history(capture_env)[0]["status"] == "interrupted"
    ok(replay_command(capture_env, "resume", replay_id, "--yes"))
    ids = Counter(headers["x-replay-archive-id"] for headers in drain(pika_channel, "target"))
    assert len(ids) == total
    assert history(capture_env)[0]["status"] == "completed"


def test_two_processes_cannot_resume_the_same_replay(
    backlog: Callable[[int], None], capture_env: dict[str, str], pika_channel: Any
) -> None:
    backlog(2_000)
    process = start_replay(
        capture_env, "run", "--exchange", "load", "--to-queue", "target", "--rate", "200", "--yes"
    )
    try:
        wait_for(lambda: depth(pika_channel, "target") > 10, 30, what="replay under way")
        running = history(capture_env)[0]
        assert running["status"] == "running"
        assert_one_line_error(
            replay_command(capture_env, "resume", running["replay_id"], "--yes"), 2, "running"
        )
    finally:
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=60)
