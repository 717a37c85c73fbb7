"""The three-node RabbitMQ cluster and the PostgreSQL primary with its synchronous standby that
`scripts/cluster` runs beside the default services, for cluster and failover tests.

A test asks for the session fixture `clusters` (import `clusters_fixture` into the test module or
a conftest to make it available). The first such test starts everything once; the session stops
it again at the end, unless it was already running when the session began (then it is left as
found). Tests that break something (a stopped node, a promoted standby) call `Clusters.restore()`.
"""

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "cluster"
HOST = "localhost"
NODES = ("ra1", "ra2", "ra3")
AMQP_PORTS = (5681, 5682, 5683)
MANAGEMENT_PORTS = (15681, 15682, 15683)
PRIMARY_PORT = 5441
STANDBY_PORT = 5442
START_TIMEOUT = 180


def _run(*args: str, timeout: float = 120) -> str:
    """Run scripts/cluster with arguments; its output, or a failure that shows the output."""
    result = subprocess.run(
        [str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if result.returncode != 0:
        pytest.fail(
            f"scripts/cluster {' '.join(args)} exited {result.returncode}:\n{result.stdout}{result.stderr}"
        )
    return result.stdout


def node_name(node: str) -> str:
    """Full Erlang node name of ra1, ra2 or ra3 (a full name passes through)."""
    short = node.split("@", 1)[0]
    if short not in NODES:
        raise ValueError(f"unknown node {node!r}")
    return f"{short}@{HOST}"


def state_dir() -> Path:
    """Where scripts/cluster keeps data, logs and sockets."""
    return Path(os.environ.get("RABBIT_ARCHIVE_CLUSTER_DIR", "/tmp/rabbit-archive-cluster"))


def is_running() -> bool:
    """True when all three nodes and both PostgreSQL servers run (`scripts/cluster status`)."""
    result = subprocess.run([str(SCRIPT), "status"], capture_output=True, timeout=60, check=False)
    return result.returncode == 0


def start() -> "Clusters":
    """Start whatever is down (idempotent; rebuilds PostgreSQL after a promotion)."""
    _run("start", timeout=START_TIMEOUT)
    return Clusters()


def stop() -> None:
    """Stop the three nodes and both PostgreSQL servers (never the default services)."""
    _run("stop")


def stop_node(node: str, *, app_only: bool = False) -> None:
    """Stop a whole node (its Erlang VM exits), or with app_only just its RabbitMQ application."""
    _run("stop-node", node.split("@", 1)[0], *(["--app"] if app_only else []))


def start_node(node: str) -> None:
    """Start a stopped node (or its application) again and wait until it has booted."""
    _run("start-node", node.split("@", 1)[0])


def stop_primary(*, immediate: bool = False) -> None:
    """Stop the PostgreSQL primary (fast shutdown, or immediate: like a crash)."""
    _run("pg-stop-primary", *(["--immediate"] if immediate else []))


def promote_standby() -> None:
    """Promote the standby on 5442; it then accepts writes without a standby of its own."""
    _run("pg-promote")


def set_replication(mode: str) -> None:
    """'sync': commits on the primary wait for the standby (as started); 'async': they do not.
    `start()` (and so `Clusters.restore()`) makes it synchronous again."""
    _run("pg-replication", mode)


def reset_postgres() -> None:
    """Throw both PostgreSQL servers away and build a fresh primary and synchronous standby."""
    _run("pg-reset", timeout=START_TIMEOUT)


@dataclass(frozen=True)
class Clusters:
    """Addresses of the cluster's nodes and PostgreSQL servers, and the failover controls."""

    nodes: tuple[str, ...] = tuple(node_name(node) for node in NODES)
    amqp_urls: tuple[str, ...] = tuple(f"amqp://guest:guest@127.0.0.1:{port}/" for port in AMQP_PORTS)
    management_urls: tuple[str, ...] = tuple(f"http://127.0.0.1:{port}/" for port in MANAGEMENT_PORTS)
    # Every node in one URL, as the capture daemon accepts it.
    amqp_url: str = "amqp://guest:guest@" + ",".join(f"127.0.0.1:{port}" for port in AMQP_PORTS) + "/"
    primary_url: str = f"postgresql://root@127.0.0.1:{PRIMARY_PORT}/postgres"
    standby_url: str = f"postgresql://root@127.0.0.1:{STANDBY_PORT}/postgres"
    # Both servers; libpq and asyncpg pick whichever accepts writes.
    database_url: str = (
        f"postgresql://root@127.0.0.1:{PRIMARY_PORT},127.0.0.1:{STANDBY_PORT}/postgres"
        "?target_session_attrs=read-write"
    )

    def database_url_for(self, name: str) -> str:
        """The failover URL of another database on the pair."""
        return self.database_url.replace("/postgres?", f"/{name}?", 1)

    def amqp_url_of(self, node: str) -> str:
        """AMQP URL of one node (ra1, ra2, ra3 or a full node name)."""
        return self.amqp_urls[NODES.index(node_name(node).split("@", 1)[0])]

    def node_at(self, address: str) -> str:
        """The node (ra1, ra2 or ra3) that listens at an AMQP `host:port`, as logs name it."""
        return NODES[AMQP_PORTS.index(int(address.rsplit(":", 1)[1]))]

    def management_url_of(self, node: str) -> str:
        """Management API base URL of one node."""
        return self.management_urls[NODES.index(node_name(node).split("@", 1)[0])]

    def stop_node(self, node: str, *, app_only: bool = False) -> None:
        """See stop_node()."""
        stop_node(node, app_only=app_only)

    def start_node(self, node: str) -> None:
        """See start_node()."""
        start_node(node)

    def stop_primary(self, *, immediate: bool = False) -> None:
        """See stop_primary()."""
        stop_primary(immediate=immediate)

    def promote_standby(self) -> None:
        """See promote_standby()."""
        promote_standby()

    def set_replication(self, mode: str) -> None:
        """See set_replication()."""
        set_replication(mode)

    def reset_postgres(self) -> None:
        """See reset_postgres()."""
        reset_postgres()

    def restore(self) -> None:
        """Bring everything back to three running nodes and a primary with a synchronous standby
        (replication synchronous again, a promoted standby rebuilt)."""
        start()


def session_clusters() -> Iterator[Clusters]:
    """Start the clusters for a test session; stop them at its end unless they ran before."""
    already_running = is_running()
    found = start()
    try:
        yield found
    finally:
        if not already_running:
            stop()


clusters_fixture = pytest.fixture(scope="session", name="clusters")(session_clusters)
