"""What a replay may claim: nacks and returns keep the cursor and end 'incomplete', and every way out
(a vanished target queue, Ctrl-C or SIGTERM while the broker does not answer) saves and marks the replay."""

import contextlib
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.acceptance.test_replay import assert_one_line_error, json_lines, ok, replay_command
from tests.acceptance.test_replay_resume import archived, depth, drain, start_replay
from tests.conftest import run_sql
from tests.support.daemon import CaptureProcess, wait_for
from tests.support.load import BackgroundPublisher
from tests.support.services import Services

pytestmark = pytest.mark.acceptance


def history(env: dict[str, str]) -> dict[str, Any]:
    """The newest replay of the test's history."""
    return json_lines(ok(replay_command(env, "history", "--json")))[-1]


def stored_ids(database_url: str) -> list[int]:
    return [row[0] for row in run_sql(database_url, "SELECT id FROM rabbit_archive.messages ORDER BY id")]


def summary(stdout: str) -> str:
    return next(line for line in stdout.splitlines() if line.startswith("selected "))


def archive_ids(delivered: list[dict[str, Any]]) -> Counter[int]:
    return Counter(headers["x-replay-archive-id"] for headers in delivered)


@pytest.fixture
def loaded(
    start_capture: Callable[..., CaptureProcess],
    pika_channel: Any,
    amqp_url: str,
    database_url: str,
) -> Callable[[int], list[int]]:
    """Archive `count` messages (routing keys load.0 .. load.9) from fanout 'load'; their archive ids."""

    def make(count: int) -> list[int]:
        daemon = start_capture()
        pika_channel.exchange_declare("load", "fanout", durable=True)
        daemon.wait_bound("load")
        BackgroundPublisher(amqp_url, "load", count).start().join()
        wait_for(lambda: archived(database_url) >= count, 60, what=f"{count} archived messages")
        daemon.stop()
        return stored_ids(database_url)

    return make


# ------------------------------------------------------------------ nacks and returns


def test_nacks_keep_the_cursor_end_incomplete_and_resume_sends_exactly_the_rest(
    loaded: Callable[[int], list[int]], capture_env: dict[str, str], pika_channel: Any
) -> None:
    ids = loaded(20)
    pika_channel.queue_declare(
        "small", durable=True, arguments={"x-overflow": "reject-publish", "x-max-length": 5}
    )
    result = replay_command(capture_env, "run", "--exchange", "load", "--to-queue", "small", "--yes")
    assert_one_line_error(result, 1, "incomplete", "15 refused by the broker (nack)")
    assert "nacked 15" in summary(result.stdout)
    replay_id = result.stdout.splitlines()[0]
    first = history(capture_env)
    assert first["status"] == "incomplete"
    assert (first["confirmed"], first["nacked"], first["returned"]) == (5, 15, 0)
    # The cursor stops at the last message before the first one that was not confirmed.
    assert first["confirmed_cursor"] == ids[4]
    assert first["failed_ids"] == ids[5:]
    delivered = archive_ids(drain(pika_channel, "small"))

    # Each resume sends only what did not arrive; the queue takes five at a time.
    for round_ in range(3):
        resumed = replay_command(capture_env, "resume", replay_id, "--yes")
        assert resumed.stdout.splitlines()[0] == replay_id
        delivered += archive_ids(drain(pika_channel, "small"))
        left = 15 - 5 * (round_ + 1)
        record = history(capture_env)
        assert record["failed_ids"] == ids[20 - left :]
        if left:
            assert_one_line_error(resumed, 1, "incomplete", f"{left} refused by the broker (nack)")
            assert record["status"] == "incomplete"
            assert record["nacked"] == left
        else:
            ok(resumed)
    done = history(capture_env)
    assert done["status"] == "completed"
    assert (done["confirmed"], done["nacked"], done["confirmed_cursor"]) == (20, 0, ids[-1])
    assert delivered == Counter(ids)  # every message exactly once


def test_returns_keep_the_cursor_end_incomplete_and_resume_sends_exactly_them(
    loaded: Callable[[int], list[int]], capture_env: dict[str, str], pika_channel: Any
) -> None:
    ids = loaded(20)
    keys = {
        item["id"]: item["routing_key"]
        for item in json_lines(ok(replay_command(capture_env, "find", "--json")))
    }
    pika_channel.exchange_declare("partial", "topic", durable=True)
    pika_channel.queue_declare("caught", durable=True)
    pika_channel.queue_bind("caught", "partial", "load.0")
    pika_channel.queue_bind("caught", "partial", "load.1")
    routable = [i for i in ids if keys[i] in ("load.0", "load.1")]
    unroutable = [i for i in ids if i not in routable]
    assert keys[ids[0]] == "load.0"
    assert keys[ids[2]] == "load.2"

    result = replay_command(capture_env, "run", "--exchange", "load", "--to-exchange", "partial", "--yes")
    assert_one_line_error(result, 1, "incomplete", f"{len(unroutable)} returned as unroutable")
    assert f"returned {len(unroutable)}" in summary(result.stdout)
    replay_id = result.stdout.splitlines()[0]
    record = history(capture_env)
    assert record["status"] == "incomplete"
    assert (record["confirmed"], record["returned"], record["nacked"]) == (len(routable), len(unroutable), 0)
    assert record["confirmed_cursor"] == ids[1]  # the third message was returned
    assert record["failed_ids"] == unroutable
    delivered = archive_ids(drain(pika_channel, "caught"))
    assert delivered == Counter(routable)

    pika_channel.queue_bind("caught", "partial", "#")
    ok(replay_command(capture_env, "resume", replay_id, "--yes"))
    done = history(capture_env)
    assert done["status"] == "completed"
    assert (done["confirmed"], done["returned"], done["failed_ids"]) == (20, 0, [])
    assert done["confirmed_cursor"] == ids[-1]
    delivered += archive_ids(drain(pika_channel, "caught"))
    assert delivered == Counter(ids)


# ------------------------------------------------------------------ every way out saves


def test_a_target_queue_deleted_during_max_queue_depth_interrupts_after_saving(
    loaded: Callable[[int], list[int]], capture_env: dict[str, str], pika_channel: Any
) -> None:
    ids = loaded(200)
    pika_channel.queue_declare("target", durable=True)
    process = start_replay(
        capture_env, "run", "--exchange", "load", "--to-queue", "target", "--max-queue-depth", "10", "--yes"
    )
    try:
        wait_for(lambda: depth(pika_channel, "target") >= 10, 30, what="the target queue full")
        time.sleep(0.5)
        pika_channel.queue_delete("target")
        stdout, stderr = process.communicate(timeout=40)
    finally:
        process.kill()
    assert process.returncode == 1, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("rabbit-replay: error:")]
    assert len(errors) == 1, stderr
    assert "Traceback" not in stderr
    replay_id = stdout.splitlines()[0]
    assert "target" in errors[0]
    assert f"rabbit-replay resume {replay_id}" in errors[0]
    record = history(capture_env)
    assert record["status"] == "interrupted"
    # The ten publishes were confirmed before the depth was read: saved with the cursor.
    assert record["confirmed"] == record["published"] == 10
    assert record["confirmed_cursor"] == ids[9]


class StallingProxy:
    """A TCP proxy that can stop forwarding while keeping the connections open (a broker that is
    blocked by a memory alarm, or a network that drops every packet, looks like this)."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.forwarding = threading.Event()
        self.forwarding.set()
        self.closed = threading.Event()
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def stall(self) -> None:
        self.forwarding.clear()

    def close(self) -> None:
        self.closed.set()
        self.forwarding.set()
        for sock in [self.server, *self.sockets]:
            with contextlib.suppress(OSError):
                sock.close()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.sockets += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while True:
                data = source.recv(65536)
                if not data:
                    break
                self.forwarding.wait()
                if self.closed.is_set():
                    break
                sink.sendall(data)


@pytest.fixture
def stalling_proxy(services: Services) -> Iterator[StallingProxy]:
    proxy = StallingProxy(services.amqp_host, services.amqp_port)
    try:
        yield proxy
    finally:
        proxy.close()


@pytest.mark.parametrize(
    ("how", "pace"),
    [
        # Ctrl-C while the window of publishes awaiting their confirm is full.
        (signal.SIGINT, ["--rate", "300"]),
        # SIGTERM while the passive declare that reads the target's depth gets no answer.
        (signal.SIGTERM, ["--max-queue-depth", "200"]),
    ],
    ids=["sigint-confirms", "sigterm-queue-depth"],
)
def test_a_stop_while_the_broker_does_not_answer_ends_within_30_s_saved_and_interrupted(
    loaded: Callable[[int], list[int]],
    capture_env: dict[str, str],
    pika_channel: Any,
    stalling_proxy: StallingProxy,
    vhost: str,
    how: signal.Signals,
    pace: list[str],
) -> None:
    loaded(3000)
    pika_channel.queue_declare("target", durable=True)
    stalled = {
        **capture_env,
        "RABBIT_ARCHIVE_AMQP_URL": f"amqp://guest:guest@127.0.0.1:{stalling_proxy.port}/{vhost}",
    }
    process = start_replay(stalled, "run", "--exchange", "load", "--to-queue", "target", *pace, "--yes")
    try:
        wait_for(lambda: depth(pika_channel, "target") >= 100, 30, what="replay under way")
        stalling_proxy.stall()
        # Long enough for the in-flight window to fill (rate) or the depth read to hang (depth).
        time.sleep(3)
        assert process.poll() is None
        stopped_at = time.monotonic()
        process.send_signal(how)
        stdout, stderr = process.communicate(timeout=60)
        elapsed = time.monotonic() - stopped_at
    finally:
        process.kill()
    assert elapsed < 30, elapsed
    assert process.returncode == 1, stderr
    assert "Traceback" not in stderr
    replay_id = stdout.splitlines()[0]
    errors = [line for line in stderr.splitlines() if line.startswith("rabbit-replay: error:")]
    assert len(errors) == 1, stderr
    assert f"rabbit-replay resume {replay_id}" in errors[0]
    record = history(capture_env)
    assert record["status"] == "interrupted"
    arrived = depth(pika_channel, "target")
    # Saved: what was confirmed before the stall, never more than what arrived.
    assert 0 < record["confirmed"] <= arrived
    assert record["confirmed_cursor"] > 0
    print(f"stopped {elapsed:.1f} s after {how.name}; {record['confirmed']} confirmed, {arrived} arrived")
    assert record["published"] >= record["confirmed"]


def test_a_message_that_cannot_be_republished_is_counted_as_skipped_in_the_history(
    loaded: Callable[[int], list[int]], capture_env: dict[str, str], pika_channel: Any, database_url: str
) -> None:
    ids = loaded(5)
    # Property bytes that announce a header table and end before it: nothing can encode them.
    run_sql(
        database_url, "UPDATE rabbit_archive.messages SET properties_raw = '\\x2000' WHERE id = $1", ids[2]
    )
    pika_channel.queue_declare("target", durable=True)
    result = replay_command(capture_env, "run", "--exchange", "load", "--to-queue", "target", "--yes")
    assert_one_line_error(result, 1, "1 could not be republished")
    assert "skipped 1" in summary(result.stdout)
    record = history(capture_env)
    assert (record["confirmed"], record["skipped"]) == (4, 1)
    assert archive_ids(drain(pika_channel, "target")) == Counter(ids[:2] + ids[3:])
    table = ok(replay_command(capture_env, "history"))
    print(table)
    assert "skipped" in table
