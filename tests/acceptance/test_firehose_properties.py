"""SOURCE=firehose against the real broker: what its trace copies hold of the integer properties,
and that the archive stores either the exact message or the flagged trace copy, never a wrong value.
"""

import asyncio
import json
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import pika
import pytest

from rabbit_archive.archive import content_header, frames
from rabbit_archive.archive.amqp_codec import FieldValue, Properties, decode_properties, encode_properties
from rabbit_archive.capture.firehose import LOST_HEADER, TRACE_EXCHANGE
from tests.acceptance.test_replay import ok, replay_command
from tests.conftest import run_sql
from tests.support.daemon import CaptureProcess, wait_for
from tests.support.raw_frames import WireProperties

pytestmark = pytest.mark.acceptance

ORDINARY = 1_700_000_000
YEAR_2100 = 4_102_444_800
MILLISECONDS = 1_700_000_000_000


async def trace_tables(amqp_url: str, sent: list[Properties]) -> list[dict[bytes, FieldValue]]:
    """Publish raw property bytes to the default exchange; the `properties` table of each trace copy."""
    connection = await frames.connect(amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        await channel.queue_declare("trace-sink", exclusive=True)
        await channel.queue_bind("trace-sink", TRACE_EXCHANGE, "publish.#")
        for index, props in enumerate(sent):
            raw = encode_properties(props)
            await channel.basic_publish(
                b"x",
                routing_key="nowhere",
                properties=WireProperties(raw, f"m-{index}"),  # type: ignore[arg-type]
            )
        tables: list[dict[bytes, FieldValue]] = []
        async with asyncio.timeout(30):
            while len(tables) < len(sent):
                message = await channel.basic_get("trace-sink", no_ack=True)
                if message.header is None:  # basic.get-empty
                    await asyncio.sleep(0.05)
                    continue
                headers = dict(decode_properties(content_header.raw_properties(message.header)).headers or [])
                tables.append(dict(headers[b"properties"][1]))
        return tables
    finally:
        await connection.close()


def test_rabbitmq_writes_integer_properties_into_the_trace_as_their_low_32_bits_signed(
    management: Any, vhost: str, amqp_url: str
) -> None:
    """The measurement behind capture/firehose.py (RabbitMQ 3.10): `I` fields, low 32 bits."""
    management.put(f"/api/vhosts/{quote(vhost, safe='')}", json={"tracing": True}).raise_for_status()
    timestamps = [0, ORDINARY, 2**31, YEAR_2100, 2**32 - 1, 2**32 + 5, MILLISECONDS, 2**63, 2**64 - 1]
    sent = [Properties(timestamp=t) for t in timestamps]
    sent += [Properties(delivery_mode=1), Properties(delivery_mode=2, priority=0), Properties(priority=255)]
    tables = asyncio.run(trace_tables(amqp_url, sent))
    got = [table.get(b"timestamp") for table in tables[: len(timestamps)]]
    assert got == [
        ("I", 0),
        ("I", ORDINARY),
        ("I", -(2**31)),
        ("I", -192_522_496),
        ("I", -1),
        ("I", 5),  # 2**32 + 5 reads as 5: no reading proves the original
        ("I", -807_049_216),
        ("I", 0),
        ("I", -1),
    ]
    assert tables[len(timestamps) :] == [
        {b"delivery_mode": ("I", 1)},
        {b"delivery_mode": ("I", 2), b"priority": ("I", 0)},
        {b"priority": ("I", 255)},
    ]


def test_firehose_stores_the_exact_message_or_the_flagged_trace_copy_and_counts_those(
    start_capture: Callable[..., CaptureProcess],
    pika_channel: Any,
    capture_env: dict[str, str],
    database_url: str,
    vhost: str,
) -> None:
    daemon = start_capture(source="firehose")
    pika_channel.exchange_declare("orders", "topic")
    sent = {
        "ordinary": ORDINARY,
        "year-2100": YEAR_2100,
        "milliseconds": MILLISECONDS,
        "no-timestamp": None,
    }
    for message_id, timestamp in sent.items():
        pika_channel.basic_publish(
            "orders",
            "eu.new",
            message_id.encode(),
            pika.BasicProperties(message_id=message_id, timestamp=timestamp, delivery_mode=2, priority=7),
        )
    wait_for(
        lambda: run_sql(database_url, "SELECT count(*) FROM rabbit_archive.messages")[0][0] == len(sent),
        20,
        what="every traced message stored",
    )
    rows = {
        bytes(row["body"]).decode(): row
        for row in run_sql(
            database_url,
            "SELECT id, exchange, routing_key, body, properties_raw FROM rabbit_archive.messages",
        )
    }
    flagged = 0
    for message_id, timestamp in sent.items():
        row = rows[message_id]
        props = decode_properties(row["properties_raw"])
        if row["exchange"] == "orders":
            # Stored as itself: then every property is the one published.
            assert row["routing_key"] == "eu.new"
            assert props == Properties(
                delivery_mode=2, priority=7, message_id=message_id.encode(), timestamp=timestamp
            )
            continue
        # Stored as the trace copy, flagged, with the broker's 32-bit reading inside it.
        flagged += 1
        assert (row["exchange"], row["routing_key"]) == (TRACE_EXCHANGE, "publish.orders")
        headers = dict(props.headers or [])
        assert headers[LOST_HEADER] == ("S", b"timestamp")
        inner = dict(headers[b"properties"][1])
        assert inner[b"message_id"] == ("S", message_id.encode())
        assert timestamp is not None
        assert inner[b"timestamp"][0] == "I"
        assert inner[b"timestamp"][1] % 2**32 == timestamp % 2**32
        shown = json.loads(ok(replay_command(capture_env, "show", str(row["id"]), "--json")))
        assert shown["headers"][LOST_HEADER.decode()] == "timestamp"
    # No 32-bit reading is provably a timestamp: every timestamped message is flagged.
    assert flagged == 3
    assert rows["no-timestamp"]["exchange"] == "orders"
    metric = f'rabbit_archive_trace_properties_lost_total{{vhost="{vhost}"}}'
    wait_for(lambda: f"{metric} {float(flagged)}" in daemon.metrics(), 10, what=metric)
