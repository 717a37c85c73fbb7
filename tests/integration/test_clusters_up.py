"""scripts/cluster gives a three-node RabbitMQ cluster and a PostgreSQL primary whose commits wait
for a synchronous standby."""

import uuid

import aio_pika
import asyncpg
import httpx
import pytest

from tests.support.clusters import Clusters, clusters_fixture  # noqa: F401  (the `clusters` fixture)

pytestmark = pytest.mark.integration


async def test_three_nodes_one_cluster_and_a_synchronous_standby(clusters: Clusters) -> None:
    async with httpx.AsyncClient(auth=("guest", "guest"), timeout=10) as client:
        response = await client.get(clusters.management_urls[0] + "api/nodes")
        response.raise_for_status()
        nodes = {node["name"]: node["running"] for node in response.json()}
    assert nodes == dict.fromkeys(clusters.nodes, True)

    for url in clusters.amqp_urls:  # guest/guest works on every node
        connection = await aio_pika.connect(url, timeout=10)
        await connection.close()

    token = uuid.uuid4().hex
    primary = await asyncpg.connect(clusters.database_url, timeout=10)  # lands on the writable one
    try:
        assert await primary.fetchval("SELECT pg_is_in_recovery()") is False
        assert await primary.fetchval("SHOW port") == "5441"
        assert await primary.fetchval("SHOW synchronous_standby_names") == "*"
        states = await primary.fetch("SELECT sync_state FROM pg_stat_replication")
        assert [state["sync_state"] for state in states] == ["sync"]
        await primary.execute("CREATE TABLE IF NOT EXISTS cluster_probe (token text)")
        # remote_apply: the commit returns only once the standby has applied it
        await primary.execute("SET synchronous_commit = remote_apply")
        await primary.execute("INSERT INTO cluster_probe VALUES ($1)", token)
        standby = await asyncpg.connect(clusters.standby_url, timeout=10)
        try:
            assert await standby.fetchval("SELECT pg_is_in_recovery()") is True
            assert await standby.fetchval("SELECT token FROM cluster_probe WHERE token = $1", token) == token
        finally:
            await standby.close()
    finally:
        await primary.execute("DELETE FROM cluster_probe WHERE token = $1", token)
        await primary.close()
