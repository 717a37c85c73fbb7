"""The systemd unit's daemon, started as its ExecStart and EnvironmentFile say (without systemd), captures."""

import os
import re
import shlex
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import httpx
import pika
import pytest

from tests.conftest import run_sql
from tests.support.daemon import command, free_port, wait_for
from tests.unit.test_deploy import read_environment_file

pytestmark = pytest.mark.acceptance

SYSTEMD = Path(__file__).resolve().parents[2] / "deploy/systemd"
PREFIX = "RABBIT_ARCHIVE_"


def unit_values(key: str) -> list[str]:
    """Every value of KEY= in the unit file."""
    unit = (SYSTEMD / "rabbit-capture.service").read_text()
    return re.findall(rf"^{key}=(.*)$", unit, flags=re.MULTILINE)


def ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_daemon_as_the_unit_starts_it_captures_and_stops_cleanly(
    capture_env: dict[str, str], database_url: str, pika_channel: Any
) -> None:
    # The command line: ExecStart, with the installed path of rabbit-capture replaced by this venv's.
    (exec_start,) = unit_values("ExecStart")
    argv = shlex.split(exec_start)
    assert Path(argv[0]).is_absolute(), "systemd needs an absolute path"
    assert Path(argv[0]).name == "rabbit-capture"
    argv[0] = command("rabbit-capture")

    # The environment: Environment= lines, then the EnvironmentFile (shipped as deploy/systemd/...).
    (environment_file,) = unit_values("EnvironmentFile")
    from_file = read_environment_file(SYSTEMD / Path(environment_file).name)
    from_unit = dict(
        pair.split("=", 1) for value in unit_values("Environment") for pair in shlex.split(value)
    )
    # Only where the services are differs here: this test's vhost, database and a free port.
    port = free_port()
    overrides = {
        f"{PREFIX}AMQP_URL": capture_env[f"{PREFIX}AMQP_URL"],
        f"{PREFIX}MANAGEMENT_URL": capture_env[f"{PREFIX}MANAGEMENT_URL"],
        f"{PREFIX}DATABASE_URL": database_url,
        f"{PREFIX}HTTP_PORT": str(port),
    }
    assert set(overrides) <= set(from_file), "override only what the file sets"
    environment = {
        **{k: v for k, v in os.environ.items() if not k.startswith(PREFIX)},
        **from_unit,
        **from_file,
        **overrides,
    }
    (working_directory,) = unit_values("WorkingDirectory") or [tempfile.gettempdir()]

    pika_channel.exchange_declare("orders", "topic", durable=True)
    with tempfile.TemporaryFile() as log:
        daemon = subprocess.Popen(
            argv, env=environment, cwd=working_directory, stdout=log, stderr=subprocess.STDOUT
        )

        def output() -> str:
            log.seek(0)
            return log.read().decode(errors="replace")

        try:
            wait_for(lambda: ready(port) or daemon.poll() is not None, 30, what="/readyz")
            assert daemon.poll() is None, f"exited {daemon.returncode}:\n{output()}"
            # The env file's LOG_FORMAT=json: one JSON object per line.
            wait_for(lambda: '"exchange": "orders"' in output(), 15, what="binding of orders")
            pika_channel.basic_publish(
                "orders",
                "eu.created",
                b'{"order": 1}',
                pika.BasicProperties(content_type="application/json", message_id="m-1"),
            )
            query = "SELECT exchange, routing_key, body, message_id FROM rabbit_archive.messages"
            wait_for(lambda: len(run_sql(database_url, query)) == 1, 15, what="the message stored")
            (row,) = run_sql(database_url, query)
            assert tuple(row) == ("orders", "eu.created", b'{"order": 1}', "m-1")

            # KillSignal (SIGTERM): flushes and exits 0 well within TimeoutStopSec.
            assert unit_values("KillSignal") == ["SIGTERM"]
            daemon.send_signal(signal.SIGTERM)
            assert daemon.wait(float(unit_values("TimeoutStopSec")[0])) == 0, output()
        finally:
            if daemon.poll() is None:
                daemon.kill()
                daemon.wait(5)
