"""Fixtures: real services, a fresh vhost and a fresh database per test, daemons in subprocesses."""

import asyncio
import contextlib
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote

import asyncpg
import httpx
import pika
import pytest

from tests.support.daemon import CaptureProcess
from tests.support.services import Services, find_services


@pytest.fixture(scope="session")
def services() -> Iterator[Services]:
    """The broker and database every integration and acceptance test talks to."""
    found, containers = find_services()
    try:
        yield found
    finally:
        for container in containers:
            container.stop()  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def management(services: Services) -> Iterator[httpx.Client]:
    """Management API client with the broker's admin credentials."""
    with httpx.Client(base_url=services.management_url, auth=("guest", "guest"), timeout=10) as client:
        yield client


@pytest.fixture
def vhost(management: httpx.Client) -> Iterator[str]:
    """A fresh vhost for this test, deleted afterwards."""
    name = f"test-{uuid.uuid4().hex[:10]}"
    encoded = quote(name, safe="")
    management.put(f"/api/vhosts/{encoded}").raise_for_status()
    management.put(
        f"/api/permissions/{encoded}/guest", json={"configure": ".*", "write": ".*", "read": ".*"}
    ).raise_for_status()
    try:
        yield name
    finally:
        management.delete(f"/api/vhosts/{encoded}")


def run_sql(url: str, query: str, *args: Any) -> list[asyncpg.Record]:
    """Run one query on a database from sync test code."""

    async def go() -> list[asyncpg.Record]:
        connection = await asyncpg.connect(url)
        try:
            return await connection.fetch(query, *args)
        finally:
            await connection.close()

    return asyncio.run(go())


@pytest.fixture
def database_url(services: Services) -> Iterator[str]:
    """URL of a database that does not exist yet (the daemon creates it); dropped afterwards."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    try:
        yield services.database_url(name)
    finally:
        run_sql(services.postgres_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def amqp_url(services: Services, vhost: str) -> str:
    """AMQP URL of the test's vhost."""
    return services.amqp_url.rstrip("/") + "/" + quote(vhost, safe="")


@pytest.fixture
def capture_env(services: Services, amqp_url: str, database_url: str) -> dict[str, str]:
    """The environment of a daemon capturing the test's vhost into the test's database."""
    return {
        "RABBIT_ARCHIVE_AMQP_URL": amqp_url,
        "RABBIT_ARCHIVE_MANAGEMENT_URL": services.management_url,
        "RABBIT_ARCHIVE_DATABASE_URL": database_url,
        "RABBIT_ARCHIVE_DISCOVERY_INTERVAL": "1",
        "RABBIT_ARCHIVE_LOG_FORMAT": "json",
    }


@pytest.fixture
def start_capture(capture_env: dict[str, str]) -> Iterator[Callable[..., CaptureProcess]]:
    """Start `rabbit-capture run` subprocesses (extra env as keyword arguments); all stopped at the end."""
    started: list[CaptureProcess] = []

    def start(wait: bool = True, **extra: str) -> CaptureProcess:
        env = {**capture_env, **{f"RABBIT_ARCHIVE_{k.upper()}": v for k, v in extra.items()}}
        daemon = CaptureProcess(env).start()
        started.append(daemon)
        if wait:
            daemon.wait_ready()
        return daemon

    try:
        yield start
    finally:
        for daemon in started:
            daemon.close()


@pytest.fixture
def pika_channel(services: Services, vhost: str) -> Iterator[Any]:
    """A pika channel (the reference Python client) on the test's vhost."""
    parameters = pika.ConnectionParameters(
        host=services.amqp_host,
        port=services.amqp_port,
        virtual_host=vhost,
        credentials=pika.PlainCredentials("guest", "guest"),
    )
    connection = pika.BlockingConnection(parameters)
    channel = connection.channel()
    channel.confirm_delivery()
    try:
        yield channel
    finally:
        # A test may have restarted the broker under this connection.
        with contextlib.suppress(pika.exceptions.AMQPError):
            if connection.is_open:
                connection.close()
