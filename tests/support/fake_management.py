"""A management API in front of the real one that changes some answers, for fault-injection tests.

Every request goes to the real management API; `tamper(path, answer)` may return another JSON
answer for a GET (odd items, missing fields, a vhost that does not exist). It counts requests.
"""

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote

import httpx

Tamper = Callable[[str, Any], Any]


class FakeManagement:
    """Serves on 127.0.0.1:<port>, forwarding to `upstream` and passing GET answers through `tamper`."""

    def __init__(self, upstream: str, tamper: Tamper) -> None:
        self.upstream = upstream
        self.tamper = tamper
        self.requests = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _forward(self, method: str) -> None:
                fake.requests += 1
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {
                    k: v for k, v in self.headers.items() if k.lower() in ("authorization", "content-type")
                }
                with httpx.Client(base_url=fake.upstream, timeout=10) as client:
                    response = client.request(method, self.path, content=body, headers=headers)
                payload = response.content
                if method == "GET" and response.status_code == 200:
                    payload = json.dumps(fake.tamper(unquote(self.path), response.json())).encode()
                self.send_response(response.status_code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self) -> None:
                self._forward("GET")

            def do_PUT(self) -> None:
                self._forward("PUT")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="fake-management", daemon=True
        )

    def __enter__(self) -> "FakeManagement":
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._server.shutdown()
        self._server.server_close()
