"""Runs the installed `rabbit-replay web` in a subprocess, configured only by environment variables."""

import os
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from tests.support.daemon import command, free_port


class WebConsole:
    """One `rabbit-replay web` subprocess on its own port, with its log in a file."""

    def __init__(self, env: dict[str, str], *args: str, port: int | None = None) -> None:
        self.port = port or free_port()
        self.args = args
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("RABBIT_ARCHIVE_")},
            **env,
        }
        self._log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - kept open for the process's life
            prefix="rabbit-replay-web-", suffix=".log", delete=False
        )
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The console's address, as a browser on this machine opens it."""
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait: bool = True) -> "WebConsole":
        """Start the console and, unless told not to, wait until /healthz answers 200."""
        self.process = subprocess.Popen(
            [command("rabbit-replay"), "web", "--port", str(self.port), *self.args],
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=tempfile.gettempdir(),
        )
        if wait:
            self.wait_ready()
        return self

    def ready(self) -> bool:
        """True when /healthz answers 200."""
        try:
            return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self, timeout: float = 30) -> None:
        """Block until ready, failing with the console's log if it exits or takes too long."""
        deadline = time.monotonic() + timeout
        while not self.ready():
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"rabbit-replay web exited {self.process.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"rabbit-replay web not ready after {timeout}s:\n{self.log()}")
            time.sleep(0.1)

    def log(self) -> str:
        """Everything the console printed so far."""
        self._log.flush()
        return Path(self._log.name).read_text(errors="replace")

    def stop(self) -> int:
        """SIGTERM and wait for the exit code (SIGKILL after 15 s)."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                return self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                return self.process.wait(5)
        return self.process.returncode

    def close(self) -> None:
        """Stop if running and remove the log file."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)
        self._log.close()
        Path(self._log.name).unlink(missing_ok=True)
