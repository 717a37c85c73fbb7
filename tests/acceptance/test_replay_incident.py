"""Incident replays with the installed `rabbit-replay` on the real broker and database: guards
(--expect-count, typed-back counts, --canary), dead letters sent home, edits on the way, another vhost."""

import asyncio
import dataclasses
import os
import pty
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pika
import pytest

from rabbit_archive.archive.amqp_codec import (
    Properties,
    Table,
    decode_properties,
    encode_properties,
    encode_table,
)
from tests.acceptance.test_fidelity import EVERY_PROPERTY, EVERY_TYPE, publish_raw, receive_raw, without_tags
from tests.acceptance.test_replay import assert_one_line_error, json_lines, ok, replay_command
from tests.acceptance.test_replay_resume import archived, depth, drain
from tests.acceptance.test_replay_trust import loaded
from tests.support.daemon import CaptureProcess, command, wait_for
from tests.support.services import Services

pytestmark = pytest.mark.acceptance

__all__ = ["loaded"]  # the fixture, used by name below


def history(env: dict[str, str]) -> list[dict[str, Any]]:
    return json_lines(ok(replay_command(env, "history", "--json")))


# ------------------------------------------------------------------ guards


def test_expect_count_refuses_a_wrong_count_and_publishes_nothing(
    loaded: Callable[[int], list[int]], capture_env: dict[str, str], pika_channel: Any
) -> None:
    loaded(10)
    pika_channel.queue_declare("guarded", durable=True)
    base = ("run", "--exchange", "load", "--to-queue", "guarded", "--yes")
    for wrong in ("9", "11", "0"):
        result = replay_command(capture_env, *base, "--expect-count", wrong)
        assert_one_line_error(
            result, 2, f"--expect-count {wrong}", "holds 10 messages", "nothing was published"
        )
    assert depth(pika_channel, "guarded") == 0
    assert history(capture_env) == []
    dry = replay_command(capture_env, "run", "--exchange", "load", "--dry-run", "--expect-count", "3")
    assert_one_line_error(dry, 2, "--expect-count 3")
    ok(replay_command(capture_env, *base, "--expect-count", "10"))
    assert len(drain(pika_channel, "guarded")) == 10
    bad = replay_command(capture_env, *base, "--expect-count", "-1")
    assert bad.returncode == 2


def _answer_on_a_terminal(env: dict[str, str], args: list[str], answer: str) -> tuple[int, str]:
    """Run rabbit-replay with a terminal as standard input, typing `answer`; exit code and output."""
    master, terminal = pty.openpty()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RABBIT_ARCHIVE_")}
    process = subprocess.Popen(
        [command("rabbit-replay"), *args],
        env={**clean, **env},
        stdin=terminal,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    os.close(terminal)
    try:
        os.write(master, answer.encode() + b"\n")
        stdout, stderr = process.communicate(timeout=60)
    finally:
        os.close(master)
    return process.returncode, stdout + stderr


def test_above_the_threshold_the_count_is_typed_back(
    loaded: Callable[[int], list[int]], capture_env: dict[str, str], pika_channel: Any
) -> None:
    loaded(12)
    pika_channel.queue_declare("typed", durable=True)
    env = {**capture_env, "RABBIT_ARCHIVE_REPLAY_CONFIRM_COUNT_ABOVE": "10"}
    args = ["run", "--exchange", "load", "--to-queue", "typed"]
    for wrong in ("y", "11", "yes"):
        code, output = _answer_on_a_terminal(env, args, wrong)
        assert code == 1, output
        assert "Type the number of messages (12)" in output
        assert "not confirmed; nothing was published" in output
    assert depth(pika_channel, "typed") == 0
    code, output = _answer_on_a_terminal(env, args, "12")
    assert code == 0, output
    assert len(drain(pika_channel, "typed")) == 12
    # At or under the threshold a yes/no is enough.
    code, output = _answer_on_a_terminal(
        {**capture_env, "RABBIT_ARCHIVE_REPLAY_CONFIRM_COUNT_ABOVE": "12"}, args, "y"
    )
    assert code == 0, output
    assert "[y/N]" in output
    assert len(drain(pika_channel, "typed")) == 12


# ------------------------------------------------------------------ dead letters home


def _find_ids(env: dict[str, str], *filters: str) -> list[int]:
    return [item["id"] for item in json_lines(ok(replay_command(env, "find", "--json", *filters)))]


def _take(channel: Any, queue: str, expected: int, timeout: float = 30) -> list[tuple[Any, bytes]]:
    """Exactly `expected` messages from the queue (acknowledged), then none more."""
    taken: list[tuple[Any, bytes]] = []
    deadline = time.monotonic() + timeout
    while len(taken) < expected and time.monotonic() < deadline:
        method, properties, body = channel.basic_get(queue, auto_ack=True)
        if method is None:
            time.sleep(0.05)
            continue
        taken.append((properties, body))
    time.sleep(0.3)
    assert len(taken) == expected, f"{len(taken)} of {expected} in {queue}"
    assert depth(channel, queue) == 0
    return taken


@pytest.fixture
def dead_letters(
    start_capture: Callable[..., CaptureProcess],
    pika_channel: Any,
    capture_env: dict[str, str],
    database_url: str,
) -> Any:
    """Real dead letters: 3 rejected from 'work', 2 expired in 'ttl', 2 dropped from 'capped' (max
    length 1), 1 over the delivery limit of the quorum queue 'picky'; all through fanout 'dlx'."""
    daemon = start_capture()
    channel = pika_channel
    channel.exchange_declare("dlx", "fanout", durable=True)
    channel.exchange_declare("work-in", "topic", durable=True)
    daemon.wait_bound("dlx")
    daemon.wait_bound("work-in")
    dlx = {"x-dead-letter-exchange": "dlx"}
    queues = {
        "work": dlx,
        "ttl": {**dlx, "x-message-ttl": 50},
        "capped": {**dlx, "x-max-length": 1},
        "picky": {**dlx, "x-queue-type": "quorum", "x-delivery-limit": 1},
    }
    for queue, arguments in queues.items():
        channel.queue_declare(queue, durable=True, arguments=arguments)
        channel.queue_bind(queue, "work-in", queue)
    for index in range(3):
        channel.basic_publish("work-in", "work", f"job-{index}".encode())
    for index in range(2):
        channel.basic_publish("work-in", "ttl", f"slow-{index}".encode())
    for index in range(3):
        channel.basic_publish("work-in", "capped", f"many-{index}".encode())
    channel.basic_publish("work-in", "picky", b"picky-0")
    # A consumer with a bug: rejects every job without requeue.
    for _ in range(3):
        method, _properties, _body = channel.basic_get("work")
        channel.basic_reject(method.delivery_tag, requeue=False)
    # Redelivered past the quorum queue's delivery limit.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        method, _properties, _body = channel.basic_get("picky")
        if method is None:
            if depth(channel, "picky") == 0:
                break
            time.sleep(0.05)
            continue
        channel.basic_nack(method.delivery_tag, requeue=True)
    _take(channel, "capped", 1)  # the one that was not dropped
    wait_for(lambda: archived(database_url) >= 9 + 8, 30, what="originals and dead letters archived")
    daemon.stop()
    return channel


def test_dead_lettered_filters_select_by_the_latest_death(
    dead_letters: Any, capture_env: dict[str, str]
) -> None:
    env = capture_env
    work = _find_ids(env, "--dead-lettered-from", "work")
    assert len(work) == 3
    assert _find_ids(env, "--dead-lettered-from", "work", "--death-reason", "rejected") == work
    assert len(_find_ids(env, "--death-reason", "expired")) == 2
    assert len(_find_ids(env, "--death-reason", "maxlen")) == 2
    assert len(_find_ids(env, "--death-reason", "delivery_limit")) == 1
    assert _find_ids(env, "--dead-lettered-from", "picky") == _find_ids(
        env, "--death-reason", "delivery_limit"
    )
    assert _find_ids(env, "--dead-lettered-from", "capped", "--death-reason", "rejected") == []
    assert ok(replay_command(env, "find", "--count", "--dead-lettered-from", "ttl")).strip() == "2"
    bad = replay_command(env, "find", "--death-reason", "dropped")
    assert_one_line_error(bad, 2, "--death-reason", "rejected, expired, maxlen, delivery_limit")


def test_to_origin_puts_each_dead_letter_back_into_its_queue_once(
    dead_letters: Any, capture_env: dict[str, str]
) -> None:
    channel = dead_letters
    for queue, bodies in (("work", {b"job-0", b"job-1", b"job-2"}), ("picky", {b"picky-0"})):
        result = replay_command(capture_env, "run", "--dead-lettered-from", queue, "--to-origin", "--yes")
        ok(result)
        # The fixed consumer: each message once, tagged as a replay, its x-death history kept.
        back = _take(channel, queue, len(bodies))
        assert {body for _properties, body in back} == bodies
        for properties, _body in back:
            assert properties.headers["x-replay-id"] == result.stdout.splitlines()[0]
            assert properties.headers["x-death"][0]["queue"] == queue
    assert history(capture_env)[0]["target"] == "origin:queue"


def test_to_origin_exchange_and_messages_without_x_death(
    dead_letters: Any, capture_env: dict[str, str]
) -> None:
    channel = dead_letters
    channel.queue_declare("slow-copy", durable=True)
    channel.queue_bind("slow-copy", "work-in", "ttl")
    ok(replay_command(capture_env, "run", "--death-reason", "expired", "--to-origin=exchange", "--yes"))
    assert {body for _p, body in _take(channel, "slow-copy", 2)} == {b"slow-0", b"slow-1"}
    # The originals on 'work-in' have no x-death: skipped and counted, not an error.
    mixed = replay_command(capture_env, "run", "--routing-key", "work", "--to-origin", "--yes")
    out = ok(mixed)
    assert "published 3" in out
    assert "skipped 3 (3 without x-death)" in out
    assert len(_take(channel, "work", 3)) == 3
    # Kept apart in the history, so that a resume does not count them as failures.
    assert (history(capture_env)[-1]["skipped"], history(capture_env)[-1]["without_death"]) == (3, 3)
    wrong = replay_command(capture_env, "run", "--exchange", "dlx", "--to-origin=somewhere", "--yes")
    assert_one_line_error(wrong, 2, "--to-origin")
    both = replay_command(capture_env, "run", "--exchange", "dlx", "--to-origin", "--to-queue", "x", "--yes")
    assert_one_line_error(both, 2, "--to-origin")


def test_a_message_sent_home_that_dies_again_continues_its_death_history(
    dead_letters: Any, capture_env: dict[str, str]
) -> None:
    channel = dead_letters
    channel.queue_declare("graveyard", durable=True)
    channel.queue_bind("graveyard", "dlx", "")
    ok(replay_command(capture_env, "run", "--dead-lettered-from", "work", "--to-origin", "--yes"))
    wait_for(lambda: depth(channel, "work") == 3, 10, what="three messages back in 'work'")
    method, _properties, _body = channel.basic_get("work")
    channel.basic_reject(method.delivery_tag, requeue=False)
    (properties, _body), *_ = _take(channel, "graveyard", 1)
    # This broker (RabbitMQ 3.10 here) reads the client-set x-death: the count goes on.
    entry = properties.headers["x-death"][0]
    assert (entry["queue"], entry["reason"], entry["count"]) == ("work", "rejected", 2)


# ------------------------------------------------------------------ edits on the way


def test_header_edits_and_routing_key_arrive_with_every_other_byte_identical(
    start_capture: Callable[..., CaptureProcess],
    capture_env: dict[str, str],
    pika_channel: Any,
    amqp_url: str,
    database_url: str,
) -> None:
    daemon = start_capture()
    pika_channel.exchange_declare("typed", "topic", durable=True)
    pika_channel.exchange_declare("edited", "topic", durable=True)
    pika_channel.queue_declare("edited-q", durable=True)
    pika_channel.queue_bind("edited-q", "edited", "fixed.key")  # only the new routing key arrives
    daemon.wait_bound("typed")
    raw = encode_properties(Properties(headers=EVERY_TYPE, **EVERY_PROPERTY))
    asyncio.run(publish_raw(amqp_url, "typed", [(raw, b"typed body")]))
    wait_for(lambda: archived(database_url) >= 1, 30, what="the message archived")
    daemon.stop()
    edits = [
        "--set-header",
        "tenant=acme",
        "--set-header-json",
        'int8={"type": "int32", "value": 70000}',
        "--set-header-json",
        'extra={"when": {"type": "timestamp", "value": "2026-11-27T10:00:00Z"}}',
        "--unset-header",
        "case",
    ]
    where = ["--exchange", "typed", "--to-exchange", "edited", "--routing-key-to", "fixed.key"]
    # The dry run says each edit, with the type it will have on the wire.
    dry = ok(replay_command(capture_env, "run", *where, *edits, "--dry-run"))
    assert 'it sets header "int8" to {"type": "int32", "value": 70000}' in dry
    assert 'it removes header "case"' in dry
    result = replay_command(capture_env, "run", *where, *edits, "--yes")
    ok(result)
    ((copy_raw, body),) = asyncio.run(receive_raw(amqp_url, "edited-q", 1))
    assert body == b"typed body"
    copy, _tags = without_tags(decode_properties(copy_raw))
    expected_table: Table = [
        (key, ("I", 70000) if key == b"int8" else value) for key, value in EVERY_TYPE if key != b"case"
    ]
    expected_table += [
        (b"tenant", ("S", b"acme")),
        (b"extra", ("F", [(b"when", ("T", 1_795_773_600))])),
    ]
    assert copy.headers == expected_table
    # The original entries that were not edited went out as their very bytes.
    untouched = [entry for entry in EVERY_TYPE if entry[0] not in (b"case", b"int8")]
    assert encode_table(untouched[:1])[4:] in copy_raw
    assert encode_table(untouched[1:])[4:] in copy_raw
    assert dataclasses.replace(copy, headers=None) == Properties(**EVERY_PROPERTY)
    record = history(capture_env)[-1]
    assert record["target"] == "exchange:edited (routing key 'fixed.key')"
    assert record["options"]["edits"]["unset"] == ["case"]
    assert [entry["key"] for entry in record["options"]["edits"]["set"]] == ["tenant", "int8", "extra"]
    bad = replay_command(capture_env, "run", "--exchange", "typed", "--set-header-json", "n={", "--yes")
    assert_one_line_error(bad, 2, "--set-header-json")


# ------------------------------------------------------------------ canary


class Consumer:
    """A consumer on its own connection and thread that acknowledges everything from one queue."""

    def __init__(self, services: Services, vhost: str, queue: str) -> None:
        self.received = 0
        self._stop = threading.Event()
        parameters = pika.ConnectionParameters(
            host=services.amqp_host,
            port=services.amqp_port,
            virtual_host=vhost,
            credentials=pika.PlainCredentials("guest", "guest"),
        )
        self._connection = pika.BlockingConnection(parameters)
        self._channel = self._connection.channel()
        self._channel.basic_qos(prefetch_count=50)
        self._queue = queue
        self._thread = threading.Thread(target=self._run, name="test-consumer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for method, _properties, _body in self._channel.consume(self._queue, inactivity_timeout=0.2):
            if self._stop.is_set():
                break
            if method is not None:
                self._channel.basic_ack(method.delivery_tag)
                self.received += 1
        self._channel.cancel()
        self._connection.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)


def test_canary_goes_on_when_the_target_drains_it(
    loaded: Callable[[int], list[int]],
    capture_env: dict[str, str],
    pika_channel: Any,
    services: Services,
    vhost: str,
) -> None:
    loaded(1000)
    pika_channel.queue_declare("canary-q", durable=True)
    consumer = Consumer(services, vhost, "canary-q")
    try:
        result = replay_command(
            capture_env,
            "run",
            "--exchange",
            "load",
            "--to-queue",
            "canary-q",
            "--canary",
            "10",
            "--canary-wait",
            "20",
            "--yes",
        )
        ok(result)
        assert "canary: the first 10 are confirmed; queue 'canary-q':" in result.stderr
        assert "canary: drained in" in result.stderr
        wait_for(lambda: consumer.received == 1000, 30, what="the consumer got every message")
    finally:
        consumer.close()
    record = history(capture_env)[-1]
    assert record["status"] == "completed"
    assert record["options"]["canary"] == 10
    assert record["options"]["canary_result"].startswith("drained in")


def test_canary_stops_resumably_when_nothing_drains_it_and_resume_keeps_the_edits(
    loaded: Callable[[int], list[int]], capture_env: dict[str, str], pika_channel: Any
) -> None:
    loaded(1000)
    pika_channel.queue_declare("nobody", durable=True)
    args = ("--to-queue", "nobody", "--canary", "10", "--canary-wait", "1", "--set-header", "fixed=yes")
    result = replay_command(capture_env, "run", "--exchange", "load", *args, "--yes")
    assert_one_line_error(result, 1, "canary: the target did not drain the first 10 within 1 s", "resume")
    replay_id = result.stdout.splitlines()[0]
    record = history(capture_env)[-1]
    assert record["status"] == "interrupted"
    assert (record["published"], record["confirmed"]) == (10, 10)
    assert record["options"]["canary_result"].startswith("stopped: not drained within 1 s")
    assert "canary" in record["error"]
    assert depth(pika_channel, "nobody") == 10
    # The operator looked and decided: resume sends the rest, with the same edits, no second canary.
    ok(replay_command(capture_env, "resume", replay_id, "--yes"))
    delivered = drain(pika_channel, "nobody")
    assert len(delivered) == 1000
    assert all(headers["fixed"] == "yes" for headers in delivered)
    assert history(capture_env)[-1]["status"] == "completed"
    wrong = replay_command(capture_env, "run", "--exchange", "load", "--canary", "5", "--yes")
    assert_one_line_error(wrong, 2, "--canary")


def test_canary_asks_on_a_terminal(
    loaded: Callable[[int], list[int]], capture_env: dict[str, str], pika_channel: Any
) -> None:
    loaded(30)
    pika_channel.queue_declare("asked", durable=True)
    args = ["run", "--exchange", "load", "--to-queue", "asked", "--canary", "5"]
    code, output = _answer_on_a_terminal(capture_env, args, "y\nn")
    assert code == 1, output
    assert "canary: the first 5 are confirmed; queue 'asked': 5 ready" in output
    assert "Go on with the other 25?" in output
    assert depth(pika_channel, "asked") == 5
    assert history(capture_env)[-1]["options"]["canary_result"] == "stopped: not confirmed by the operator"


# ------------------------------------------------------------------ another broker or vhost


@pytest.fixture
def staging(services: Services, management: httpx.Client) -> Iterator[tuple[str, str]]:
    """A second vhost with its own user (no rights anywhere else): its name and AMQP URL."""
    name = f"staging-{uuid.uuid4().hex[:8]}"
    user, password = f"replayer-{uuid.uuid4().hex[:6]}", f"s3cret-{uuid.uuid4().hex[:8]}"
    management.put(f"/api/vhosts/{name}").raise_for_status()
    management.put(f"/api/users/{user}", json={"password": password, "tags": ""}).raise_for_status()
    management.put(
        f"/api/permissions/{name}/{user}", json={"configure": ".*", "write": ".*", "read": ".*"}
    ).raise_for_status()
    try:
        yield name, f"amqp://{user}:{password}@{services.amqp_host}:{services.amqp_port}/{name}"
    finally:
        management.delete(f"/api/vhosts/{name}")
        management.delete(f"/api/users/{user}")


def test_target_url_publishes_into_another_vhost_with_its_own_user(
    loaded: Callable[[int], list[int]], capture_env: dict[str, str], staging: tuple[str, str]
) -> None:
    name, url = staging
    password = url.split(":")[2].split("@")[0]
    loaded(100)
    with pika.BlockingConnection(pika.URLParameters(url)) as connection:
        channel = connection.channel()
        channel.queue_declare("reproduce", durable=True)
        env = {**capture_env, "RABBIT_ARCHIVE_REPLAY_TARGET_URL": url}
        args = ("--exchange", "load", "--to-queue", "reproduce")
        stopped = replay_command(env, "run", *args, "--canary", "10", "--canary-wait", "0", "--yes")
        assert_one_line_error(stopped, 1, "canary")
        replay_id = stopped.stdout.splitlines()[0]
        assert f"in vhost '{name}'" in stopped.stderr
        assert depth(channel, "reproduce") == 10
        record = history(capture_env)[-1]
        assert record["options"]["target_url"] == url.replace(password, "***")
        assert record["options"]["vhost"] == name
        # The history has no password: a resume must be given the URL again.
        missing = replay_command(capture_env, "resume", replay_id, "--yes")
        assert_one_line_error(missing, 2, "give that URL again with --target-url")
        other = url.replace(name, "elsewhere")
        wrong = replay_command(capture_env, "resume", replay_id, "--target-url", other, "--yes")
        assert_one_line_error(wrong, 2, "published to")
        resumed = replay_command(capture_env, "resume", replay_id, "--target-url", url, "--yes")
        ok(resumed)
        assert depth(channel, "reproduce") == 100
        for result in (stopped, missing, wrong, resumed):
            assert password not in result.stdout + result.stderr
        assert password not in ok(replay_command(capture_env, "history", "--json"))
    # The archive and its history stayed where they were; a bad URL or password is one line.
    bad = replay_command(capture_env, "run", *args, "--target-url", "http://nowhere", "--yes")
    assert_one_line_error(bad, 2, "--target-url must look like amqp://")
    refused = replay_command(
        capture_env, "run", *args, "--target-url", url.replace(password, "wrong-password"), "--yes"
    )
    assert refused.returncode == 2, refused.stderr
    assert "rejected the credentials" in refused.stderr
    assert "wrong-password" not in refused.stderr
    unset = replay_command({**capture_env, "RABBIT_ARCHIVE_REPLAY_TARGET_URL": "ftp://x"}, "history")
    assert unset.returncode == 2
