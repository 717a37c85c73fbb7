"""Exact AMQP fidelity end to end: published, captured by the daemon, replayed, received byte for byte."""

import asyncio
import dataclasses
import datetime
import decimal
import random
from collections.abc import Callable
from typing import Any

import aiormq
import pika
import pytest

from rabbit_archive.archive import content_header, frames
from rabbit_archive.archive.amqp_codec import (
    Properties,
    Table,
    decode_properties,
    encode_properties,
    encode_table,
)
from tests.acceptance.test_replay import json_lines, ok, replay_command
from tests.conftest import run_sql
from tests.support.daemon import CaptureProcess, wait_for
from tests.support.raw_frames import WireProperties

pytestmark = pytest.mark.acceptance

TAGS = {
    b"x-replay-id": "S",
    b"x-replay-archive-id": "l",
    b"x-replayed-at": "T",
    b"x-original-exchange": "S",
    b"x-original-routing-key": "S",
    b"x-original-captured-at": "T",
    b"x-replay-reason": "S",
}

# Every field type RabbitMQ carries, at the edges of each integer width, with values that a
# Python codec would change: a double that is not a float, invalid UTF-8, NUL characters.
EVERY_TYPE: Table = [
    (b"case", ("S", b"raw")),
    (b"int8", ("b", -128)),
    (b"uint8", ("B", 255)),
    (b"int16", ("s", -32768)),
    (b"uint16", ("u", 65535)),
    (b"int32", ("I", -(2**31))),
    (b"uint32", ("i", 2**32 - 1)),
    (b"int64", ("l", -(2**63))),
    (b"small-int64", ("l", 1)),  # a Java consumer reads this as Long, not Byte
    (b"float", ("f", 1.5)),
    (b"double", ("d", 0.1)),
    (b"decimal", ("D", (3, -123456))),
    (b"timestamp", ("T", 1_700_000_000)),
    (b"bytes", ("x", bytes(range(256)))),
    (b"invalid-utf8", ("S", b"caf\xe9 \xff\xfe")),
    (b"nul", ("S", b"a\x00b\x00")),
    (b"key \xff with bytes", ("S", b"key is not UTF-8")),
    (b"table", ("F", [(b"inner", ("I", 1)), (b"deeper", ("F", [(b"flag", ("t", True))]))])),
    (b"empty-table", ("F", [])),
    (b"array", ("A", [("I", 1), ("S", b"two"), ("d", 3.25), ("A", []), ("F", [(b"k", ("V", None))])])),
    (b"void", ("V", None)),
    (b"true", ("t", True)),
    (b"false", ("t", False)),
]

EVERY_PROPERTY = {
    "content_type": b"application/octet-stream",
    "content_encoding": b"identity",
    "delivery_mode": 2,
    "priority": 7,
    "correlation_id": b"corr-\xff",
    "reply_to": b"replies",
    "expiration": b"600000",
    "message_id": b"raw-1",
    "timestamp": 1_650_000_000,
    "type": b"order.created",
    "user_id": b"guest",  # RabbitMQ checks it against the connection's user
    "app_id": b"fidelity-test",
    "cluster_id": b"c1",
}


async def publish_raw(amqp_url: str, exchange: str, messages: list[tuple[bytes, bytes]]) -> None:
    """Publish (property bytes, body) pairs as raw content-header frames, with confirms."""
    connection = await aiormq.connect(amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        for index, (raw, body) in enumerate(messages):
            await channel.basic_publish(
                body,
                exchange=exchange,
                routing_key="typed.raw",
                properties=WireProperties(raw, f"test-{index}"),  # type: ignore[arg-type]
            )
    finally:
        await connection.close()


async def receive_raw(
    amqp_url: str, queue: str, count: int, wait_seconds: float = 60
) -> list[tuple[bytes, bytes]]:
    """(property bytes, body) of `count` messages as a consumer receives them, bytes untouched."""
    received: list[tuple[bytes, bytes]] = []
    done = asyncio.Event()
    # The archive's own connection class reads property bytes untouched.
    connection = await frames.connect(amqp_url)
    try:
        channel = await connection.channel()

        async def on_message(message: Any) -> None:
            received.append((content_header.raw_properties(message.header), message.body))
            await channel.basic_ack(message.delivery.delivery_tag)
            if len(received) >= count:
                done.set()

        await channel.basic_consume(queue, on_message)
        async with asyncio.timeout(wait_seconds):
            await done.wait()
    finally:
        await connection.close()
    return received


def without_tags(props: Properties) -> tuple[Properties, Table]:
    """The properties with the replay tags taken out of the header table, and the tags."""
    table = props.headers or []
    tags = [entry for entry in table if entry[0] in TAGS]
    rest = [entry for entry in table if entry[0] not in TAGS]
    return dataclasses.replace(props, headers=rest), tags


def test_every_header_type_and_property_round_trips_byte_for_byte_through_capture_and_replay(
    start_capture: Callable[..., CaptureProcess],
    capture_env: dict[str, str],
    pika_channel: Any,
    amqp_url: str,
    database_url: str,
) -> None:
    daemon = start_capture()
    pika_channel.exchange_declare("typed", "topic", durable=True)
    pika_channel.queue_declare("ordinary", durable=True)
    pika_channel.queue_bind("ordinary", "typed", "#")
    pika_channel.queue_declare("target", durable=True)
    daemon.wait_bound("typed")

    rng = random.Random(7)
    raw_messages = [
        (encode_properties(Properties(headers=EVERY_TYPE, **EVERY_PROPERTY)), b"typed body"),
        (encode_properties(Properties(headers=[(b"case", ("S", b"empty body"))])), b""),
        (encode_properties(Properties(headers=[(b"case", ("S", b"one byte"))])), b"\x00"),
        (encode_properties(Properties()), rng.randbytes(70_000)),  # no properties at all
        (
            encode_properties(Properties(headers=[(b"case", ("S", b"20 MB"))])),
            rng.randbytes(20 * 1024 * 1024),
        ),
    ]
    asyncio.run(publish_raw(amqp_url, "typed", raw_messages))
    # pika's own encoding of the types it can produce (ints by size, Decimal, datetime, bytes...).
    pika_channel.basic_publish(
        "typed",
        "typed.pika",
        bytes(rng.randbytes(4096)),
        pika.BasicProperties(
            content_type="application/x-binary",
            content_encoding="gzip",
            headers={
                "case": "pika",
                "int": 42,
                "big": 2**40,
                "negative": -7,
                "decimal": decimal.Decimal("3.14"),
                "when": datetime.datetime(2026, 11, 27, 12, 0, 0),
                "bytes": b"\x00\x01",
                "nested": {"list": [1, "two", {"three": None}], "flag": True},
                "none": None,
            },
            delivery_mode=2,
            priority=3,
            correlation_id="c-1",
            reply_to="r",
            expiration="600000",
            message_id="pika-1",
            timestamp=1_700_000_000,
            type="t",
            user_id="guest",
            app_id="a",
        ),
    )
    total = len(raw_messages) + 1
    wait_for(
        lambda: run_sql(database_url, "SELECT count(*) FROM rabbit_archive.messages")[0][0] >= total,
        60,
        what="all captured",
    )
    originals = asyncio.run(receive_raw(amqp_url, "ordinary", total))
    replayed = ok(replay_command(capture_env, "run", "--exchange", "typed", "--to-queue", "target", "--yes"))
    replay_id = replayed.splitlines()[0]
    copies = asyncio.run(receive_raw(amqp_url, "target", total))
    archive_ids = [item["id"] for item in json_lines(ok(replay_command(capture_env, "find", "--json")))]
    assert len(archive_ids) == total

    for (original_raw, original_body), (copy_raw, copy_body), archive_id in zip(
        originals, copies, archive_ids, strict=True
    ):
        assert copy_body == original_body
        original = decode_properties(original_raw)
        copy, tags = without_tags(decode_properties(copy_raw))
        # Every original header entry, with its type, in order, byte for byte.
        assert copy.headers == (original.headers or [])
        assert encode_table(copy.headers) == encode_table(original.headers or [])
        original_raw_table = encode_table(original.headers or [])[4:]
        assert original_raw_table in copy_raw
        for name in EVERY_PROPERTY:
            assert getattr(copy, name) == getattr(original, name), name
        # The replay tags, typed as README "Replay headers" says.
        typed = {key: value for key, value in tags}
        expected_types = {key: letter for key, letter in TAGS.items() if key != b"x-replay-reason"}
        assert {key: value[0] for key, value in typed.items()} == expected_types
        assert typed[b"x-replay-id"] == ("S", replay_id.encode())
        assert typed[b"x-replay-archive-id"] == ("l", archive_id)
        assert typed[b"x-original-exchange"] == ("S", b"typed")

    # The raw message as it was built, for certainty that the broker passed it through untouched.
    assert decode_properties(originals[0][0]).headers == EVERY_TYPE
