"""A fault-injecting TCP proxy for tests.

Integration tests put a :class:`TcpProxy` between the archive daemon and a real
service (RabbitMQ or PostgreSQL) so they can simulate outages on demand:

* :meth:`TcpProxy.cut` drops every open connection (both sides) at once, like a
  broker restart or a network blip, but keeps accepting new connections;
* :meth:`TcpProxy.block` cuts and then refuses new connections (they are accepted
  and closed at once) until :meth:`TcpProxy.unblock`, like a service that is down;
* with ``amqp=True`` the client's bytes are split into AMQP 0-9-1 frames (still passed on
  byte for byte), and :meth:`TcpProxy.cut_after_frame` / :meth:`TcpProxy.arm_ack_cut` arm a
  one-shot cut at an exact point of the conversation: the next client frame that matches is
  passed on (and acknowledged by the target's TCP) or swallowed, and then every connection is
  cut at once, like :meth:`TcpProxy.cut`.

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

    with TcpProxy("127.0.0.1", rabbit_port, amqp=True) as proxy:
        ...
        cut = proxy.arm_ack_cut(before=True)  # the next basic.ack is lost with the connection
        assert cut.wait(10)
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import ssl as ssl_module
import struct
import termios
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self, TypeVar

__all__ = [
    "BASIC_ACK",
    "CHUNK_SIZE",
    "PROTOCOL_HEADER",
    "AmqpFrame",
    "AmqpFrameSplitter",
    "FrameCut",
    "TcpProxy",
    "is_basic_ack",
]

CHUNK_SIZE = 64 * 1024
"""How many bytes one read takes from either side."""

_TIMEOUT = 5.0
"""How long a public method waits for the proxy thread before giving up."""

_FLUSH_TIMEOUT = 1.0
"""How long a cut after a frame waits for the target's TCP to acknowledge that frame."""

_log = logging.getLogger(__name__)

_T = TypeVar("_T")

PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"
"""What an AMQP 0-9-1 client sends first (8 bytes), before any frame."""

METHOD_FRAME = 1
FRAME_END = 0xCE
BASIC_ACK = (60, 80)
"""(class id, method id) of basic.ack."""

_FRAME_HEADER = struct.Struct(">BHI")  # type, channel, payload size
_FRAME_TYPES = frozenset({1, 2, 3, 4, 8})  # method, header, body, heartbeat (8; 4 in 0-8 drafts)
_MAX_FRAME_SIZE = 64 * 1024 * 1024
"""A larger announced payload means the stream is not AMQP frames (RabbitMQ allows 128 kB by default)."""
_METHOD_IDS = struct.Struct(">HH")  # class id, method id


@dataclass(frozen=True)
class AmqpFrame:
    """One complete AMQP 0-9-1 frame exactly as it was on the wire (header, payload, frame-end)."""

    data: bytes

    @property
    def type(self) -> int:
        return self.data[0]

    @property
    def channel(self) -> int:
        return int.from_bytes(self.data[1:3], "big")

    @property
    def payload(self) -> bytes:
        return self.data[_FRAME_HEADER.size : -1]

    @property
    def method(self) -> tuple[int, int] | None:
        """(class id, method id) of a method frame; None for other frames."""
        if self.type != METHOD_FRAME or len(self.data) < _FRAME_HEADER.size + _METHOD_IDS.size + 1:
            return None
        class_id, method_id = _METHOD_IDS.unpack_from(self.data, _FRAME_HEADER.size)
        return int(class_id), int(method_id)


def is_basic_ack(frame: AmqpFrame) -> bool:
    """Whether the frame is a basic.ack method frame."""
    return frame.method == BASIC_ACK


class AmqpFrameSplitter:
    """Split a client->server AMQP 0-9-1 byte stream into its protocol header and whole frames.

    :meth:`feed` returns, in order, what can be passed on now: ``bytes`` for the protocol header
    (and for everything once the stream stopped looking like AMQP framing: it is then passed on
    unparsed), an :class:`AmqpFrame` for each complete frame.  An incomplete tail is kept for the
    next call (:attr:`pending`), so frames may span reads; joined, the pieces returned so far plus
    the pending tail are the bytes fed so far.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._header_seen = False
        self.raw = False
        """True once the stream was found not to be AMQP frames (no "AMQP", an unknown frame type,
        an absurd size, a bad frame-end)."""

    @property
    def pending(self) -> int:
        """Bytes held back because they do not make a whole frame (or header) yet."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[AmqpFrame | bytes]:
        if self.raw:
            return [data] if data else []
        buffer = self._buffer
        buffer += data
        pieces: list[AmqpFrame | bytes] = []
        if not self._header_seen:
            start = bytes(buffer[:4])
            if not PROTOCOL_HEADER.startswith(start):
                return self._give_up(pieces)
            if len(buffer) < len(PROTOCOL_HEADER):
                return pieces
            pieces.append(bytes(buffer[: len(PROTOCOL_HEADER)]))
            del buffer[: len(PROTOCOL_HEADER)]
            self._header_seen = True
        offset = 0
        while len(buffer) - offset >= _FRAME_HEADER.size:
            kind, _channel, size = _FRAME_HEADER.unpack_from(buffer, offset)
            if kind not in _FRAME_TYPES or size > _MAX_FRAME_SIZE:
                del buffer[:offset]
                return self._give_up(pieces)
            end = offset + _FRAME_HEADER.size + size + 1
            if len(buffer) < end:
                break
            if buffer[end - 1] != FRAME_END:
                del buffer[:offset]
                return self._give_up(pieces)
            pieces.append(AmqpFrame(bytes(buffer[offset:end])))
            offset = end
        del buffer[:offset]
        return pieces

    def rest(self) -> bytes:
        """Take the pending bytes (at the end of the stream, to pass a torn frame on as it came)."""
        tail = bytes(self._buffer)
        self._buffer.clear()
        return tail

    def _give_up(self, pieces: list[AmqpFrame | bytes]) -> list[AmqpFrame | bytes]:
        """Pass the rest on unparsed, from now on."""
        _log.warning("not an AMQP 0-9-1 client stream: passing it on unparsed")
        self.raw = True
        if self._buffer:
            pieces.append(bytes(self._buffer))
            self._buffer.clear()
        return pieces


class FrameCut:
    """A one-shot cut armed by :meth:`TcpProxy.cut_after_frame`; tells when it happened."""

    def __init__(self, match: Callable[[AmqpFrame], bool], *, before: bool) -> None:
        self.match = match
        self.before = before
        self.frame: AmqpFrame | None = None
        """The frame that set it off (passed on, or swallowed if ``before``)."""
        self._fired = threading.Event()

    def __repr__(self) -> str:
        state = "fired" if self.fired else "armed"
        return f"<FrameCut {'before' if self.before else 'after'} {state}>"

    @property
    def fired(self) -> bool:
        """Whether the frame came and the connections were cut."""
        return self._fired.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the cut happened (True), or timeout seconds passed (False)."""
        return self._fired.wait(timeout)

    def _fire(self, frame: AmqpFrame) -> None:
        self.frame = frame
        self._fired.set()


def _unacknowledged_bytes(writer: asyncio.StreamWriter) -> int:
    """Bytes in the kernel's send queue of the writer's socket that the peer has not acknowledged."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return 0
    try:
        answer = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")  # SIOCOUTQ on Linux
    except OSError:
        return 0
    return int(struct.unpack("i", answer)[0])


async def _delivered(writer: asyncio.StreamWriter) -> None:
    """Wait (up to 1 s) until what was written left this process and the peer's TCP acknowledged it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _FLUSH_TIMEOUT
    with contextlib.suppress(OSError):
        await writer.drain()
    transport = writer.transport
    while loop.time() < deadline and not transport.is_closing():
        if transport.get_write_buffer_size() == 0 and _unacknowledged_bytes(writer) == 0:
            return
        await asyncio.sleep(0.001)


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
        *,
        amqp: bool = False,
    ) -> None:
        self.ssl = ssl  # when set, clients speak TLS to the proxy (it terminates TLS)
        self.amqp = amqp  # when set, client bytes are split into AMQP frames (cut_after_frame)
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
        # Set while stopping: a client accepted after the connections were cut is turned away,
        # or its connections would outlive the loop and be garbage collected unclosed later, in
        # some other test (a ResourceWarning, an error under filterwarnings).
        self._stopping = False
        self._open = 0
        self._frame_cut: FrameCut | None = None

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
        self._stopping = False
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

    def cut_after_frame(self, match: Callable[[AmqpFrame], bool], *, before: bool = False) -> FrameCut:
        """Arm a one-shot cut at the next client->target frame ``match`` accepts (needs ``amqp=True``).

        On any connection, that frame is passed on and the target's TCP acknowledges it
        (``before=False``: the target has the frame), or it is swallowed (``before=True``, with
        whatever came after it in the same read); then every connection is cut at once (both
        sides, like :meth:`cut`).  ``match`` runs on the proxy thread.  Arming again replaces a
        cut that has not fired yet.  Returns the cut, to wait for it.
        """
        if not self.amqp:
            raise RuntimeError("cut_after_frame needs TcpProxy(..., amqp=True)")
        frame_cut = FrameCut(match, before=before)

        async def arm() -> FrameCut:
            self._frame_cut = frame_cut
            return frame_cut

        return self._call(arm)

    def arm_ack_cut(self, *, before: bool = False) -> FrameCut:
        """Cut every connection right after (or instead of) the next basic.ack a client sends."""
        return self.cut_after_frame(is_basic_ack, before=before)

    def disarm(self) -> None:
        """Forget a cut that has not fired yet."""

        async def disarm() -> None:
            self._frame_cut = None

        self._call(disarm)

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
                # A TLS handshake still in progress (asyncio's accept task, which the server does
                # not track) would be destroyed pending with its socket open: cancel it, and let
                # its transport close, before the loop closes.
                pending = asyncio.all_tasks(loop)
                for task in pending:
                    task.cancel()
                loop.run_until_complete(asyncio.gather(*pending, asyncio.sleep(0.01), return_exceptions=True))
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
        if self._blocked or self._stopping:
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
                upstream = (
                    self._pipe_frames(client_reader, connection.target, connection)
                    if self.amqp
                    else self._pipe(client_reader, connection.target, connection)
                )
                results = await asyncio.gather(
                    upstream, self._pipe(target_reader, connection.client, connection)
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

    async def _pipe_frames(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, connection: _Connection
    ) -> bool:
        """Like :meth:`_pipe`, a whole AMQP frame at a time, carrying out an armed frame cut."""
        splitter = AmqpFrameSplitter()
        try:
            while data := await source.read(CHUNK_SIZE):
                out: list[bytes] = []
                for piece in splitter.feed(data):
                    if isinstance(piece, bytes):
                        out.append(piece)
                        continue
                    frame_cut = self._frame_cut
                    if frame_cut is None or not frame_cut.match(piece):
                        out.append(piece.data)
                        continue
                    self._frame_cut = None
                    if not frame_cut.before:
                        out.append(piece.data)
                    if out:
                        sink.write(b"".join(out))
                        await _delivered(sink)
                    self._abort_all()
                    frame_cut._fire(piece)
                    return False
                if out:
                    sink.write(b"".join(out))
                    await sink.drain()
            if tail := splitter.rest():  # a torn last frame: pass it on as it came
                sink.write(tail)
            if sink.can_write_eof() and not sink.is_closing():
                sink.write_eof()
        except OSError:  # reset by either peer, or cut() under our feet
            connection.abort()
            return False
        return True

    def _abort_all(self) -> None:
        """Cut every connection at once without waiting (callable from a connection's own task)."""
        for connection in list(self._connections):
            connection.abort()
            if connection.task is not None:
                connection.task.cancel()

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
        self._stopping = True
        server = self._server
        if server is not None:
            server.close()
        await self._cut()
        if server is not None:
            await server.wait_closed()
        await self._cut()  # any accepted while the first cut was awaited
