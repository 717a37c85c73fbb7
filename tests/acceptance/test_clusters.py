"""On real clusters (scripts/cluster: three RabbitMQ nodes, a PostgreSQL primary with a synchronous
standby): losing a node under load loses nothing and doubles nothing."""

import json
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any
from urllib.parse import quote

import httpx
import pika
import pytest

from tests.conftest import run_sql
from tests.support.clusters import Clusters, clusters_fixture  # noqa: F401  (the `clusters` fixture)
from tests.support.daemon import CaptureProcess, wait_for
from tests.support.load import BackgroundPublisher
from tests.support.services import Services

pytestmark = pytest.mark.acceptance


@pytest.fixture
def cluster_vhost(clusters: Clusters) -> Iterator[str]:
    """A fresh vhost on the RabbitMQ cluster, deleted afterwards."""
    name = f"test-{uuid.uuid4().hex[:10]}"
    encoded = quote(name, safe="")
    with httpx.Client(base_url=clusters.management_urls[2], auth=("guest", "guest"), timeout=10) as client:
        client.put(f"/api/vhosts/{encoded}").raise_for_status()
        client.put(
            f"/api/permissions/{encoded}/guest", json={"configure": ".*", "write": ".*", "read": ".*"}
        ).raise_for_status()
        try:
            yield name
        finally:
            client.delete(f"/api/vhosts/{encoded}")


def consuming(daemon: CaptureProcess) -> list[tuple[datetime, str]]:
    """(time, node) of each 'consuming' line of the daemon's JSON log."""
    found = []
    for line in daemon.log().splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("event") == "consuming":
                found.append((datetime.fromisoformat(entry["time"]), entry["node"]))
    return found


def stored_once(database_url: str, published: int) -> None:
    wait_for(
        lambda: run_sql(database_url, "SELECT count(*) FROM rabbit_archive.messages")[0][0] >= published,
        60,
        what=f"{published} messages stored",
    )
    time.sleep(1)
    row = run_sql(
        database_url,
        "SELECT count(*) AS total, count(DISTINCT message_id) AS ids FROM rabbit_archive.messages",
    )[0]
    assert (row["total"], row["ids"]) == (published, published)


def test_losing_the_daemons_node_and_the_queue_leader_under_load_loses_nothing(
    clusters: Clusters,
    cluster_vhost: str,
    start_capture: Callable[..., CaptureProcess],
    database_url: str,
) -> None:
    vhost = quote(cluster_vhost, safe="")
    management = ",".join(url.rstrip("/").removeprefix("http://") for url in clusters.management_urls)
    daemon = start_capture(
        amqp_url=clusters.amqp_url.rstrip("/") + "/" + vhost,
        management_url=f"http://{management}",
    )
    with httpx.Client(base_url=clusters.management_urls[1], auth=("guest", "guest"), timeout=10) as client:
        queue = client.get(f"/api/queues/{vhost}/rabbit-archive").json()
    # Without x-quorum-initial-group-size the queue has a replica on every node of the cluster.
    assert sorted(queue["members"]) == sorted(clusters.nodes)
    assert queue["leader"] == clusters.nodes[0]
    first_node = consuming(daemon)[-1][1]
    assert first_node == "127.0.0.1:5681"  # ra1: it declared the archive queue, so it leads it
    publish_url = clusters.amqp_url_of("ra3").rstrip("/") + "/" + vhost
    connection = pika.BlockingConnection(pika.URLParameters(publish_url))
    connection.channel().exchange_declare("orders", "topic", durable=True)
    connection.close()
    daemon.wait_bound("orders")
    publisher = BackgroundPublisher(publish_url, "orders", 30_000, rate=1_000).start()
    try:
        time.sleep(8)
        stopped_at = datetime.now().astimezone()
        clusters.stop_node("ra1")
        wait_for(
            lambda: consuming(daemon)[-1][1] != first_node,
            30,
            what="capture resumed on another node",
        )
        resumed_at, node = consuming(daemon)[-1]
        resumed_after = (resumed_at - stopped_at).total_seconds()
        print(f"capture resumed on {node} {resumed_after:.1f} s after ra1 was stopped")
        time.sleep(5)
    finally:
        clusters.start_node("ra1")
    published = publisher.join(timeout=120)
    stored_once(database_url, published)
    assert daemon.process is not None
    assert daemon.process.poll() is None
    assert resumed_after < 5


def test_a_postgresql_failover_to_a_synchronous_standby_loses_nothing_acknowledged(
    clusters: Clusters,
    services: Services,
    start_capture: Callable[..., CaptureProcess],
    amqp_url: str,
    pika_channel: Any,
) -> None:
    name = f"archive_{uuid.uuid4().hex[:10]}"
    failover_url = clusters.database_url_for(name)
    pika_channel.exchange_declare("orders", "topic", durable=True)
    daemon = start_capture(database_url=failover_url)
    daemon.wait_bound("orders")
    publisher = BackgroundPublisher(amqp_url, "orders", 20_000, rate=1_000).start()
    try:
        time.sleep(6)
        clusters.stop_primary(immediate=True)  # a crash: no shutdown checkpoint
        clusters.promote_standby()
        published = publisher.join(timeout=120)
        stored_once(clusters.standby_url.replace("/postgres", f"/{name}"), published)
        assert daemon.process is not None
        assert daemon.process.poll() is None
        assert daemon.stop() == 0
    finally:
        clusters.restore()
