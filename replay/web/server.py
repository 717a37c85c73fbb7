"""`rabbit-replay web`: checks the address, the token and the database, then serves the console.

The console's connections carry a statement timeout and read-only transactions in their URL
(PostgreSQL startup parameters), so that every query of every page, including those run by
the shared operations layer, is bounded and cannot write.
"""

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Iterator
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import uvicorn

from rabbit_archive.archive.db import create_pool
from rabbit_archive.archive.errors import ArchiveError, UsageError
from rabbit_archive.config.settings import Settings, mask_url
from rabbit_archive.replay import operations, selection
from rabbit_archive.replay.web import auth
from rabbit_archive.replay.web.app import Console, build_app

log = logging.getLogger("rabbit_archive.web")

POOL_SIZE = 8
GRACE_SECONDS = 5


def console_database_url(url: str, statement_timeout: float) -> str:
    """DATABASE_URL with the console's startup parameters added (those the URL sets are kept)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    given = {key for key, _ in query}
    wanted = (
        ("statement_timeout", str(max(1, round(statement_timeout * 1000)))),
        ("default_transaction_read_only", "on"),
        ("application_name", "rabbit-replay web"),
    )
    query += [(key, value) for key, value in wanted if key not in given]
    return urlunsplit(parts._replace(query=urlencode(query)))


def as_configured(text: str, settings: Settings) -> str:
    """An error message that names DATABASE_URL as configured, not with the console's parameters."""
    console_url = console_database_url(settings.database_url, settings.web_statement_timeout)
    return text.replace(mask_url(console_url), mask_url(settings.database_url))


def check_address(host: str, token: str | None) -> None:
    """UsageError for a non-loopback address without a token."""
    if token is None and not auth.is_loopback(host):
        raise UsageError(
            f"--host {host} is not a loopback address: set RABBIT_ARCHIVE_WEB_TOKEN so that every request "
            "must carry it, or listen on 127.0.0.1"
        )


def listen(host: str, port: int) -> socket.socket:
    """A bound socket, so that a taken port or an unknown host is one line before anything starts."""
    try:
        family, kind, protocol, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, protocol)
    except OSError as error:
        raise UsageError(f"--host {host}: {error.strerror or error}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as error:
        sock.close()
        raise ArchiveError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    return sock


class _Server(uvicorn.Server):
    """uvicorn's server, stopped by SIGTERM or Ctrl-C like the other commands: cleanly, exit 0."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()

        def stop() -> None:
            # A second signal does not wait for open requests any more.
            self.force_exit = self.should_exit
            self.should_exit = True

        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop)
        try:
            yield
        finally:
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)


async def serve(settings: Settings, host: str | None = None, port: int | None = None) -> None:
    """Serve the console until SIGTERM or Ctrl-C."""
    host = host or settings.web_host
    port = settings.web_port if port is None else port
    check_address(host, settings.web_token)
    # uvicorn's own start and stop lines say less than web_listening and web_stopped.
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    console_settings = settings.model_copy(
        update={"database_url": console_database_url(settings.database_url, settings.web_statement_timeout)}
    )
    # The schema and every privilege the pages need, checked once, in one line if missing.
    try:
        async with operations.archive_connection(console_settings, operations.READ_HISTORY):
            pass
    except ArchiveError as error:
        raise type(error)(as_configured(str(error), settings)) from None
    sock = listen(host, port)
    try:
        pool = await create_pool(
            console_settings.database_url, min_size=1, max_size=POOL_SIZE, init=selection.setup_codecs
        )
    except BaseException:
        sock.close()
        raise
    try:
        config = uvicorn.Config(
            build_app(Console(console_settings, pool, configured_url=settings.database_url)),
            log_config=None,
            access_log=False,  # the console logs one web_request line per request itself
            lifespan="off",
            http="h11",
            ws="none",
            proxy_headers=False,
            server_header=False,
            timeout_graceful_shutdown=GRACE_SECONDS,
        )
        bound_host, bound_port = sock.getsockname()[:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        log.info(
            "web_listening",
            extra={"url": f"http://{shown}:{bound_port}/", "token": settings.web_token is not None},
        )
        await _Server(config).serve(sockets=[sock])
    finally:
        sock.close()
        try:
            await asyncio.wait_for(pool.close(), GRACE_SECONDS)
        except TimeoutError:
            pool.terminate()
        log.info("web_stopped")
