"""Serves /healthz, /readyz and Prometheus /metrics from a small thread, as exporters do."""

import json
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app

from rabbit_archive.capture.health import Health
from rabbit_archive.capture.metrics import CaptureMetrics

StartResponse = Callable[..., Any]


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # probes every few seconds would drown the daemon's own log


def health_app(health: Health, metrics: CaptureMetrics) -> Callable[..., Iterable[bytes]]:
    """The WSGI application behind the three endpoints."""
    metrics_app = make_wsgi_app(metrics.registry)

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            result: Iterable[bytes] = metrics_app(environ, start_response)
            return result
        if path in ("/healthz", "/readyz"):
            ok, reason = health.live() if path == "/healthz" else health.ready()
            body = json.dumps({"status": "ok" if ok else "unavailable", "reason": reason}).encode()
            status = "200 OK" if ok else "503 Service Unavailable"
            start_response(status, [("Content-Type", "application/json")])
            return [body]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found: try /healthz, /readyz or /metrics\n"]

    return app


class HealthServer:
    """The HTTP endpoint, running in a daemon thread until stopped."""

    def __init__(self, host: str, port: int, health: Health, metrics: CaptureMetrics) -> None:
        self._server = make_server(
            host,
            port,
            health_app(health, metrics),
            server_class=_ThreadingWSGIServer,
            handler_class=_QuietHandler,
        )
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="rabbit-capture-http", daemon=True
        )

    @property
    def port(self) -> int:
        """The port actually bound (useful with HTTP_PORT=0)."""
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Serve in the background."""
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
