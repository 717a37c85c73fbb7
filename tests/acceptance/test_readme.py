"""README.md's first command runs the daemon as written on a fresh checkout of the tracked files."""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pika
import pytest

from tests.conftest import run_sql
from tests.support.daemon import free_port, wait_for

pytestmark = pytest.mark.acceptance

REPO = Path(__file__).resolve().parents[2]
SH_BLOCK = re.compile(r"^```sh\n(.*?)^```", re.MULTILINE | re.DOTALL)


def readme_commands() -> list[str]:
    """The fenced ```sh blocks of README.md, in order, stripped."""
    return [block.strip() for block in SH_BLOCK.findall((REPO / "README.md").read_text())]


def fresh_checkout(target: Path) -> Path:
    """Copy every tracked file (and only those) into target, keeping executable bits."""
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True, timeout=30
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source, destination = REPO / name, target / name
        if not source.exists() and not source.is_symlink():
            continue  # deleted in the working tree but not yet in the index
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, destination, follow_symlinks=False)
    return target


def logged_events(log: Path) -> list[dict[str, Any]]:
    """The JSON log lines printed so far (install and service output is skipped)."""
    events = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return events


def ready(port: int) -> bool:
    """True when /readyz answers 200."""
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_readme_commands_are_the_run_and_test_scripts() -> None:
    commands = readme_commands()
    assert len(commands) >= 2, commands
    assert commands[0] == "scripts/run-capture"
    assert commands[1] == "scripts/test"
    assert "exec scripts/test" in (REPO / ".ci" / "run").read_text()


@pytest.mark.timeout(400)
def test_first_readme_command_runs_the_daemon_on_a_fresh_checkout(
    tmp_path: Path, capture_env: dict[str, str], pika_channel: Any, database_url: str
) -> None:
    command = readme_commands()[0]
    checkout = fresh_checkout(tmp_path / "checkout")
    assert not (checkout / ".venv").exists()
    exchange = f"readme.{uuid.uuid4().hex[:8]}"
    pika_channel.exchange_declare(exchange, "topic")

    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("RABBIT_ARCHIVE_")},
        **capture_env,
        "RABBIT_ARCHIVE_HTTP_PORT": str(port),
        "RABBIT_ARCHIVE_HTTP_HOST": "127.0.0.1",
    }
    env.pop("PIP_NO_CACHE_DIR", None)  # the pip cache makes the install quick
    log = tmp_path / "run-capture.log"
    started = time.monotonic()
    with log.open("wb") as output:
        process = subprocess.Popen(
            ["bash", "-c", command],
            cwd=checkout,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        while not ready(port):
            if process.poll() is not None:
                pytest.fail(f"{command!r} exited {process.returncode}:\n{log.read_text(errors='replace')}")
            if time.monotonic() - started > 240:
                pytest.fail(f"{command!r} not ready after 240 s:\n{log.read_text(errors='replace')}")
            time.sleep(0.5)
        assert (checkout / ".venv" / "bin" / "rabbit-capture").exists()

        wait_for(
            lambda: any(
                event.get("event") == "bound" and event.get("exchange") == exchange
                for event in logged_events(log)
            ),
            timeout=30,
            what=f"the daemon to bind {exchange}",
        )
        message_id = uuid.uuid4().hex
        pika_channel.basic_publish(
            exchange, "readme.check", b"from the README", pika.BasicProperties(message_id=message_id)
        )

        def stored() -> list[Any]:
            return run_sql(
                database_url,
                "SELECT exchange, routing_key, body FROM rabbit_archive.messages WHERE message_id = $1",
                message_id,
            )

        wait_for(lambda: stored(), timeout=30, what="the message in rabbit_archive.messages")
        assert [tuple(row) for row in stored()] == [(exchange, "readme.check", b"from the README")]

        os.killpg(process.pid, signal.SIGTERM)
        try:
            code = process.wait(15)
        except subprocess.TimeoutExpired:
            pytest.fail(f"no exit within 15 s of SIGTERM:\n{log.read_text(errors='replace')}")
        assert code == 0, log.read_text(errors="replace")
    finally:
        with contextlib.suppress(ProcessLookupError):  # already gone, with everything it started
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
        print(f"{command!r}: {time.monotonic() - started:.1f} s")
