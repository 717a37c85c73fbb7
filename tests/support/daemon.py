"""Runs the installed `rabbit-capture` in a subprocess, configured only by environment variables."""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

BIN = Path(sys.executable).parent


def command(name: str) -> str:
    """Path of an installed console script of this environment."""
    return str(BIN / name)


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(predicate: "object", timeout: float, interval: float = 0.1, what: str = "condition") -> None:
    """Poll a zero-argument callable until it returns truthy, or fail after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():  # type: ignore[operator]
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class CaptureProcess:
    """One `rabbit-capture run` subprocess with its own HTTP port and log file."""

    name = "rabbit-capture"  # in failure messages (tests/support/web.py runs rabbit-replay web alike)

    def __init__(self, env: dict[str, str], *, http_port: int | None = None) -> None:
        self.http_port = http_port or free_port()
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("RABBIT_ARCHIVE_")},
            **env,
            "RABBIT_ARCHIVE_HTTP_PORT": str(self.http_port),
            "RABBIT_ARCHIVE_HTTP_HOST": "127.0.0.1",
        }
        self._log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - kept open for the process's life
            prefix="rabbit-capture-", suffix=".log", delete=False
        )
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> "CaptureProcess":
        """Start the daemon (not waiting for readiness)."""
        self.process = subprocess.Popen(
            [command("rabbit-capture"), "run"],
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=tempfile.gettempdir(),
        )
        return self

    def ready(self) -> bool:
        """True when /readyz answers 200."""
        try:
            return httpx.get(f"http://127.0.0.1:{self.http_port}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self, timeout: float = 30) -> "CaptureProcess":
        """Block until ready, failing with the daemon's log if it exits or takes too long."""
        deadline = time.monotonic() + timeout
        while not self.ready():
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"{self.name} exited {self.process.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} not ready after {timeout}s:\n{self.log()}")
            time.sleep(0.1)
        return self

    def wait_bound(self, exchange: str, vhosts: int = 1, timeout: float = 15) -> None:
        """Wait until the daemon logged binding the exchange (in `vhosts` vhosts)."""
        needle = f'"exchange": "{exchange}"'
        wait_for(lambda: self.log().count(needle) >= vhosts, timeout, what=f"binding of {exchange}")

    def metrics(self) -> str:
        """The /metrics text."""
        return httpx.get(f"http://127.0.0.1:{self.http_port}/metrics", timeout=2).text

    def metric_total(self, name: str) -> float:
        """The sum of a metric (e.g. rabbit_archive_messages_stored_total) over its labels."""
        prefix = name + "{"
        return sum(
            float(line.rsplit(" ", 1)[1]) for line in self.metrics().splitlines() if line.startswith(prefix)
        )

    def signal(self, signum: int) -> None:
        """Send a signal to the daemon."""
        assert self.process is not None
        self.process.send_signal(signum)

    def kill(self) -> None:
        """SIGKILL: no flush, no ack, no goodbye."""
        self.signal(signal.SIGKILL)
        self.wait(10)

    def wait(self, timeout: float) -> int:
        """Wait for the exit code."""
        assert self.process is not None
        return self.process.wait(timeout)

    def stop(self) -> int:
        """SIGTERM and wait; SIGKILL if it does not exit in 20 s."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                return self.process.wait(5)
        return self.process.returncode

    def log(self) -> str:
        """Everything the daemon printed so far."""
        self._log.flush()
        return Path(self._log.name).read_text(errors="replace")

    def close(self) -> None:
        """Stop if running and remove the log file."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)
        self._log.close()
        Path(self._log.name).unlink(missing_ok=True)
