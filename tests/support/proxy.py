"""A fault-injecting TCP proxy for tests.

Integration tests put a :class:`TcpProxy` between the archive daemon and a real
service (RabbitMQ or PostgreSQL) so they can simulate outages on demand:

* :meth:`TcpProxy.cut` drops every open connection (both sides) at once, like a
  broker restart or a network blip, but keeps accepting new connections;
* :meth:`TcpProxy.block` cuts and then refuses new connections (they are accepted
  and closed at once) until :meth:`TcpProxy.unblock`, like a service that is down.

The proxy runs its own asyncio event loop in its own thread, so it can be driven
from synchronous tests and from async tests alike, and it keeps forwarding bytes
while the test's event loop is busy or blocked.  Every public method is
thread-safe and returns only once the proxy thread has carried it out::

    with TcpProxy("127.0.0.1", rabbit_port) as proxy:
        url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/"
        ...  # start the daemon against ``url``
        proxy.block()  # the broker "goes away"
        ...
        proxy.unblock()  # and comes back
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl as ssl_module
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self, TypeVar

__all__ = ["CHUNK_SIZE", "TcpProxy"]

CHUNK_SIZE = 64 * 1024
"""How many bytes one read takes from either side."""

_TIMEOUT = 5.0
"""How long a public method waits for the proxy thread before giving up."""

_log = logging.getLogger(__name__)

_T = TypeVar("_T")


@dataclass(eq=False)
class _Connection:
    """One proxied client connection and, once it is open, its target connection."""

    client: asyncio.StreamWriter
    target: asyncio.StreamWriter | None = None
    task: asyncio.Task[None] | None = None

    def writers(self) -> list[asyncio.StreamWriter]:
        return [w for w in (self.client, self.target) if w is not None]

    def abort(self) -> None:
        """Close both sides at once, dropping any unsent data."""
        for writer in self.writers():
            writer.transport.abort()

    async def close(self, *, graceful: bool) -> None:
        """Close both sides (flushing first if ``graceful``) and wait until they are closed."""
        writers = self.writers()
        for writer in writers:
            if graceful:
                writer.close()
            else:
                writer.transport.abort()
        for writer in writers:
            with contextlib.suppress(Exception):
                await writer.wait_closed()


class TcpProxy:
    """Forward TCP connections from an ephemeral local port to ``target_host:target_port``."""

    def __init__(
        self,
        target_host: str,
        target_port: int,
        listen_host: str = "127.0.0.1",
        ssl: ssl_module.SSLContext | None = None,
    ) -> None:
        self.ssl = ssl  # when set, clients speak TLS to the proxy (it terminates TLS)
        self.target_host = target_host
        self.target_port = target_port
        self.listen_host = listen_host
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._port: int | None = None
        # Everything below is only touched from the proxy thread (ints are read elsewhere).
        self._connections: set[_Connection] = set()
        self._blocked = False
        self._open = 0

    def __repr__(self) -> str:
        port = self._port if self._port is not None else "?"
        return (
            f"<TcpProxy {self.listen_host}:{port} -> {self.target_host}:{self.target_port}"
            f" open={self._open} blocked={self._blocked}>"
        )

    # ------------------------------------------------------------------ public API

    def start(self) -> None:
        """Bind an ephemeral port on ``listen_host`` and start forwarding in a new thread."""
        if self._thread is not None:
            raise RuntimeError("TcpProxy already started")
        loop = asyncio.new_event_loop()
        thread = threading.Thread(
            target=self._run,
            args=(loop,),
            name=f"TcpProxy->{self.target_host}:{self.target_port}",
            daemon=True,
        )
        self._loop, self._thread = loop, thread
        thread.start()
        try:
            self._server = self._call(self._listen)
        except BaseException:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(_TIMEOUT)
            self._loop = self._thread = None
            raise

    @property
    def port(self) -> int:
        """The local port clients should connect to."""
        if self._port is None:
            raise RuntimeError("TcpProxy not started")
        return self._port

    @property
    def connection_count(self) -> int:
        """How many client<->target connections are open right now."""
        return self._open

    @property
    def blocked(self) -> bool:
        """Whether new connections are being refused."""
        return self._blocked

    def cut(self) -> None:
        """Abruptly close every open connection (both sides); keep accepting new ones."""
        self._call(self._cut)

    def block(self) -> None:
        """Cut every open connection and refuse new ones until :meth:`unblock`."""
        self._call(self._block)

    def unblock(self) -> None:
        """Let new connections through again."""
        self._call(self._unblock)

    def stop(self) -> None:
        """Stop listening, close every connection and join the thread (within 5 s)."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        deadline = time.monotonic() + _TIMEOUT
        try:
            if self._server is not None and thread.is_alive():
                self._call(self._shutdown)
        finally:
            if thread.is_alive():
                with contextlib.suppress(RuntimeError):  # the loop is already closed
                    loop.call_soon_threadsafe(loop.stop)
                thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                raise RuntimeError(f"{thread.name} did not stop within {_TIMEOUT:g} s")
            self._loop = self._thread = self._server = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ thread plumbing

    def _call(self, make: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
        """Run ``make()`` on the proxy loop and wait for its result."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            raise RuntimeError("TcpProxy not started")
        if threading.current_thread() is thread:
            raise RuntimeError("TcpProxy methods must not be called from the proxy thread")
        future = asyncio.run_coroutine_threadsafe(make(), loop)
        try:
            return future.result(timeout=_TIMEOUT)
        except TimeoutError:
            future.cancel()
            raise

    @staticmethod
    def _run(loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                asyncio.set_event_loop(None)
                loop.close()

    # ------------------------------------------------------------------ proxy thread side

    async def _listen(self) -> asyncio.Server:
        accept, host = self._accept, self.listen_host
        server = await asyncio.start_server(accept, host, 0, limit=CHUNK_SIZE, ssl=self.ssl)
        self._port = int(server.sockets[0].getsockname()[1])
        return server

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._blocked:
            writer.transport.abort()
            return
        connection = _Connection(writer)
        task = asyncio.get_running_loop().create_task(self._serve(connection, reader))
        connection.task = task
        self._connections.add(connection)
        task.add_done_callback(lambda done: self._forget(connection, done))

    def _forget(self, connection: _Connection, task: asyncio.Task[None]) -> None:
        self._connections.discard(connection)
        if not task.cancelled() and (error := task.exception()) is not None:
            _log.error("%r: connection handler failed", self, exc_info=error)

    async def _serve(self, connection: _Connection, client_reader: asyncio.StreamReader) -> None:
        graceful = False
        try:
            try:
                target_reader, connection.target = await asyncio.open_connection(
                    self.target_host, self.target_port, limit=CHUNK_SIZE
                )
            except OSError as error:
                _log.debug("%r: target unreachable: %s", self, error)
                return
            self._open += 1
            try:
                results = await asyncio.gather(
                    self._pipe(client_reader, connection.target, connection),
                    self._pipe(target_reader, connection.client, connection),
                )
                graceful = all(results)
            finally:
                self._open -= 1
        finally:
            await connection.close(graceful=graceful)

    @staticmethod
    async def _pipe(
        source: asyncio.StreamReader, sink: asyncio.StreamWriter, connection: _Connection
    ) -> bool:
        """Copy ``source`` to ``sink`` until EOF (passed on as a half-close); False on error."""
        try:
            while data := await source.read(CHUNK_SIZE):
                sink.write(data)
                await sink.drain()
            if sink.can_write_eof() and not sink.is_closing():
                sink.write_eof()
        except OSError:  # reset by either peer, or cut() under our feet
            connection.abort()
            return False
        return True

    async def _cut(self) -> None:
        connections = list(self._connections)
        tasks = [c.task for c in connections if c.task is not None]
        for connection in connections:
            connection.abort()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _block(self) -> None:
        self._blocked = True
        await self._cut()

    async def _unblock(self) -> None:
        self._blocked = False

    async def _shutdown(self) -> None:
        server = self._server
        if server is not None:
            server.close()
        await self._cut()
        if server is not None:
            await server.wait_closed()
