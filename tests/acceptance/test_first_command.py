"""README's first command against servers that run elsewhere: it starts nothing, checks they answer, runs.

Here "elsewhere" is the local broker and database reached under this machine's host name,
with stand-ins for rabbitmq-server, rabbitmqctl, rabbitmq-plugins and pg_ctlcluster first on
PATH that record any call and fail, as on a machine where the user may not start services.
"""

import os
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO
from urllib.parse import quote

import httpx
import pytest

from tests.support.daemon import free_port, wait_for
from tests.support.services import Services

pytestmark = pytest.mark.acceptance

ROOT = Path(__file__).resolve().parents[2]
SERVICE_COMMANDS = ("rabbitmq-server", "rabbitmqctl", "rabbitmq-plugins", "pg_ctlcluster", "systemctl")


def other_name(services: Services) -> str:
    """A name of this machine under which the local servers answer, other than localhost."""
    name = socket.gethostname()
    for host, port in (
        (name, services.amqp_port),
        (name, httpx.URL(services.management_url).port or 15672),
        (name, services.postgres_port),
    ):
        try:
            with socket.create_connection((host, port), timeout=2):
                pass
        except OSError:
            message = f"the local servers do not answer under this machine's name {name!r}"
            if os.environ.get("CI") == "true":
                pytest.fail(message)  # in CI a missing service is a failure, never a skip
            pytest.skip(message)
    return name


@pytest.fixture
def no_service_rights() -> Iterator[tuple[Path, Path]]:
    """A directory of failing stand-ins for the service commands, and the file they log calls to."""
    with tempfile.TemporaryDirectory(prefix="no-rights-") as directory:
        calls = Path(directory) / "calls"
        for name in SERVICE_COMMANDS:
            stub = Path(directory) / name
            stub.write_text(f'#!/bin/sh\necho "{name} $*" >> "{calls}"\nexit 126\n')
            stub.chmod(0o755)
        yield Path(directory), calls


def test_run_capture_against_servers_elsewhere_starts_nothing_and_runs(
    services: Services, vhost: str, database_url: str, no_service_rights: tuple[Path, Path]
) -> None:
    name = other_name(services)
    stubs, calls = no_service_rights
    management_port = httpx.URL(services.management_url).port or 15672
    http_port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("RABBIT_ARCHIVE_")},
        "PATH": f"{stubs}:{os.environ['PATH']}",
        "RABBIT_ARCHIVE_AMQP_URL": f"amqp://guest:guest@{name}:{services.amqp_port}/{quote(vhost, safe='')}",
        "RABBIT_ARCHIVE_MANAGEMENT_URL": f"http://{name}:{management_port}",
        "RABBIT_ARCHIVE_DATABASE_URL": database_url.replace(f"@{services.postgres_host}:", f"@{name}:"),
        "RABBIT_ARCHIVE_HTTP_HOST": "127.0.0.1",
        "RABBIT_ARCHIVE_HTTP_PORT": str(http_port),
    }
    assert f"@{name}:" in env["RABBIT_ARCHIVE_DATABASE_URL"]
    with tempfile.TemporaryFile() as output:
        process = subprocess.Popen(
            [str(ROOT / "scripts" / "run-capture")],
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=tempfile.gettempdir(),
            start_new_session=True,
        )

        def ready() -> bool:
            assert process.poll() is None, read(output)
            try:
                return httpx.get(f"http://127.0.0.1:{http_port}/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        try:
            wait_for(ready, 120, interval=0.2, what="the daemon started by scripts/run-capture")
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(30)
        text = read(output)
    assert not calls.exists(), calls.read_text()
    assert "RabbitMQ is elsewhere and answers" in text
    assert "PostgreSQL is elsewhere and answers" in text
    assert "guest:guest" not in text


def read(output: IO[bytes]) -> str:
    """What the script printed so far."""
    output.seek(0)
    return output.read().decode(errors="replace")


def test_services_stops_with_one_line_when_a_server_elsewhere_does_not_answer(
    no_service_rights: tuple[Path, Path],
) -> None:
    stubs, calls = no_service_rights
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("RABBIT_ARCHIVE_")},
        "PATH": f"{stubs}:{os.environ['PATH']}",
        "RABBIT_ARCHIVE_AMQP_URL": "amqp://u:hidden-pw@127.0.0.1:1/",
        "RABBIT_ARCHIVE_MANAGEMENT_URL": "http://127.0.0.1:1",
        "RABBIT_ARCHIVE_DATABASE_URL": "postgresql://u:hidden-pw@127.0.0.1:1/archive",
    }
    result = subprocess.run(
        [str(ROOT / "scripts" / "services")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tempfile.gettempdir(),
        check=False,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "RABBIT_ARCHIVE_AMQP_URL amqp://u:***@127.0.0.1:1/ does not answer" in result.stderr
    assert "RABBIT_ARCHIVE_DATABASE_URL" in result.stderr
    assert "hidden-pw" not in result.stderr + result.stdout
    assert not calls.exists()
