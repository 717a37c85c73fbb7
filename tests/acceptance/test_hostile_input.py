"""Poison messages from a careless or malicious producer: all stored losslessly, capture carries on."""

import asyncio
import base64
import json
import time
from collections.abc import Callable
from typing import Any

import aiormq
import pytest

from rabbit_archive.archive.amqp_codec import FieldValue, Properties, Table, encode_properties
from tests.acceptance.test_replay import json_lines, ok, replay_command
from tests.conftest import run_sql
from tests.support.daemon import CaptureProcess, wait_for
from tests.support.raw_frames import WireProperties, any_bytes_in_short_strings

pytestmark = pytest.mark.acceptance


def nested(depth: int) -> FieldValue:
    value: FieldValue = ("S", b"bottom")
    for level in range(depth):
        value = ("F", [(b"level", ("I", level)), (b"down", value)])
    return value


POISON: list[tuple[str, bytes, Table, dict[str, Any], bytes]] = [
    # (name, routing key bytes, headers, other properties, body)
    ("nul", b"key.with\x00nul", [(b"h\x00k", ("S", b"v\x00v"))], {"message_id": b"id\x00nul"}, b"\x00\x00"),
    (
        "invalid-utf8",
        b"bad.\xff\xfe.key",
        [(b"\xc3\x28", ("S", b"\xed\xa0\x80 lone surrogate")), (b"ok", ("S", b"\xff"))],
        {"correlation_id": b"\xff\xfe", "content_type": b"text/\xff"},
        b"\xff\xfe\xfd",
    ),
    ("deep", b"deep", [(b"root", nested(100))], {}, b"deep"),
    ("wide", b"wide", [(f"h{n}".encode(), ("I", n)) for n in range(10_000)], {}, b"wide"),
    (
        "liar",
        b"liar",
        [],
        {"content_type": b"application/json", "content_encoding": b"gzip"},
        bytes(range(256)),
    ),
    ("big", b"big", [(b"case", ("S", b"64 MB"))], {}, b"\xab" * (64 * 1024 * 1024)),
]


async def publish_between_ordinary(amqp_url: str, exchange: str) -> list[tuple[str, bytes, bytes, bytes]]:
    """Each poison message between two ordinary ones; returns (name, routing key, properties, body)."""
    sent = []
    with any_bytes_in_short_strings():
        connection = await aiormq.connect(amqp_url)
        try:
            channel = await connection.channel(publisher_confirms=True)
            sequence = 0

            async def publish(name: str, routing_key: bytes, raw: bytes, body: bytes) -> None:
                nonlocal sequence
                sequence += 1
                await channel.basic_publish(
                    body,
                    exchange=exchange,
                    routing_key=routing_key.decode("utf-8", "surrogateescape"),
                    properties=WireProperties(raw, f"t-{sequence}"),  # type: ignore[arg-type]
                )
                sent.append((name, routing_key, raw, body))

            for name, routing_key, headers, props, body in POISON:
                ordinary = encode_properties(Properties(message_id=f"before-{name}".encode()))
                await publish(f"before-{name}", b"ordinary", ordinary, b"ordinary")
                await publish(
                    name, routing_key, encode_properties(Properties(headers=headers, **props)), body
                )
            await publish("last", b"ordinary", encode_properties(Properties(message_id=b"last")), b"ordinary")
        finally:
            await connection.close()
    return sent


def test_poison_messages_are_stored_losslessly_and_capture_carries_on(
    start_capture: Callable[..., CaptureProcess],
    capture_env: dict[str, str],
    pika_channel: Any,
    amqp_url: str,
    database_url: str,
) -> None:
    daemon = start_capture()
    pika_channel.exchange_declare("hostile", "topic", durable=True)
    daemon.wait_bound("hostile")
    started = time.monotonic()
    sent = asyncio.run(publish_between_ordinary(amqp_url, "hostile"))
    wait_for(
        lambda: run_sql(database_url, "SELECT count(*) FROM rabbit_archive.messages")[0][0] >= len(sent),
        60,
        what="every message stored",
    )
    elapsed = time.monotonic() - started
    assert run_sql(database_url, "SELECT count(*) FROM rabbit_archive.messages")[0][0] == len(sent)
    found = json_lines(ok(replay_command(capture_env, "find", "--json")))
    assert len(found) == len(sent)
    for (name, routing_key, raw, body), summary in zip(sent, found, strict=True):
        shown = json.loads(ok(replay_command(capture_env, "show", str(summary["id"]), "--json")))
        assert base64.b64decode(shown["properties_raw_base64"]) == raw, name
        assert base64.b64decode(shown["body_base64"]) == body, name
        stored_key = (
            base64.b64decode(shown["routing_key_raw_base64"])
            if "routing_key_raw_base64" in shown
            else shown["routing_key"].encode()
        )
        assert stored_key == routing_key, name
        # The people's view never fails either.
        ok(replay_command(capture_env, "show", str(summary["id"])))
    # Ordinary messages after each poison one were not held up (the 64 MB body included).
    assert elapsed < 30, elapsed
    assert daemon.ready()
    # A routing key that is not UTF-8 goes back to its exchange as the same bytes: the daemon
    # captures the replayed copy with that key.
    bad = next(item for item in found if item["routing_key"].startswith("bad."))
    ok(replay_command(capture_env, "run", "--from-id", str(bad["id"]), "--to-id", str(bad["id"]), "--yes"))
    wait_for(
        lambda: run_sql(database_url, "SELECT count(*) FROM rabbit_archive.messages")[0][0] == len(sent) + 1,
        30,
        what="the replayed copy captured",
    )
    copy = json_lines(ok(replay_command(capture_env, "find", "--include-replays", "--json")))[-1]
    assert copy["replay_id"] is not None
    shown_copy = json.loads(ok(replay_command(capture_env, "show", str(copy["id"]), "--json")))
    assert base64.b64decode(shown_copy["routing_key_raw_base64"]) == b"bad.\xff\xfe.key"
    assert base64.b64decode(shown_copy["body_base64"]) == b"\xff\xfe\xfd"


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM), in MB."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc status")


def test_a_backlog_of_large_messages_keeps_the_daemon_under_its_memory_ceiling(
    start_capture: Callable[..., CaptureProcess],
    pika_channel: Any,
    database_url: str,
) -> None:
    count, size = 24, 32 * 1024 * 1024
    daemon = start_capture()
    pika_channel.exchange_declare("large", "fanout", durable=True)
    daemon.wait_bound("large")
    daemon.stop()
    body = bytes(range(256)) * (size // 256)
    for _ in range(count):
        pika_channel.basic_publish("large", "", body)
    # 768 MB waiting in the archive queue; BUFFER_MAX_BYTES is 128 MB by default.
    daemon = start_capture()
    assert daemon.process is not None
    wait_for(
        lambda: run_sql(database_url, "SELECT count(*) FROM rabbit_archive.messages")[0][0] >= count,
        120,
        what="the backlog drained",
    )
    peak = peak_rss_mb(daemon.process.pid)
    assert peak < MEMORY_CEILING_MB, peak
    lengths = run_sql(database_url, "SELECT DISTINCT length(body) FROM rabbit_archive.messages")
    assert [row[0] for row in lengths] == [size]


# README.md: about 100 MB + 2 x (BUFFER_MAX_BYTES + the largest message), here 100 + 2 x (128 + 32).
MEMORY_CEILING_MB = 450
