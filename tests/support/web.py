"""Runs the installed `rabbit-replay web` in a subprocess, configured only by environment variables.

It is handled like the capture daemon (tests/support/daemon.py): a log file, a readiness wait that
fails with the log, SIGTERM to stop; its port is the one the daemon's helper picked.
"""

import subprocess
import tempfile

import httpx

from tests.support.daemon import CaptureProcess, command


class WebConsole(CaptureProcess):
    """One `rabbit-replay web --port P [ARGS]` subprocess; ready when /healthz answers 200."""

    name = "rabbit-replay web"

    def __init__(self, env: dict[str, str], *args: str) -> None:
        super().__init__(env)
        self.args = args

    @property
    def port(self) -> int:
        """The console's port."""
        return self.http_port

    @property
    def url(self) -> str:
        """The console's address, as a browser on this machine opens it."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "WebConsole":
        """Start the console (not waiting for readiness)."""
        self.process = subprocess.Popen(
            [command("rabbit-replay"), "web", "--port", str(self.port), *self.args],
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=tempfile.gettempdir(),
        )
        return self

    def ready(self) -> bool:
        """True when /healthz answers 200."""
        try:
            return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False
