"""Where the tests find RabbitMQ and PostgreSQL: env URLs, else the local services, else testcontainers."""

import os
import shutil
import socket
import subprocess
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit


@dataclass(frozen=True)
class Services:
    """Base URLs of the broker, its management API and the PostgreSQL server."""

    amqp_url: str  # without vhost path
    management_url: str
    postgres_url: str  # admin URL to the server's "postgres" database

    @property
    def amqp_host(self) -> str:
        """Host of the broker."""
        return urlsplit(self.amqp_url).hostname or "127.0.0.1"

    @property
    def amqp_port(self) -> int:
        """AMQP port of the broker."""
        return urlsplit(self.amqp_url).port or 5672

    @property
    def postgres_host(self) -> str:
        """Host of PostgreSQL."""
        return urlsplit(self.postgres_url).hostname or "127.0.0.1"

    @property
    def postgres_port(self) -> int:
        """Port of PostgreSQL."""
        return urlsplit(self.postgres_url).port or 5432

    def database_url(self, name: str, host: str | None = None, port: int | None = None) -> str:
        """URL of one database on the server, optionally through another host:port (a proxy)."""
        parts = urlsplit(self.postgres_url)
        netloc = parts.netloc
        if host is not None:
            user = f"{parts.username}@" if parts.username else ""
            netloc = f"{user}{host}:{port}"
        return urlunsplit(parts._replace(netloc=netloc, path=f"/{name}"))


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def _docker_runs() -> bool:
    if shutil.which("docker") is None:
        return False
    result = subprocess.run(["docker", "info"], capture_output=True, timeout=20, check=False)
    return result.returncode == 0


class ServicesUnavailable(RuntimeError):
    """Neither configured nor local services answer, and Docker cannot start them."""


def find_services() -> tuple[Services, list[object]]:
    """Resolve the services; returns them and any containers started (to stop at the end)."""
    amqp = os.environ.get("RABBIT_ARCHIVE_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    management = os.environ.get("RABBIT_ARCHIVE_TEST_MANAGEMENT_URL", "http://127.0.0.1:15672")
    postgres = os.environ.get("RABBIT_ARCHIVE_TEST_DATABASE_URL", "postgresql://root@127.0.0.1:5432/postgres")
    candidate = Services(amqp, management, postgres)
    management_parts = urlsplit(management)
    if (
        _answers(candidate.amqp_host, candidate.amqp_port)
        and _answers(management_parts.hostname or "127.0.0.1", management_parts.port or 15672)
        and _answers(candidate.postgres_host, candidate.postgres_port)
    ):
        return candidate, []
    if not _docker_runs():
        raise ServicesUnavailable(
            f"RabbitMQ ({candidate.amqp_host}:{candidate.amqp_port}, management {management}) or "
            f"PostgreSQL ({candidate.postgres_host}:{candidate.postgres_port}) does not answer and "
            "Docker is not available: start them (see .ci/run) or set RABBIT_ARCHIVE_TEST_*_URL"
        )
    return _start_containers()


def _start_containers() -> tuple[Services, list[object]]:
    from testcontainers.postgres import PostgresContainer
    from testcontainers.rabbitmq import RabbitMqContainer

    rabbit = RabbitMqContainer("rabbitmq:3.13-management")
    rabbit.with_exposed_ports(5672, 15672)
    rabbit.start()
    postgres = PostgresContainer("postgres:16", username="root", password="root", dbname="postgres")
    postgres.start()
    host = rabbit.get_container_host_ip()
    services = Services(
        f"amqp://guest:guest@{host}:{rabbit.get_exposed_port(5672)}/",
        f"http://{host}:{rabbit.get_exposed_port(15672)}",
        f"postgresql://root:root@{postgres.get_container_host_ip()}:{postgres.get_exposed_port(5432)}/postgres",
    )
    return services, [rabbit, postgres]
