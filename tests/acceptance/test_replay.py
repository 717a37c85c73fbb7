"""The installed `rabbit-replay` on messages the real daemon captured: filters, replays, safety, errors."""

import base64
import json
import os
import pty
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pika
import pytest

from tests.conftest import run_sql
from tests.support.daemon import CaptureProcess, command, wait_for

pytestmark = pytest.mark.acceptance

UUID_LENGTH = 36


def replay_command(
    env: dict[str, str], *args: str, timeout: float = 120, stdin: Any = subprocess.DEVNULL
) -> subprocess.CompletedProcess[str]:
    """Run `rabbit-replay ARGS` configured only by the given RABBIT_ARCHIVE_* variables."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RABBIT_ARCHIVE_")}
    return subprocess.run(
        [command("rabbit-replay"), *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=stdin,
        check=False,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    """The stdout of a command that must have succeeded."""
    assert result.returncode == 0, result.stderr + result.stdout
    assert "Traceback" not in result.stderr
    return result.stdout


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int, *fragments: str) -> None:
    """Exit code as given, exactly one error line naming the fragments, no traceback."""
    assert result.returncode == code, result.stderr + result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("rabbit-replay: error:")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@dataclass
class Archive:
    """A daemon capturing the test vhost, a pika channel on it, and the environment for commands."""

    env: dict[str, str]
    channel: Any
    daemon: CaptureProcess
    database_url: str

    def rows(self) -> int:
        return int(run_sql(self.database_url, "SELECT count(*) FROM rabbit_archive.messages")[0][0])

    def wait_rows(self, count: int, timeout: float = 30) -> None:
        wait_for(lambda: self.rows() >= count, timeout, what=f"{count} archived rows")
        time.sleep(0.2)
        assert self.rows() == count

    def replay(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return replay_command(self.env, *args, timeout=timeout)

    def consume_all(self, queue: str, expected: int, timeout: float = 30) -> list[tuple[Any, bytes]]:
        """Every message in the queue, as (properties, body), waiting for `expected` of them."""
        received: list[tuple[Any, bytes]] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            method, properties, body = self.channel.basic_get(queue, auto_ack=True)
            if method is None:
                if len(received) >= expected:
                    time.sleep(0.3)
                    method, properties, body = self.channel.basic_get(queue, auto_ack=True)
                    if method is None:
                        return received
                else:
                    time.sleep(0.05)
                    continue
            received.append((properties, body))
        return received


@pytest.fixture
def archive(
    capture_env: dict[str, str],
    start_capture: Callable[..., CaptureProcess],
    pika_channel: Any,
    database_url: str,
) -> Archive:
    daemon = start_capture()
    pika_channel.exchange_declare("orders", "topic", durable=True)
    pika_channel.exchange_declare("audit", "fanout", durable=True)
    # A real consumer queue per exchange, so that replays to the original exchanges are routable.
    pika_channel.queue_declare("orders-all", durable=True)
    pika_channel.queue_bind("orders-all", "orders", "#")
    pika_channel.queue_declare("audit-all", durable=True)
    pika_channel.queue_bind("audit-all", "audit")
    pika_channel.queue_declare("target", durable=True)
    daemon.wait_bound("orders")
    daemon.wait_bound("audit")
    return Archive(dict(capture_env), pika_channel, daemon, database_url)


def publish(channel: Any, exchange: str, key: str, body: bytes, **props: Any) -> None:
    channel.basic_publish(exchange, key, body, pika.BasicProperties(**props), mandatory=True)


ROUTING_KEYS = ["eu.created", "eu.paid", "us.created", "us.paid.card", "created", "eu", "eu..x", ""]


def publish_sample(archive: Archive) -> None:
    """Twenty-odd messages with distinct keys, headers, ids and bodies; ids follow publish order."""
    for n, key in enumerate(ROUTING_KEYS):
        body = json.dumps({"order": {"id": n, "customer": f"c{n % 3}"}, "note": "50% off_\\'quote\""})
        publish(
            archive.channel,
            "orders",
            key,
            body.encode(),
            message_id=f"m-{n}",
            correlation_id=f"corr-{n % 2}",
            content_type="application/json",
            headers={"tenant": f"t{n % 2}", "attempt": n},
        )
    for n in range(4):
        publish(
            archive.channel, "audit", "ignored", bytes([0, 255, n]), message_id=f"a-{n}", headers={"n": n}
        )
    publish(archive.channel, "orders", "eu.created", b"not json {", message_id="plain")
    archive.wait_rows(len(ROUTING_KEYS) + 5)


def ids_of(archive: Archive, *filters: str) -> list[str]:
    """message_id of each match of `find FILTERS --json`, in archive order."""
    found = json_lines(ok(archive.replay("find", *filters, "--json")))
    return [item["properties"].get("message_id") for item in found]


def test_each_filter_alone_and_combined_selects_exactly_the_right_messages(archive: Archive) -> None:
    publish_sample(archive)
    orders = [f"m-{n}" for n in range(len(ROUTING_KEYS))]
    audit = [f"a-{n}" for n in range(4)]
    everything = [*orders, *audit, "plain"]
    by_key = {key: f"m-{n}" for n, key in enumerate(ROUTING_KEYS)}

    assert ids_of(archive) == everything
    assert ids_of(archive, "--exchange", "audit") == audit
    assert ids_of(archive, "--exchange", "audit", "--exchange", "orders") == everything
    # Topic patterns, corner cases included: '#' matches the empty key, '*' does not.
    topic_cases = {
        "#": [*orders, "plain"],
        "*": [by_key["created"], by_key["eu"]],
        "eu.#": [by_key["eu.created"], by_key["eu.paid"], by_key["eu"], by_key["eu..x"], "plain"],
        "#.created": [by_key["eu.created"], by_key["us.created"], by_key["created"], "plain"],
        "*.created": [by_key["eu.created"], by_key["us.created"], "plain"],
        "#.paid.#": [by_key["eu.paid"], by_key["us.paid.card"]],
        "eu.*.x": [by_key["eu..x"]],
        "us.paid.card": [by_key["us.paid.card"]],
    }
    for pattern, expected in topic_cases.items():
        assert ids_of(archive, "--exchange", "orders", "--routing-key", pattern) == expected, pattern
    assert ids_of(archive, "--header", "tenant=t1") == [f"m-{n}" for n in range(1, 8, 2)]
    assert ids_of(archive, "--header", "attempt=3") == ["m-3"]
    assert ids_of(archive, "--header", "n=2") == ["a-2"]
    assert ids_of(archive, "--message-id", "m-5") == ["m-5"]
    assert ids_of(archive, "--correlation-id", "corr-1") == [f"m-{n}" for n in range(1, 8, 2)]
    assert ids_of(archive, "--body-contains", "not json") == ["plain"]
    # Quotes, %, _ and backslashes are literal text, not LIKE patterns.
    assert ids_of(archive, "--body-contains", "50% off_\\\\'quote") == orders
    assert ids_of(archive, "--body-contains", "%") == orders
    assert ids_of(archive, "--body-json", "order.customer=c1") == ["m-1", "m-4", "m-7"]
    assert ids_of(archive, "--body-json", "order.id=6") == ["m-6"]
    found = json_lines(ok(archive.replay("find", "--json")))
    ids = [item["id"] for item in found]
    assert ids_of(archive, "--from-id", str(ids[2]), "--to-id", str(ids[4])) == everything[2:5]
    # Rows committed together share their capture time: a later message needs a later batch.
    time.sleep(1.1)
    publish(archive.channel, "audit", "", b"late", message_id="late")
    archive.wait_rows(len(everything) + 1)
    late = json_lines(ok(archive.replay("find", "--message-id", "late", "--json")))[0]["captured_at"]
    assert ids_of(archive, "--since", late) == ["late"]
    assert ids_of(archive, "--until", late) == everything
    assert ids_of(archive, "--since", "1h") == [*everything, "late"]
    assert ids_of(archive, "--until", "1h") == []
    assert ids_of(archive, "--since", "2020-01-01T00:00:00", "--until", late) == everything
    combined = [
        "--exchange",
        "orders",
        "--routing-key",
        "eu.#",
        "--header",
        "tenant=t0",
        "--body-json",
        "order.id=0",
    ]
    assert ids_of(archive, *combined) == ["m-0"]
    assert ok(archive.replay("find", "--routing-key", "eu.#", "--count")).strip() == "5"
    # The JSON objects carry the keys README lists.
    first = found[0]
    assert {"id", "captured_at", "vhost", "exchange", "routing_key", "properties", "headers"} <= set(first)
    assert {"body_size", "redelivered", "replay_id"} <= set(first)
    assert first["headers"] == {"tenant": "t0", "attempt": 0}
    assert first["properties"]["content_type"] == "application/json"


def test_replay_to_queue_delivers_each_selected_message_once_with_replay_headers(archive: Archive) -> None:
    publish_sample(archive)
    result = archive.replay(
        "run", "--exchange", "orders", "--to-queue", "target", "--yes", "--reason", "INC-7"
    )
    stdout = ok(result)
    replay_id = stdout.splitlines()[0]
    assert len(replay_id) == UUID_LENGTH
    assert uuid.UUID(replay_id)
    received = archive.consume_all("target", len(ROUTING_KEYS) + 1)
    archived = json_lines(ok(archive.replay("find", "--exchange", "orders", "--json")))
    assert len(received) == len(archived) == len(ROUTING_KEYS) + 1
    for original, (props, body) in zip(archived, received, strict=True):
        headers = props.headers
        assert headers["x-replay-id"] == replay_id
        assert headers["x-replay-archive-id"] == original["id"]
        assert headers["x-original-exchange"] == "orders"
        assert headers["x-original-routing-key"] == original["routing_key"]
        assert headers["x-replay-reason"] == "INC-7"
        assert isinstance(headers["x-replayed-at"], type(headers["x-original-captured-at"]))
        assert props.message_id == original["properties"]["message_id"]
        assert props.correlation_id == original["properties"].get("correlation_id")
        assert props.content_type == original["properties"].get("content_type")
        for key, value in original["headers"].items():
            assert headers[key] == value
        shown = json.loads(ok(archive.replay("show", str(original["id"]), "--json")))
        assert body == base64.b64decode(shown["body_base64"])
    assert "selected 9, published 9, confirmed 9, returned 0" in stdout
    history = json_lines(ok(archive.replay("history", "--json")))
    assert [(h["replay_id"], h["status"], h["selected"], h["confirmed"]) for h in history] == [
        (replay_id, "completed", 9, 9)
    ]
    assert history[0]["reason"] == "INC-7"
    assert history[0]["target"] == "queue:target"


def test_new_message_id_gives_fresh_ids_and_x_replay_of(archive: Archive) -> None:
    publish_sample(archive)
    ok(archive.replay("run", "--exchange", "audit", "--to-queue", "target", "--new-message-id", "--yes"))
    received = archive.consume_all("target", 4)
    assert [props.headers["x-replay-of"] for props, _ in received] == [f"a-{n}" for n in range(4)]
    fresh = {props.message_id for props, _ in received}
    assert len(fresh) == 4
    assert not fresh & {f"a-{n}" for n in range(4)}


def test_replay_to_original_exchange_reaches_its_queues_and_counts_returns(archive: Archive) -> None:
    publish_sample(archive)
    archive.channel.queue_purge("orders-all")
    replay_id = ok(archive.replay("run", "--exchange", "orders", "--routing-key", "us.#", "--yes")).split()[0]
    received = archive.consume_all("orders-all", 2)
    assert sorted(props.message_id for props, _ in received) == ["m-2", "m-3"]
    # The daemon captures the replayed copies with their replay id; find and run leave them
    # out, so replaying the same filter again does not replay the replays.
    archive.wait_rows(len(ROUTING_KEYS) + 5 + 2)
    assert ids_of(archive, "--exchange", "orders", "--routing-key", "us.#") == ["m-2", "m-3"]
    copies = json_lines(ok(archive.replay("find", "--routing-key", "us.#", "--include-replays", "--json")))
    assert [item["replay_id"] for item in copies] == [None, None, replay_id, replay_id]
    # An exchange nobody binds: every replayed message comes back as unroutable.
    archive.channel.exchange_declare("lonely", "direct", durable=True)
    result = archive.replay("run", "--exchange", "orders", "--to-exchange", "lonely", "--yes")
    assert_one_line_error(result, 1, "returned")
    assert "returned 9" in result.stdout


def test_run_refuses_without_filter_dry_run_publishes_nothing_no_terminal_needs_yes(archive: Archive) -> None:
    publish_sample(archive)
    assert_one_line_error(archive.replay("run", "--to-queue", "target", "--yes"), 2, "--all")
    dry = ok(archive.replay("run", "--exchange", "orders", "--to-queue", "target", "--dry-run"))
    assert "would replay 9 messages" in dry
    assert "orders" in dry
    assert "eu.created" in dry
    assert "nothing was published" in dry
    # Without --yes and without a terminal: refused before anything is published.
    assert_one_line_error(archive.replay("run", "--exchange", "orders", "--to-queue", "target"), 2, "--yes")
    time.sleep(0.5)
    assert archive.channel.queue_declare("target", passive=True).method.message_count == 0
    assert json_lines(ok(archive.replay("history", "--json"))) == []


def test_rate_limits_the_replay(archive: Archive) -> None:
    for n in range(1000):
        publish(archive.channel, "audit", "", b"x", message_id=str(n))
    archive.wait_rows(1000)
    started = time.monotonic()
    ok(archive.replay("run", "--exchange", "audit", "--to-queue", "target", "--rate", "500", "--yes"))
    elapsed = time.monotonic() - started
    assert 1.9 < elapsed < 6, elapsed
    assert archive.channel.queue_declare("target", passive=True).method.message_count == 1000


def test_errors_are_one_line_with_exit_codes(archive: Archive) -> None:
    publish_sample(archive)
    assert_one_line_error(archive.replay("find", "--since", "yesterday"), 2, "--since")
    assert_one_line_error(archive.replay("show", "999999"), 2, "999999")
    assert_one_line_error(archive.replay("show", "abc"), 2, "abc")
    assert_one_line_error(archive.replay("resume", str(uuid.uuid4())), 2, "history")
    missing_queue = archive.replay("run", "--exchange", "orders", "--to-queue", "nowhere", "--yes")
    assert_one_line_error(missing_queue, 2, "nowhere")
    missing_exchange = archive.replay("run", "--exchange", "orders", "--to-exchange", "nowhere", "--yes")
    assert_one_line_error(missing_exchange, 2, "nowhere")
    no_broker = {**archive.env, "RABBIT_ARCHIVE_AMQP_URL": "amqp://guest:guest@127.0.0.1:1/"}
    unreachable = replay_command(no_broker, "run", "--exchange", "orders", "--to-queue", "target", "--yes")
    assert_one_line_error(unreachable, 1, "RabbitMQ")
    no_db = {**archive.env, "RABBIT_ARCHIVE_DATABASE_URL": "postgresql://root:secret@127.0.0.1:1/x"}
    result = replay_command(no_db, "find")
    assert_one_line_error(result, 1, "PostgreSQL")
    assert "secret" not in result.stderr


def test_show_prints_headers_with_their_amqp_types(archive: Archive) -> None:
    publish_sample(archive)
    first = json_lines(ok(archive.replay("find", "--json", "--limit", "1")))[0]
    text = ok(archive.replay("show", str(first["id"])))
    assert 'tenant (longstr): "t0"' in text
    assert "attempt (" in text
    assert '"customer": "c0"' in text  # pretty-printed JSON body
    shown = json.loads(ok(archive.replay("show", str(first["id"]), "--json")))
    assert {entry["key"]: entry["type"] for entry in shown["headers_typed"]}["tenant"] == "longstr"
    audit = json_lines(ok(archive.replay("find", "--exchange", "audit", "--json", "--limit", "1")))[0]
    assert "00 ff 00" in ok(archive.replay("show", str(audit["id"])))  # binary body as hex


def test_progress_shows_on_a_terminal_and_stays_quiet_in_a_pipe(archive: Archive) -> None:
    publish_sample(archive)
    piped = archive.replay("run", "--exchange", "orders", "--to-queue", "target", "--yes")
    ok(piped)
    # One line saying what is replayed, one with the coverage verdict, and no progress output.
    lines = piped.stderr.splitlines()
    assert lines[0] == f"replaying 9 messages (554 bytes) to queue:target in vhost {archive_vhost(archive)!r}"
    assert lines[1].startswith("coverage: complete for 1 exchange(s), ")
    assert len(lines) == 2
    master, terminal = pty.openpty()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RABBIT_ARCHIVE_")}
    process = subprocess.Popen(
        [command("rabbit-replay"), "run", "--exchange", "orders", "--to-queue", "target", "--yes"],
        env={**clean, **archive.env, "COLUMNS": "120"},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=terminal,
    )
    os.close(terminal)
    shown = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the terminal closes when the process exits
            break
        if not chunk:
            break
        shown += chunk
    os.close(master)
    assert process.wait(60) == 0
    assert process.stdout is not None
    process.stdout.close()
    assert b"9/9" in shown  # the bar's done/total column
    assert b"100%" in shown


def archive_vhost(archive: Archive) -> str:
    return archive.env["RABBIT_ARCHIVE_AMQP_URL"].rsplit("/", 1)[1]
