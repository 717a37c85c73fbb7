"""Whether the configured URLs name this machine's own RabbitMQ and PostgreSQL, for scripts/services.

scripts/services may start the local servers and enable plugins only for servers it owns: a
URL whose host is `localhost`, a loopback address or (PostgreSQL) a Unix socket, on the port
the local server listens on. Any other host, even a name or address that leads back to this
machine, is somebody else's server: it is only checked to answer. Names are not resolved, so
the rule reads the same from the URL alone on every machine.

`python -m rabbit_archive.config.local_services` prints one line per server,
`rabbitmq=manage|check` and `postgresql=manage|check`, after checking that every server
marked `check` answers on at least one of its hosts (exit 1 with one line otherwise).
"""

import ipaddress
import socket
import sys
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from rabbit_archive.config.settings import ConfigError, Settings, load_settings, mask_url
from rabbit_archive.config.urls import split_hosts

# The ports scripts/services starts the local servers on.
LOCAL_PORTS = {"amqp": 5672, "amqps": 5671, "http": 15672, "https": 15671, "postgresql": 5432}
DEFAULT_PORTS = {"amqp": 5672, "amqps": 5671, "http": 80, "https": 443, "postgresql": 5432, "postgres": 5432}


def is_local_host(host: str) -> bool:
    """True for `localhost`, `*.localhost` and loopback addresses (no name is resolved)."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Endpoint:
    """One host of a configured URL."""

    host: str
    port: int
    local: bool


def endpoints(url: str) -> list[Endpoint]:
    """The hosts of a (possibly multi-host) URL, each with its port and whether it is the local server."""
    found = []
    for one in split_hosts(url):
        parts = urlsplit(one)
        scheme = "postgresql" if parts.scheme == "postgres" else parts.scheme
        host = parts.hostname or ""
        if scheme == "postgresql" and (not host or host.startswith("/")):
            # libpq: no host, or ?host=/path, means the local Unix socket.
            socket_host = parse_qs(parts.query).get("host", [""])[0]
            if not host and (not socket_host or socket_host.startswith("/")):
                found.append(Endpoint("", LOCAL_PORTS["postgresql"], True))
                continue
            host = host or socket_host
        port = parts.port or DEFAULT_PORTS.get(scheme, 0)
        local = is_local_host(host) and port == LOCAL_PORTS.get(scheme)
        found.append(Endpoint(host, port, local))
    return found


def plan(settings: Settings) -> dict[str, bool]:
    """Server -> True when scripts/services should manage the local one (start it, enable plugins)."""
    rabbitmq = endpoints(settings.amqp_url) + endpoints(settings.management_url)
    return {
        "rabbitmq": any(endpoint.local for endpoint in rabbitmq),
        "postgresql": any(endpoint.local for endpoint in endpoints(settings.database_url)),
    }


def answers(endpoint: Endpoint, timeout: float = 5.0) -> bool:
    """Whether something accepts TCP connections there."""
    try:
        with socket.create_connection((endpoint.host, endpoint.port), timeout=timeout):
            return True
    except OSError:
        return False


def unanswered(settings: Settings, managed: dict[str, bool]) -> list[str]:
    """One line for each URL of a server left alone where no host answers."""
    urls = {
        "rabbitmq": [
            ("RABBIT_ARCHIVE_AMQP_URL", settings.amqp_url),
            ("RABBIT_ARCHIVE_MANAGEMENT_URL", settings.management_url),
        ],
        "postgresql": [("RABBIT_ARCHIVE_DATABASE_URL", settings.database_url)],
    }
    problems = []
    for server, named in urls.items():
        if managed[server]:
            continue
        for variable, url in named:
            if not any(answers(endpoint) for endpoint in endpoints(url)):
                problems.append(
                    f"{variable} {mask_url(url)} does not answer (no host accepts connections); "
                    "check the URL and that the server runs"
                )
    return problems


def main() -> None:
    """Print what scripts/services should manage; exit 1 when a server it leaves alone does not answer."""
    try:
        settings = load_settings()
    except ConfigError as error:
        print(f"services: error: {error}", file=sys.stderr)
        sys.exit(2)
    managed = plan(settings)
    problems = unanswered(settings, managed)
    for problem in problems:
        print(f"services: error: {problem}", file=sys.stderr)
    if problems:
        sys.exit(1)
    for server, manage in managed.items():
        print(f"{server}={'manage' if manage else 'check'}")


if __name__ == "__main__":
    main()
