"""Several broker addresses in AMQP_URL: the first that answers is used, the next at once when it
goes away. Two TCP proxies in front of the one local broker stand for two nodes here; the
three-node cluster tests are in tests/acceptance/test_clusters.py."""

import json
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import pytest

from tests.conftest import run_sql
from tests.support.daemon import CaptureProcess, wait_for
from tests.support.load import BackgroundPublisher
from tests.support.proxy import TcpProxy
from tests.support.services import Services

pytestmark = pytest.mark.acceptance


def consuming_nodes(daemon: CaptureProcess) -> list[tuple[float, str]]:
    """(time logged, node) of every 'consuming' line of the daemon's JSON log."""
    found = []
    for line in daemon.log().splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("event") == "consuming":
                found.append((entry["time"], entry["node"]))
    return found


def test_the_daemon_uses_the_first_node_that_answers_and_the_next_at_once(
    services: Services,
    start_capture: Callable[..., CaptureProcess],
    pika_channel: Any,
    amqp_url: str,
    vhost: str,
    database_url: str,
) -> None:
    pika_channel.exchange_declare("orders", "topic")
    with (
        TcpProxy(services.amqp_host, services.amqp_port) as first,
        TcpProxy(services.amqp_host, services.amqp_port) as second,
    ):
        # A dead address first: it is skipped at once.
        hosts = f"127.0.0.1:1,127.0.0.1:{first.port},127.0.0.1:{second.port}"
        cluster_url = f"amqp://guest:guest@{hosts}/{quote(vhost, safe='')}"
        daemon = start_capture(amqp_url=cluster_url)
        daemon.wait_bound("orders")
        assert consuming_nodes(daemon)[-1][1] == f"127.0.0.1:{first.port}"
        publisher = BackgroundPublisher(amqp_url, "orders", 6_000, rate=1_000).start()
        time.sleep(2)
        first.block()  # the node goes away and refuses new connections
        lost = time.monotonic()
        wait_for(
            lambda: consuming_nodes(daemon)[-1][1] == f"127.0.0.1:{second.port}",
            10,
            what="capture resumed on the second node",
        )
        resumed_after = time.monotonic() - lost
        published = publisher.join()
        wait_for(
            lambda: run_sql(database_url, "SELECT count(*) FROM rabbit_archive.messages")[0][0] >= published,
            30,
            what=f"{published} messages stored",
        )
        time.sleep(0.5)
        rows = run_sql(
            database_url,
            "SELECT count(*) AS total, count(DISTINCT message_id) AS distinct_ids"
            " FROM rabbit_archive.messages",
        )[0]
        assert rows["total"] == rows["distinct_ids"] == published
        print(f"capture resumed on the next node {resumed_after:.2f} s after the first went away")
        assert resumed_after < 5
        assert daemon.process is not None
        assert daemon.process.poll() is None
