"""One bad item stops only itself: odd management answers, refused bindings, unusable vhosts.

Each test injects the fault on the real broker (through a management API that changes some
answers, or real vhosts and bindings) and shows the daemon up, the other exchanges and vhosts
captured without a gap, and the fault reported in the log, the metrics and `status`.
"""

import json
import os
import subprocess
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import httpx
import pika
import pytest

from tests.conftest import run_sql
from tests.support.daemon import CaptureProcess, command, wait_for
from tests.support.fake_management import FakeManagement
from tests.support.services import Services

pytestmark = pytest.mark.acceptance


def metric(daemon: CaptureProcess, name: str, **labels: str) -> float:
    """One sample of a metric with exactly these labels (0 when absent)."""
    for line in daemon.metrics().splitlines():
        if not line.startswith(name + "{"):
            continue
        found = dict(part.split("=", 1) for part in line[len(name) + 1 : line.index("}")].split(","))
        if {key: value.strip('"') for key, value in found.items()} == labels:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def rows(database_url: str, exchange: str) -> int:
    query = "SELECT count(*) FROM rabbit_archive.messages WHERE exchange = $1"
    return int(run_sql(database_url, query, exchange)[0][0])


def test_odd_management_answers_and_refused_bindings_cost_only_their_exchange(
    services: Services,
    start_capture: Callable[..., CaptureProcess],
    capture_env: dict[str, str],
    pika_channel: Any,
    vhost: str,
    database_url: str,
) -> None:
    pika_channel.exchange_declare("plain", "topic")
    pika_channel.exchange_declare("ae", "fanout")
    # An alternate exchange makes the archive mirror the headers bindings others made.
    pika_channel.exchange_declare("hdr", "headers", arguments={"alternate-exchange": "ae"})
    pika_channel.exchange_declare("hdr2", "headers", arguments={"alternate-exchange": "ae"})
    pika_channel.queue_declare("hq")
    pika_channel.queue_bind("hq", "hdr", arguments={"x-match": "all", "k": "v"})

    def tamper(path: str, answer: Any) -> Any:
        if path == f"/api/exchanges/{vhost}":
            return [
                *answer,
                42,
                "text",
                None,
                {"name": 7},
                {"type": "topic"},
                {"name": "listed-but-gone", "type": "topic", "arguments": {"x-big": 2**80}},
            ]
        if path == f"/api/bindings/{vhost}":
            return [
                *answer,
                "junk",
                {
                    "source": "hdr",
                    "destination": "hq",
                    "destination_type": "queue",
                    "routing_key": "",
                    "arguments": {"x-match": "all", "big": 2**70},
                },
                {
                    "source": "hdr2",
                    "destination": "hq",
                    "destination_type": "queue",
                    "routing_key": "",
                    "arguments": {"x-match": "bogus", "k": "v"},
                },
                {"source": ["not", "a", "name"], "destination": 5},
            ]
        if path == f"/api/policies/{vhost}":
            return [{"name": 5}, "x", {"name": "p", "definition": [1, 2]}]
        if path == f"/api/queues/{vhost}/rabbit-archive":
            return "not an object"
        return answer

    with FakeManagement(services.management_url, tamper) as fake:
        daemon = start_capture(management_url=fake.url)
        daemon.wait_bound("plain")
        for n in range(200):
            pika_channel.basic_publish("plain", f"k.{n}", b"p")
        pika_channel.basic_publish("hdr", "", b"h", pika.BasicProperties(headers={"k": "v"}))
        wait_for(lambda: rows(database_url, "plain") == 200, 20, what="200 messages of 'plain'")
        wait_for(lambda: rows(database_url, "hdr") == 1, 20, what="the message of 'hdr'")
        wait_for(
            lambda: metric(daemon, "rabbit_archive_unbound_exchanges", state="failed", vhost=vhost) == 1,
            10,
            what="hdr2 counted as failed",
        )
        assert metric(daemon, "rabbit_archive_unbound_exchanges", state="unrepresentable", vhost=vhost) == 1
        rounds = metric(daemon, "rabbit_archive_discovery_rounds_total", vhost=vhost)
        wait_for(
            lambda: metric(daemon, "rabbit_archive_discovery_rounds_total", vhost=vhost) >= rounds + 3,
            15,
            what="three more discovery rounds",
        )
        assert daemon.process is not None
        assert daemon.process.poll() is None, daemon.log()
        log = [json.loads(line) for line in daemon.log().splitlines() if line.startswith("{")]
        events = [(entry.get("event"), entry.get("exchange")) for entry in log]
        # Reported once each, not every round; the mirrored binding never flaps.
        assert events.count(("binding_unrepresentable", "hdr")) == 1
        assert events.count(("binding_failed", "hdr2")) == 1
        assert ("unbound", "hdr") not in events
        assert events.count(("bound", "hdr")) == 1

        clean = {k: v for k, v in os.environ.items() if not k.startswith("RABBIT_ARCHIVE_")}
        status = subprocess.run(
            [command("rabbit-capture"), "status", "--json"],
            env={**clean, **capture_env, "RABBIT_ARCHIVE_MANAGEMENT_URL": fake.url},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert status.returncode == 0, status.stderr
    states = {item["exchange"]: item for item in json.loads(status.stdout)["exchange_states"]}
    assert states["plain"]["state"] == "bound"
    assert states["hdr"]["state"] == "unrepresentable"
    assert "64-bit" in states["hdr"]["reason"]
    assert states["hdr2"]["state"] == "failed"
    assert "x-match" in states["hdr2"]["reason"]


def test_a_vhost_that_cannot_be_captured_is_reported_and_retried_while_others_are_captured(
    services: Services,
    start_capture: Callable[..., CaptureProcess],
    management: httpx.Client,
    pika_channel: Any,
    vhost: str,
    database_url: str,
) -> None:
    no_rights = f"test-norights-{uuid.uuid4().hex[:8]}"
    ghost = f"test-ghost-{uuid.uuid4().hex[:8]}"
    management.put(f"/api/vhosts/{quote(no_rights, safe='')}").raise_for_status()
    # The management API gives its creator permissions in a new vhost: take them away.
    management.delete(f"/api/permissions/{quote(no_rights, safe='')}/guest").raise_for_status()

    def tamper(path: str, answer: Any) -> Any:
        # Only the test's vhosts (never the machine's others), one listed but deleted since.
        if path == "/api/vhosts":
            return [{"name": vhost}, {"name": no_rights}, {"name": ghost}, "junk", {"tracing": False}]
        return answer

    try:
        with FakeManagement(services.management_url, tamper) as fake:
            daemon = start_capture(wait=False, management_url=fake.url, vhosts="*")
            pika_channel.exchange_declare("plain", "topic")
            daemon.wait_bound("plain")
            for n in range(100):
                pika_channel.basic_publish("plain", f"k.{n}", b"p")
            wait_for(lambda: rows(database_url, "plain") == 100, 20, what="100 messages of 'plain'")
            wait_for(
                lambda: (
                    metric(daemon, "rabbit_archive_vhost_unavailable", vhost=no_rights) == 1
                    and metric(daemon, "rabbit_archive_vhost_unavailable", vhost=ghost) == 1
                ),
                20,
                what="both unusable vhosts reported",
            )
            assert daemon.process is not None
            assert daemon.process.poll() is None, daemon.log()
            assert not daemon.ready()  # readiness says a vhost is not captured

            # Rights granted: the next attempt captures that vhost too, without a restart.
            management.put(
                f"/api/permissions/{quote(no_rights, safe='')}/guest",
                json={"configure": ".*", "write": ".*", "read": ".*"},
            ).raise_for_status()
            wait_for(
                lambda: metric(daemon, "rabbit_archive_consuming", vhost=no_rights) == 1,
                40,
                what=f"capture of {no_rights} once permitted",
            )
            assert metric(daemon, "rabbit_archive_vhost_unavailable", vhost=ghost) == 1
            assert daemon.process.poll() is None, daemon.log()
    finally:
        management.delete(f"/api/vhosts/{quote(no_rights, safe='')}")
