"""`rabbit-replay export` / `run --from-file` across vhosts, `--max-queue-depth`, and `history` for people."""

import base64
import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pika
import pytest

from tests.acceptance import test_replay
from tests.acceptance.test_replay import (
    UUID_LENGTH,
    Archive,
    assert_one_line_error,
    json_lines,
    ok,
    publish,
    publish_sample,
    replay_command,
)
from tests.support.daemon import command
from tests.support.services import Services

pytestmark = pytest.mark.acceptance

# The fixture of test_replay.py: a daemon capturing the test vhost, with its exchanges and queues.
archive = test_replay.archive

REPLAY_HEADERS = {
    "x-replay-id",
    "x-replay-archive-id",
    "x-replayed-at",
    "x-original-exchange",
    "x-original-routing-key",
    "x-original-captured-at",
    "x-replay-reason",
    "x-replay-of",
}
# Every basic property but headers (compared separately) and expiration (it would expire them).
PROPERTY_NAMES = (
    "content_type",
    "content_encoding",
    "delivery_mode",
    "priority",
    "correlation_id",
    "reply_to",
    "message_id",
    "timestamp",
    "type",
    "user_id",
    "app_id",
)


def pika_connection(services: Services, vhost: str) -> pika.BlockingConnection:
    return pika.BlockingConnection(
        pika.ConnectionParameters(
            host=services.amqp_host,
            port=services.amqp_port,
            virtual_host=vhost,
            credentials=pika.PlainCredentials("guest", "guest"),
        )
    )


@pytest.fixture
def other_vhost(management: httpx.Client, services: Services) -> Iterator[tuple[str, Any]]:
    """A second vhost (another environment) and a pika channel on it; deleted afterwards."""
    name = f"test-other-{uuid.uuid4().hex[:10]}"
    encoded = quote(name, safe="")
    management.put(f"/api/vhosts/{encoded}").raise_for_status()
    try:
        management.put(
            f"/api/permissions/{encoded}/guest", json={"configure": ".*", "write": ".*", "read": ".*"}
        ).raise_for_status()
        connection = pika_connection(services, name)
        try:
            yield name, connection.channel()
        finally:
            if connection.is_open:
                connection.close()
    finally:
        management.delete(f"/api/vhosts/{encoded}")


def drain(channel: Any, queue: str, expected: int, timeout: float = 30) -> list[tuple[Any, bytes]]:
    """Exactly the messages in the queue: waits for `expected`, then checks that no more arrive."""
    received: list[tuple[Any, bytes]] = []
    deadline = time.monotonic() + timeout
    while len(received) < expected and time.monotonic() < deadline:
        method, properties, body = channel.basic_get(queue, auto_ack=True)
        if method is None:
            time.sleep(0.05)
            continue
        received.append((properties, body))
    assert len(received) == expected, f"{len(received)} of {expected} messages arrived in {queue}"
    time.sleep(0.3)
    assert channel.queue_declare(queue, passive=True).method.message_count == 0
    return received


def depth(channel: Any, queue: str) -> int:
    return int(channel.queue_declare(queue, passive=True).method.message_count)


# pika encodes every type but floats; it decodes what it gets back to the same Python values.
ODD_HEADERS: dict[str, Any] = {
    "tenant": "t-ü",
    "attempt": 7,
    "big": 2**40,
    "negative": -3,
    "flag": True,
    "off": False,
    "raw": b"\x00\xff\x01",
    "price": Decimal("12.34"),
    "when": datetime(2024, 5, 17, 12, 30, 0),
    "nested": {"a": 1, "b": ["x", 2, {"c": None}]},
    "list": [1, "two", -(2**40)],
    "nothing": None,
}


def publish_rich(archive: Archive, count: int) -> None:
    """Messages with every basic property and headers of many AMQP types, to 'orders'."""
    for n in range(count):
        publish(
            archive.channel,
            "orders",
            f"eu.created.{n}",
            json.dumps({"n": n}).encode() if n % 2 else bytes([0, 1, 2, 255, n]),
            content_type="application/json" if n % 2 else "application/octet-stream",
            content_encoding="identity",
            delivery_mode=2,
            priority=n % 10,
            correlation_id=f"corr-{n}",
            reply_to="replies",
            message_id=f"rich-{n}",
            timestamp=1_700_000_000 + n,
            type="order.created",
            user_id="guest",
            app_id="shop",
            headers={**ODD_HEADERS, "n": n},
        )


def test_export_then_run_from_file_into_another_vhost_keeps_bytes_properties_and_headers(
    archive: Archive, other_vhost: tuple[str, Any], services: Services, tmp_path: Path
) -> None:
    other_name, other_channel = other_vhost
    archive.channel.queue_purge("orders-all")
    publish_rich(archive, 6)
    archive.wait_rows(6)
    originals = drain(archive.channel, "orders-all", 6)

    # export with no --output: JSON Lines on stdout, full messages.
    *lines, end = json_lines(ok(archive.replay("export", "--exchange", "orders")))
    assert (end["rabbit_archive_export_end"], end["count"]) == (True, 6)  # the end marker
    assert len(lines) == 6
    for line, (props, body) in zip(lines, originals, strict=True):
        assert {"body_base64", "headers_typed", "properties_raw_base64", "id", "routing_key"} <= set(line)
        assert base64.b64decode(line["body_base64"]) == body
        assert line["properties"]["message_id"] == props.message_id
        assert line["exchange"] == "orders"
        typed = {entry["key"]: entry["type"] for entry in line["headers_typed"]}
        assert set(typed) == set(ODD_HEADERS) | {"n"}

    export_file = tmp_path / "slice.jsonl"
    result = archive.replay("export", "--exchange", "orders", "--output", str(export_file))
    ok(result)
    assert json_lines(export_file.read_text(encoding="utf-8")) == [*lines, end]

    # Another environment: a vhost the daemon does not capture, with the queue that needs them.
    other_channel.queue_declare("restore", durable=True)
    other_env = {
        **archive.env,
        "RABBIT_ARCHIVE_AMQP_URL": services.amqp_url.rstrip("/") + "/" + quote(other_name, safe=""),
    }
    result = replay_command(
        other_env,
        "run",
        "--from-file",
        str(export_file),
        "--to-queue",
        "restore",
        "--yes",
        "--reason",
        "move",
    )
    stdout = ok(result)
    replay_id = stdout.splitlines()[0]
    assert len(replay_id) == UUID_LENGTH
    assert uuid.UUID(replay_id)
    assert "selected 6, published 6, confirmed 6, returned 0" in stdout
    replayed = drain(other_channel, "restore", 6)
    # Nothing leaked into the captured vhost.
    assert depth(archive.channel, "target") == 0
    assert depth(archive.channel, "orders-all") == 0

    for line, (original, original_body), (props, body) in zip(lines, originals, replayed, strict=True):
        assert body == original_body
        for name in PROPERTY_NAMES:
            assert getattr(props, name) == getattr(original, name), name
        headers = dict(props.headers)
        assert headers["x-replay-id"] == replay_id
        assert headers["x-replay-archive-id"] == line["id"]
        assert headers["x-original-exchange"] == "orders"
        assert headers["x-original-routing-key"] == line["routing_key"]
        assert headers["x-replay-reason"] == "move"
        assert isinstance(headers["x-replayed-at"], datetime)
        assert isinstance(headers["x-original-captured-at"], datetime)
        assert "x-replay-of" not in headers
        # The same headers and values as the original delivery, apart from the replay tags.
        assert {k: v for k, v in headers.items() if k not in REPLAY_HEADERS} == original.headers
        assert original.headers["raw"] == b"\x00\xff\x01"
        assert original.headers["price"] == Decimal("12.34")

    history = json_lines(ok(replay_command(other_env, "history", "--json")))
    assert [(h["replay_id"], h["status"], h["selected"], h["confirmed"]) for h in history] == [
        (replay_id, "completed", 6, 6)
    ]


def test_run_from_file_refuses_malformed_files_and_filters_publishing_nothing(
    archive: Archive, tmp_path: Path
) -> None:
    publish_sample(archive)
    good = tmp_path / "good.jsonl"
    ok(archive.replay("export", "--exchange", "audit", "--output", str(good)))
    good_lines = good.read_text(encoding="utf-8").splitlines()
    assert len(good_lines) == 5  # four messages and the end marker

    not_json = tmp_path / "not-json.jsonl"
    not_json.write_text(good_lines[0] + "\n" + "this is not json\n" + good_lines[1] + "\n", encoding="utf-8")
    result = archive.replay("run", "--from-file", str(not_json), "--to-queue", "target", "--yes")
    assert_one_line_error(result, 2, f"{not_json}:2")

    missing = json.loads(good_lines[2])
    del missing["body_base64"]
    no_body = tmp_path / "no-body.jsonl"
    no_body.write_text(
        "\n".join([*good_lines[:2], json.dumps(missing), good_lines[3]]) + "\n", encoding="utf-8"
    )
    result = archive.replay("run", "--from-file", str(no_body), "--to-queue", "target", "--yes")
    assert_one_line_error(result, 2, f"{no_body}:3", "body_base64")

    bad_base64 = dict(json.loads(good_lines[0]), body_base64="%%%")
    garbled = tmp_path / "garbled.jsonl"
    garbled.write_text(json.dumps(bad_base64) + "\n", encoding="utf-8")
    assert_one_line_error(
        archive.replay("run", "--from-file", str(garbled), "--to-queue", "target", "--yes"), 2, f"{garbled}:1"
    )

    absent = tmp_path / "absent.jsonl"
    assert_one_line_error(
        archive.replay("run", "--from-file", str(absent), "--to-queue", "target", "--yes"), 2, str(absent)
    )

    # A file replays as a whole: filters (or --all) with it are bad usage.
    combined = archive.replay(
        "run", "--from-file", str(good), "--exchange", "audit", "--to-queue", "target", "--yes"
    )
    assert_one_line_error(combined, 2, "--from-file")
    with_all = archive.replay("run", "--from-file", str(good), "--all", "--to-queue", "target", "--yes")
    assert_one_line_error(with_all, 2, "--from-file")

    # Nothing of the valid lines before the bad one went out, and no replay was recorded.
    time.sleep(0.5)
    assert depth(archive.channel, "target") == 0
    assert json_lines(ok(archive.replay("history", "--json"))) == []
    # The good file itself works (the refusals above were about the input, not the setup).
    ok(archive.replay("run", "--from-file", str(good), "--to-queue", "target", "--yes"))
    assert [p.message_id for p, _ in drain(archive.channel, "target", 4)] == [f"a-{n}" for n in range(4)]


MAX_DEPTH = 50
MESSAGES = 300


def test_max_queue_depth_pauses_while_the_target_queue_is_full(archive: Archive) -> None:
    for n in range(MESSAGES):
        publish(archive.channel, "audit", "", b"x" * 10, message_id=f"d-{n}")
    archive.wait_rows(MESSAGES)
    archive.channel.queue_purge("audit-all")
    replay = [command("rabbit-replay"), "run", "--exchange", "audit", "--to-queue", "target"]
    replay += ["--max-queue-depth", str(MAX_DEPTH), "--yes"]
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RABBIT_ARCHIVE_")}, **archive.env}
    pipes: dict[str, Any] = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    with subprocess.Popen(replay, env=env, **pipes) as process:
        try:
            # Nobody consumes: the replay must hold back instead of filling the queue.
            deepest = 0
            deadline = time.monotonic() + 2.5
            while time.monotonic() < deadline and process.poll() is None:
                deepest = max(deepest, depth(archive.channel, "target"))
                time.sleep(0.05)
            deepest = max(deepest, depth(archive.channel, "target"))
            assert process.poll() is None, f"the replay finished with nobody consuming: depth {deepest}"
            assert deepest >= MAX_DEPTH, deepest  # it did publish up to the limit
            assert deepest <= MAX_DEPTH + 10, f"depth {deepest} overshoots --max-queue-depth {MAX_DEPTH}"

            # A consumer catches up: the replay continues and delivers everything, once, in order.
            received: list[str] = []
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and (process.poll() is None or len(received) < MESSAGES):
                method, properties, _ = archive.channel.basic_get("target", auto_ack=True)
                if method is None:
                    time.sleep(0.02)
                    continue
                received.append(properties.message_id)
            stdout, stderr = process.communicate(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert received == [f"d-{n}" for n in range(MESSAGES)]
    assert f"selected {MESSAGES}, published {MESSAGES}, confirmed {MESSAGES}, returned 0" in stdout
    assert depth(archive.channel, "target") == 0


def test_max_queue_depth_needs_to_queue(archive: Archive) -> None:
    result = archive.replay("run", "--exchange", "audit", "--max-queue-depth", "10", "--yes")
    assert_one_line_error(result, 2, "--max-queue-depth", "--to-queue")
    result = archive.replay(
        "run", "--exchange", "audit", "--to-exchange", "audit", "--max-queue-depth", "10", "--yes"
    )
    assert_one_line_error(result, 2, "--max-queue-depth", "--to-queue")


def test_history_table_shows_the_replay_id_and_status(archive: Archive) -> None:
    publish_sample(archive)
    replay_id = ok(archive.replay("run", "--exchange", "audit", "--to-queue", "target", "--yes")).split()[0]
    assert uuid.UUID(replay_id)
    table = ok(archive.replay("history"))
    assert replay_id in table, table
    row = next(line for line in table.splitlines() if replay_id in line)
    assert "completed" in row
    assert "queue:target" in table
