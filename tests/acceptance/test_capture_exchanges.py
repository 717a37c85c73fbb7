"""The installed daemon captures every exchange type with every field and leaves one-queue exchanges alone."""

import json
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import httpx
import pika
import pytest

from rabbit_archive.archive.amqp_codec import decode_properties
from tests.conftest import run_sql
from tests.support.daemon import CaptureProcess, wait_for

pytestmark = pytest.mark.acceptance

ALL_PROPERTIES = {
    "content_type": "application/json",
    "content_encoding": "utf-8",
    "delivery_mode": 2,
    "priority": 5,
    "correlation_id": "corr-1",
    "reply_to": "replies",
    "expiration": "600000",
    "message_id": None,  # set per message
    "timestamp": 1_700_000_000,
    "type": "order.created",
    "user_id": "guest",
    "app_id": "shop",
    "cluster_id": "eu-1",
}


def archived(database_url: str) -> list[dict[str, Any]]:
    """Every archived row, oldest first."""
    return [dict(row) for row in run_sql(database_url, "SELECT * FROM rabbit_archive.messages ORDER BY id")]


def archived_count(database_url: str) -> int:
    """Number of archived rows (0 before the schema exists)."""
    try:
        return int(run_sql(database_url, "SELECT count(*) FROM rabbit_archive.messages")[0][0])
    except Exception:  # the database or table may not exist yet
        return 0


def publish(channel: Any, exchange: str, routing_key: str, message_id: str, headers: dict[str, Any]) -> None:
    """Publish one message with every basic property set (pika, publisher confirms on)."""
    properties = pika.BasicProperties(**{**ALL_PROPERTIES, "message_id": message_id, "headers": headers})
    channel.basic_publish(exchange, routing_key, f'{{"id": "{message_id}"}}'.encode(), properties)


def test_every_exchange_type_is_captured_with_all_fields(
    start_capture: Callable[..., CaptureProcess], pika_channel: Any, database_url: str
) -> None:
    channel = pika_channel
    channel.exchange_declare("orders.topic", "topic")
    channel.exchange_declare("orders.fanout", "fanout")
    channel.exchange_declare("orders.direct", "direct")
    channel.exchange_declare("orders.headers", "headers")
    # A real consumer's queue on the direct exchange: the archive mirrors its key.
    channel.queue_declare("billing")
    channel.queue_bind("billing", "orders.direct", "invoice")
    daemon = start_capture()
    wait_for(lambda: "orders.direct" in daemon.log() and "invoice" in daemon.log(), 10, what="direct binding")

    headers = {"tenant": "acme", "attempt": 3, "tags": ["a", "b"], "nested": {"k": "v"}}
    publish(channel, "orders.topic", "eu.order.created", "m-topic", headers)
    publish(channel, "orders.fanout", "whatever", "m-fanout", headers)
    publish(channel, "orders.direct", "invoice", "m-direct", headers)
    publish(channel, "orders.headers", "", "m-headers", headers)
    publish(channel, "amq.topic", "a.b", "m-amq-topic", headers)

    wait_for(lambda: archived_count(database_url) >= 5, 15, what="5 rows")
    rows = {row["message_id"]: row for row in archived(database_url)}
    assert set(rows) == {"m-topic", "m-fanout", "m-direct", "m-headers", "m-amq-topic"}
    expected_route = {
        "m-topic": ("orders.topic", "eu.order.created"),
        "m-fanout": ("orders.fanout", "whatever"),
        "m-direct": ("orders.direct", "invoice"),
        "m-headers": ("orders.headers", ""),
        "m-amq-topic": ("amq.topic", "a.b"),
    }
    for message_id, row in rows.items():
        assert (row["exchange"], row["routing_key"]) == expected_route[message_id]
        assert row["body"] == f'{{"id": "{message_id}"}}'.encode()
        assert row["body_size"] == len(row["body"])
        assert row["redelivered"] is False
        assert row["replay_id"] is None
        assert row["vhost"] == daemon.env["RABBIT_ARCHIVE_AMQP_URL"].rsplit("/", 1)[1]
        properties = json.loads(row["properties"])
        for name, value in ALL_PROPERTIES.items():
            if name == "timestamp":
                assert properties[name] == "2023-11-14T22:13:20Z"
            elif name == "message_id":
                assert properties[name] == message_id
            else:
                assert properties[name] == value, name
        assert json.loads(row["headers"]) == headers
        # The raw property bytes are authoritative and decode to the same values, typed.
        decoded = decode_properties(row["properties_raw"])
        assert decoded.message_id == message_id.encode()
        assert decoded.timestamp == 1_700_000_000
        assert dict(decoded.headers or []) == {
            b"tenant": ("S", b"acme"),
            b"attempt": ("I", 3),  # the width pika chose (32-bit), kept as sent
            b"tags": ("A", [("S", b"a"), ("S", b"b")]),
            b"nested": ("F", [(b"k", ("S", b"v"))]),
        }


def test_exchange_declared_later_is_captured_within_the_discovery_interval(
    start_capture: Callable[..., CaptureProcess], pika_channel: Any, database_url: str
) -> None:
    interval = 1.0
    start_capture(discovery_interval=str(interval))
    pika_channel.exchange_declare("late.events", "topic")
    declared_at = time.monotonic()
    # Publish until one is stored: the first message published after the binding exists.
    sent = 0
    while archived_count(database_url) == 0:
        assert time.monotonic() - declared_at < interval + 2, "not captured within DISCOVERY_INTERVAL + 2 s"
        publish(pika_channel, "late.events", "x.y", f"late-{sent}", {})
        sent += 1
        time.sleep(0.05)
    assert archived(database_url)[0]["exchange"] == "late.events"


def test_consistent_hash_exchange_is_left_alone(
    start_capture: Callable[..., CaptureProcess],
    pika_channel: Any,
    database_url: str,
    management: Any,
    vhost: str,
) -> None:
    channel = pika_channel
    channel.exchange_declare("work.hash", "x-consistent-hash")
    for queue in ("worker-1", "worker-2"):
        channel.queue_declare(queue)
        channel.queue_bind(queue, "work.hash", "1")
    channel.exchange_declare("audit", "fanout")
    daemon = start_capture()
    wait_for(lambda: "audit" in daemon.log() and "work.hash" in daemon.log(), 10, what="discovery")
    for index in range(200):
        properties = pika.BasicProperties(message_id=f"job-{index}")
        channel.basic_publish("work.hash", str(index), b"job", properties)
    channel.basic_publish("audit", "", b"audit", pika.BasicProperties(message_id="audit"))
    wait_for(lambda: archived_count(database_url) >= 1, 10, what="audit row")
    time.sleep(1.0)  # give any wrongly routed job time to arrive
    assert [row["message_id"] for row in archived(database_url)] == ["audit"]
    # Every job reached the real consumers' queues; none went to the archive.
    wait_for(
        lambda: (
            sum(
                management.get(f"/api/queues/{vhost}/{queue}").json().get("messages", 0)
                for queue in ("worker-1", "worker-2")
            )
            == 200
        ),
        10,
        what="200 jobs in the workers' queues",
    )
    bindings = management.get(f"/api/exchanges/{vhost}/work.hash/bindings/source").json()
    assert {binding["destination"] for binding in bindings} == {"worker-1", "worker-2"}
    assert "x-consistent-hash" in daemon.log()


def test_two_vhosts_are_captured_by_one_daemon_into_one_archive(
    start_capture: Callable[..., CaptureProcess],
    pika_channel: Any,
    database_url: str,
    management: Any,
    vhost: str,
    services: Any,
) -> None:
    other = f"{vhost}-other"
    management.put(f"/api/vhosts/{other}").raise_for_status()
    management.put(
        f"/api/permissions/{other}/guest", json={"configure": ".*", "write": ".*", "read": ".*"}
    ).raise_for_status()
    try:
        connection = pika.BlockingConnection(
            pika.ConnectionParameters(
                host=services.amqp_host,
                port=services.amqp_port,
                virtual_host=other,
                credentials=pika.PlainCredentials("guest", "guest"),
            )
        )
        other_channel = connection.channel()
        for channel in (pika_channel, other_channel):
            channel.exchange_declare("events", "fanout")
        daemon = start_capture(vhosts=f"{vhost},{other}")
        daemon.wait_bound("events", vhosts=2)
        pika_channel.basic_publish("events", "", b"1", pika.BasicProperties(message_id="first"))
        other_channel.basic_publish("events", "", b"2", pika.BasicProperties(message_id="second"))
        connection.close()
        wait_for(lambda: archived_count(database_url) >= 2, 10, what="2 rows")
        assert {(row["message_id"], row["vhost"]) for row in archived(database_url)} == {
            ("first", vhost),
            ("second", other),
        }
    finally:
        management.delete(f"/api/vhosts/{other}")


def test_with_the_event_plugin_a_new_exchange_is_bound_within_a_second(
    start_capture: Callable[..., CaptureProcess], pika_channel: Any, database_url: str
) -> None:
    # The periodic re-read is a minute away: only the broker's exchange.created event can be this quick.
    daemon = start_capture(discovery_interval="60")
    wait_for(lambda: "watching_topology_events" in daemon.log(), 15, what="the event watcher")
    pika_channel.exchange_declare("born-late", "topic", durable=True)
    declared = time.monotonic()
    daemon.wait_bound("born-late", timeout=5)
    assert time.monotonic() - declared < 1.0
    pika_channel.basic_publish("born-late", "a.b", b"captured", pika.BasicProperties(message_id="late-1"))
    wait_for(
        lambda: run_sql(database_url, "SELECT count(*) FROM rabbit_archive.messages")[0][0] == 1,
        10,
        what="the message on the new exchange captured",
    )


def test_a_burst_of_binding_changes_is_coalesced_into_a_few_discovery_rounds(
    start_capture: Callable[..., CaptureProcess],
    pika_channel: Any,
    database_url: str,
    management: httpx.Client,
    vhost: str,
) -> None:
    """An application that binds and unbinds all the time must not keep the daemon re-reading."""
    daemon = start_capture(discovery_interval="60")
    wait_for(lambda: "watching_topology_events" in daemon.log(), 15, what="the event watcher")
    pika_channel.exchange_declare("churn", "direct")
    pika_channel.queue_declare("churn-consumer")
    # A direct exchange nobody binds yet has nothing to mirror; let the round for it pass.
    time.sleep(1)

    def _plain(name: str) -> float:
        for line in daemon.metrics().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return 0.0

    rounds_before = daemon.metric_total("rabbit_archive_discovery_rounds_total")
    requests_before = _plain("rabbit_archive_management_requests_total")
    started = time.monotonic()
    for n in range(500):
        pika_channel.queue_bind("churn-consumer", "churn", f"key.{n}")
        pika_channel.queue_unbind("churn-consumer", "churn", f"key.{n}")
    pika_channel.queue_bind("churn-consumer", "churn", "kept")
    burst = time.monotonic() - started
    # The last change is picked up: the archive mirrors the one key that stayed.
    archive_bindings = f"/api/queues/{quote(vhost, safe='')}/rabbit-archive/bindings"
    wait_for(
        lambda: (
            [
                item["routing_key"]
                for item in management.get(archive_bindings).json()
                if item["source"] == "churn"
            ]
            == ["kept"]
        ),
        15,
        what="the archive mirroring only the key that stayed",
    )
    window = time.monotonic() - started
    pika_channel.basic_publish("churn", "kept", b"after the burst")
    wait_for(
        lambda: (
            run_sql(
                database_url, "SELECT count(*) FROM rabbit_archive.messages WHERE exchange = $1", "churn"
            )[0][0]
            == 1
        ),
        15,
        what="the message after the burst captured",
    )
    rounds = daemon.metric_total("rabbit_archive_discovery_rounds_total") - rounds_before
    requests = _plain("rabbit_archive_management_requests_total") - requests_before
    print(
        f"1,000 binding changes in {burst:.1f} s: {rounds:.0f} discovery rounds, {requests:.0f} management "
        f"API requests in {window:.1f} s ({requests / window:.1f} per second)"
    )
    # At most one round per NUDGE_MIN_INTERVAL (0.5 s) while events keep coming, plus the last.
    assert rounds <= window / 0.5 + 2
    assert requests <= 4 * rounds + 4
