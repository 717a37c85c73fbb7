"""On real clusters (scripts/cluster: three RabbitMQ nodes, a PostgreSQL primary with a synchronous
standby): losing a node under load loses nothing and doubles nothing."""

import asyncio
import json
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any
from urllib.parse import quote

import asyncpg
import httpx
import pika
import pytest

from tests.acceptance.test_cli import capture_command
from tests.acceptance.test_replay_resume import start_replay
from tests.conftest import run_sql
from tests.support.clusters import Clusters, clusters_fixture  # noqa: F401  (the `clusters` fixture)
from tests.support.daemon import CaptureProcess, wait_for
from tests.support.load import BackgroundPublisher, queue_depth
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
    return [(at, entry["node"]) for at, entry in events(daemon, "consuming")]


def events(daemon: CaptureProcess, name: str) -> list[tuple[datetime, dict[str, Any]]]:
    """(time, entry) of each line of the daemon's JSON log with that event name."""
    found = []
    for line in daemon.log().splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("event") == name:
                found.append((datetime.fromisoformat(entry["time"]), entry))
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
        # The daemon's part starts when its connection goes: before that the node is still
        # shutting down (seconds on a loaded machine), and it still delivers.
        lost_at = events(daemon, "broker_session_lost")[-1][0]
        resumed_after = (resumed_at - lost_at).total_seconds()
        print(
            f"capture resumed on {node} {resumed_after:.1f} s after its connection to ra1 was lost "
            f"({(resumed_at - stopped_at).total_seconds():.1f} s after 'stop-node ra1' began)"
        )
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


# The replay's confirm window (replay.runner.WINDOW): the most a lost node can leave unanswered.
REPLAY_WINDOW = 500


class LogLines:
    """The JSON log lines a subprocess writes to stderr, read as they come, with the others kept."""

    def __init__(self, process: "subprocess.Popen[str]") -> None:
        self.events: list[dict[str, Any]] = []
        self.text: list[str] = []
        assert process.stderr is not None
        self._thread = threading.Thread(target=self._read, args=(process.stderr,), daemon=True)
        self._thread.start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            self.text.append(line)
            if line.startswith("{"):
                self.events.append(json.loads(line))

    def named(self, event: str) -> list[dict[str, Any]]:
        return [entry for entry in list(self.events) if entry.get("event") == event]

    def join(self) -> str:
        self._thread.join(10)
        return "".join(self.text)


def received(url: str, queue: str) -> list[dict[str, Any]]:
    """The headers of every message in the queue."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        waiting = channel.queue_declare(queue, passive=True).method.message_count
        headers: list[dict[str, Any]] = []
        for method, properties, _body in channel.consume(queue, auto_ack=True, inactivity_timeout=5):
            if method is None:
                break
            headers.append(properties.headers)
            if len(headers) >= waiting:
                break
        channel.cancel()
        return headers
    finally:
        connection.close()


def test_a_replay_whose_node_is_stopped_midway_completes_on_another_node(
    clusters: Clusters, cluster_vhost: str, database_url: str
) -> None:
    total = 50_000
    vhost = quote(cluster_vhost, safe="")
    management = ",".join(url.rstrip("/").removeprefix("http://") for url in clusters.management_urls)
    env = {
        "RABBIT_ARCHIVE_AMQP_URL": clusters.amqp_url.rstrip("/") + "/" + vhost,
        "RABBIT_ARCHIVE_MANAGEMENT_URL": f"http://{management}",
        "RABBIT_ARCHIVE_DATABASE_URL": database_url,
        "RABBIT_ARCHIVE_LOG_FORMAT": "json",
    }
    migrated = capture_command(env, "migrate")
    assert migrated.returncode == 0, migrated.stderr
    run_sql(
        database_url,
        """INSERT INTO rabbit_archive.messages
               (vhost, exchange, routing_key, redelivered, properties_raw, properties, body, body_size)
           SELECT $1, 'orders', 'order.' || i, false, '\\x0000', '{}', convert_to('order ' || i, 'UTF8'),
                  length('order ' || i)
           FROM generate_series(1, $2::int) AS i""",
        cluster_vhost,
        total,
    )
    stored = {row[0] for row in run_sql(database_url, "SELECT id FROM rabbit_archive.messages")}
    assert len(stored) == total
    # A quorum queue led by ra3: whichever node the replay is connected to, the queue keeps working.
    target_url = clusters.amqp_url_of("ra3").rstrip("/") + "/" + vhost
    connection = pika.BlockingConnection(pika.URLParameters(target_url))
    connection.channel().queue_declare("target", durable=True, arguments={"x-queue-type": "quorum"})
    connection.close()

    started = time.monotonic()
    process = start_replay(
        env, "run", "--exchange", "orders", "--to-queue", "target", "--rate", "2500", "--yes"
    )
    log = LogLines(process)
    stopped_node = ""
    try:
        wait_for(lambda: log.named("replay.connected"), 30, what="the replay to connect")
        first_node = log.named("replay.connected")[0]["node"]
        stopped_node = clusters.node_at(first_node)

        def confirmed() -> int:
            rows = run_sql(database_url, "SELECT confirmed FROM rabbit_archive.replays")
            return int(rows[0][0]) if rows else 0

        wait_for(lambda: confirmed() >= total * 2 // 5, 60, interval=0.05, what="replay under way")
        stopped_at = datetime.now().astimezone()
        confirmed_at_stop = confirmed()
        clusters.stop_node(stopped_node)
        process.wait(120)
    finally:
        if process.poll() is None:
            process.kill()
        if stopped_node:
            clusters.start_node(stopped_node)
    assert process.stdout is not None
    assert process.stderr is not None
    stdout = process.stdout.read()
    stderr = log.join()
    process.stdout.close()
    process.stderr.close()
    took = time.monotonic() - started
    assert process.returncode == 0, stderr + stdout
    assert "Traceback" not in stderr
    replay_id = stdout.splitlines()[0]
    history = "SELECT status, selected, published, confirmed FROM rabbit_archive.replays"
    row = run_sql(database_url, history)[0]
    assert (row["status"], row["selected"], row["confirmed"]) == ("completed", total, total)

    lost = log.named("replay.broker_lost")
    moved = log.named("replay.failed_over")
    assert len(lost) == len(moved) == 1, stderr
    assert lost[0]["node"] == first_node
    assert moved[0]["node"] != first_node
    resent = moved[0]["resent"]
    assert row["published"] == total + resent

    delivered = received(target_url, "target")
    ids = Counter(headers["x-replay-archive-id"] for headers in delivered)
    assert set(ids) == stored  # every archive id at least once
    assert {headers["x-replay-id"] for headers in delivered} == {replay_id}
    copies: dict[int, list[dict[str, Any]]] = {}
    for headers in delivered:
        if ids[headers["x-replay-archive-id"]] > 1:
            copies.setdefault(headers["x-replay-archive-id"], []).append(headers)
    for archive_id, both in copies.items():
        assert len(both) == 2
        # The same message sent again: the same replay id and archive id (and the same x-replayed-at).
        assert both[0] == both[1], archive_id
        assert (both[0]["x-replay-id"], both[0]["x-replay-archive-id"]) == (replay_id, archive_id)
    assert len(copies) <= resent <= REPLAY_WINDOW

    resumed_after = (datetime.fromisoformat(moved[0]["time"]) - stopped_at).total_seconds()
    print(
        f"replay of {total}: {stopped_node} stopped after {confirmed_at_stop} confirmed; lost the "
        f"connection {(datetime.fromisoformat(lost[0]['time']) - stopped_at).total_seconds():.2f} s after "
        f"the stop command, publishing again on {moved[0]['node']} {moved[0]['seconds']:.3f} s after "
        f"the loss ({resumed_after:.2f} s after the stop command); {resent} sent again, "
        f"{len(copies)} delivered twice; whole test {took:.1f} s"
    )


def stored_ids(database_url: str) -> tuple[int, int]:
    """(rows, distinct message ids) in the archive."""
    counts = "SELECT count(*) AS total, count(DISTINCT message_id) AS ids FROM rabbit_archive.messages"
    row = run_sql(database_url, counts)[0]
    return int(row["total"]), int(row["ids"])


def rows(database_url: str) -> int:
    """Rows in the archive (0 before the daemon created it)."""
    try:
        return int(run_sql(database_url, "SELECT count(*) FROM rabbit_archive.messages")[0][0])
    except (asyncpg.InvalidCatalogNameError, asyncpg.UndefinedTableError):
        return 0


def drain_rate(
    start_capture: Callable[..., CaptureProcess], database_url: str, amqp_url: str, first: int, count: int
) -> float:
    """Messages per second a daemon stores while it drains `count` messages published beforehand
    (m-first and on) into a fresh database.

    From the batches' capture times (each batch's transaction start): the batches before the last
    were stored between the first batch's start and the last one's, commits included. Polling the
    row count instead would take CPU from the daemon on this two-core machine.
    """
    BackgroundPublisher(amqp_url, "orders", first + count, first=first).start().join(timeout=120)
    daemon = start_capture(database_url=database_url)
    wait_for(lambda: rows(database_url) >= count, 120, interval=0.5, what="the drain")
    assert daemon.stop() == 0
    batches = run_sql(
        database_url,
        "SELECT extract(epoch FROM captured_at)::float8 AS at, count(*) AS n FROM rabbit_archive.messages"
        " GROUP BY captured_at ORDER BY captured_at",
    )
    assert sum(batch["n"] for batch in batches) == count
    stored = sum(batch["n"] for batch in batches[:-1])
    return float(stored / (batches[-1]["at"] - batches[0]["at"]))


async def _sample_replication(primary_url: str, archive_url: str, seconds: float) -> dict[str, float]:
    """How far the standby trails the primary while the daemon writes, sampled every 5 ms over one
    connection: WAL bytes the standby has not flushed yet, and the archive's WAL bytes per message."""
    primary = await asyncpg.connect(primary_url)
    archive = await asyncpg.connect(archive_url)
    try:
        count = "SELECT count(*) FROM rabbit_archive.messages"
        start_lsn, start_rows = (
            await primary.fetchval("SELECT pg_current_wal_lsn()"),
            await archive.fetchval(count),
        )
        behind: list[int] = []
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            behind.append(
                await primary.fetchval(
                    "SELECT coalesce(max(pg_wal_lsn_diff(pg_current_wal_lsn(), flush_lsn)), 0)::bigint"
                    " FROM pg_stat_replication"
                )
            )
            await asyncio.sleep(0.005)
        wal = await primary.fetchval("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1)::bigint", start_lsn)
        written = await archive.fetchval(count) - start_rows
    finally:
        await primary.close()
        await archive.close()
    per_message = wal / max(written, 1)
    return {
        "max_bytes": max(behind),
        "mean_bytes": sum(behind) / len(behind),
        "wal_per_message": per_message,
        "max_messages": max(behind) / per_message,
        "mean_messages": sum(behind) / len(behind) / per_message,
        "behind_share": sum(1 for value in behind if value) / len(behind),
    }


async def _commit_ms(database_url: str, commits: int = 40) -> float:
    """Median milliseconds a COMMIT of 200 rows of ~1.2 kB takes (a batch at 1,000 msg/s)."""
    connection = await asyncpg.connect(database_url)
    try:
        await connection.execute("CREATE TABLE IF NOT EXISTS commit_probe (body bytea)")
        times = []
        for _ in range(commits):
            await connection.execute("BEGIN")
            await connection.execute(
                "INSERT INTO commit_probe"
                " SELECT convert_to(repeat('x', 1200), 'UTF8') FROM generate_series(1, 200)"
            )
            began = time.perf_counter()
            await connection.execute("COMMIT")
            times.append(time.perf_counter() - began)
        await connection.execute("DROP TABLE commit_probe")
    finally:
        await connection.close()
    return sorted(times)[len(times) // 2] * 1000


def test_asynchronous_replication_measured_what_a_failover_loses_and_what_sync_costs(
    clusters: Clusters,
    start_capture: Callable[..., CaptureProcess],
    services: Services,
    vhost: str,
    amqp_url: str,
    pika_channel: Any,
) -> None:
    """Measured and printed, not asserted (README "Clusters" has the numbers): with asynchronous
    replication, how many messages the daemon acknowledged are missing after the primary crashes
    under 1,000 msg/s and the standby is promoted, and how many were at risk (committed and
    acknowledged, not yet on the standby) while it ran; and capture's drain rate with synchronous vs
    asynchronous replication in the same run, alternated. Asserted: nothing is stored twice."""
    backlog, rounds = 20_000, 2
    # One database to bind the archive queue, one per drain, one for the crash.
    names = [f"archive_{uuid.uuid4().hex[:10]}" for _ in range(2 * rounds + 2)]
    pika_channel.exchange_declare("orders", "topic", durable=True)
    host, port = services.amqp_host, services.amqp_port
    try:
        daemon = start_capture(database_url=clusters.database_url_for(names[0]))
        daemon.wait_bound("orders")
        assert daemon.stop() == 0  # the archive queue is bound: it keeps what comes next
        rates: dict[str, list[float]] = {"sync": [], "async": []}
        commits: dict[str, list[float]] = {"sync": [], "async": []}
        probe_url = clusters.primary_url.replace("/postgres", f"/{names[0]}")
        first = 0
        for index in range(2 * rounds):
            mode = ("sync", "async")[index % 2]
            clusters.set_replication(mode)
            url = clusters.database_url_for(names[1 + index])
            rates[mode].append(drain_rate(start_capture, url, amqp_url, first, backlog))
            commits[mode].append(asyncio.run(_commit_ms(probe_url)))
            first += backlog

        # Asynchronous, under 1,000 msg/s: the primary crashes, the standby is promoted.
        name, load = names[-1], 15_000
        archive_url = clusters.database_url_for(name)
        daemon = start_capture(database_url=archive_url)
        publisher = BackgroundPublisher(amqp_url, "orders", first + load, first=first, rate=1_000).start()
        wait_for(lambda: rows(archive_url) > 500, 30, what="capture under way")
        window = asyncio.run(
            _sample_replication(
                clusters.primary_url, clusters.primary_url.replace("/postgres", f"/{name}"), 5
            )
        )
        clusters.stop_primary(immediate=True)  # a crash: the standby has what was streamed so far
        clusters.promote_standby()
        published = publisher.join(timeout=120) - first
        assert published == load

        new_primary = clusters.standby_url.replace("/postgres", f"/{name}")
        seen = [-1]

        def drained() -> bool:
            now = rows(new_primary)
            done = now == seen[0] and queue_depth(host, port, vhost, "rabbit-archive") == 0
            seen[0] = now
            return done

        wait_for(drained, 90, interval=2, what="the archive queue drained into the new primary")
        total, ids = stored_ids(new_primary)
        missing = published - ids
        assert total == ids  # nothing stored twice, even across the failover
        assert daemon.stop() == 0
    finally:
        clusters.restore()
    sync_rate, async_rate = (sum(rates[mode]) / rounds for mode in ("sync", "async"))
    print(
        f"capture drains of {backlog} into a fresh database, alternated: synchronous replication "
        f"{', '.join(f'{rate:,.0f}' for rate in rates['sync'])} msg/s, asynchronous "
        f"{', '.join(f'{rate:,.0f}' for rate in rates['async'])} msg/s "
        f"(sync/async {sync_rate / async_rate:.2f}); a 200-row commit takes "
        f"{', '.join(f'{ms:.1f}' for ms in commits['sync'])} ms synchronous, "
        f"{', '.join(f'{ms:.1f}' for ms in commits['async'])} ms asynchronous; "
        f"asynchronous, primary crashed under 1,000 msg/s: {missing} acknowledged messages missing after "
        f"the promotion; while it ran the standby trailed by at most {window['max_bytes']:,.0f} WAL bytes "
        f"({window['max_messages']:.0f} messages at {window['wal_per_message']:,.0f} bytes each), on "
        f"average {window['mean_messages']:.1f} messages, and was behind at all in "
        f"{window['behind_share']:.0%} of the samples"
    )
