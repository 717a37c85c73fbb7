"""Tests for the fault-injecting TCP proxy in tests/support/proxy.py (no broker, no database)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import threading
from asyncio import StreamReader, StreamWriter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

import pytest

from tests.support.proxy import CHUNK_SIZE, TcpProxy

pytestmark = pytest.mark.timeout(10)

LOCALHOST = "127.0.0.1"


@dataclass
class EchoServer:
    """An asyncio echo server running on the test's event loop."""

    port: int = 0
    accepted: int = 0
    writers: set[StreamWriter] = field(default_factory=set)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def open(self) -> int:
        return len(self.writers)

    async def handle(self, reader: StreamReader, writer: StreamWriter) -> None:
        self.accepted += 1
        self.writers.add(writer)
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            while data := await reader.read(CHUNK_SIZE):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            self.writers.discard(writer)


@pytest.fixture
async def echo() -> AsyncIterator[EchoServer]:
    state = EchoServer()
    server = await asyncio.start_server(state.handle, LOCALHOST, 0)
    state.port = server.sockets[0].getsockname()[1]
    try:
        yield state
    finally:
        server.close()
        for writer in list(state.writers):
            writer.transport.abort()
        await asyncio.gather(*state.tasks, return_exceptions=True)
        await server.wait_closed()


@pytest.fixture
def proxy(echo: EchoServer) -> Iterator[TcpProxy]:
    with TcpProxy(LOCALHOST, echo.port) as running:
        yield running


@contextlib.asynccontextmanager
async def connect(port: int) -> AsyncIterator[tuple[StreamReader, StreamWriter]]:
    reader, writer = await asyncio.open_connection(LOCALHOST, port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def roundtrip(reader: StreamReader, writer: StreamWriter, payload: bytes) -> bytes:
    writer.write(payload)
    await writer.drain()
    return await asyncio.wait_for(reader.readexactly(len(payload)), 5)


async def closed_by_peer(reader: StreamReader) -> bool:
    """Whether the other end closes (EOF) or resets the connection within 5 s."""
    try:
        data = await asyncio.wait_for(reader.read(1), 5)
    except ConnectionError:
        return True
    return data == b""


async def wait_until(predicate: Callable[[], bool]) -> None:
    for _ in range(500):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met within 5 s")


def sock_closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionError:
        return True


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def closed_port() -> int:
    """A local port nothing listens on (any more)."""
    with socket.socket() as sock:
        sock.bind((LOCALHOST, 0))
        port: int = sock.getsockname()[1]
    return port


def proxy_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("TcpProxy")]


async def test_forwards_bytes_both_ways(proxy: TcpProxy, echo: EchoServer) -> None:
    async with connect(proxy.port) as (reader, writer):
        assert await roundtrip(reader, writer, b"hello") == b"hello"
        assert proxy.connection_count == 1
        assert echo.accepted == 1

        # Several chunks' worth in one go, so reads split and backpressure kicks in.
        big = random.randbytes(16 * CHUNK_SIZE + 123)
        assert await roundtrip(reader, writer, big) == big

        async with connect(proxy.port) as (reader2, writer2):
            assert await roundtrip(reader2, writer2, b"second") == b"second"
            assert proxy.connection_count == 2
            assert await roundtrip(reader, writer, b"first") == b"first"

        await wait_until(lambda: proxy.connection_count == 1)
    await wait_until(lambda: proxy.connection_count == 0 and echo.open == 0)


async def test_half_close_is_passed_on(proxy: TcpProxy, echo: EchoServer) -> None:
    async with connect(proxy.port) as (reader, writer):
        writer.write(b"last words")
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 5) == b"last words"
    await wait_until(lambda: proxy.connection_count == 0 and echo.open == 0)


async def test_cut_breaks_open_connections(proxy: TcpProxy, echo: EchoServer) -> None:
    async with connect(proxy.port) as (r1, w1), connect(proxy.port) as (r2, w2):
        assert await roundtrip(r1, w1, b"one") == b"one"
        assert await roundtrip(r2, w2, b"two") == b"two"
        assert proxy.connection_count == 2

        proxy.cut()

        assert proxy.connection_count == 0
        assert await closed_by_peer(r1)
        assert await closed_by_peer(r2)
        await wait_until(lambda: echo.open == 0)  # the target side is closed too

    assert not proxy.blocked
    async with connect(proxy.port) as (reader, writer):
        assert await roundtrip(reader, writer, b"again") == b"again"
    assert echo.accepted == 3


async def test_block_refuses_until_unblock(proxy: TcpProxy, echo: EchoServer) -> None:
    async with connect(proxy.port) as (reader, writer):
        assert await roundtrip(reader, writer, b"before") == b"before"

        proxy.block()

        assert proxy.blocked
        assert proxy.connection_count == 0
        assert await closed_by_peer(reader)

    for _ in range(3):
        async with connect(proxy.port) as (reader, writer):
            writer.write(b"anyone there?")
            assert await closed_by_peer(reader)
    assert echo.accepted == 1
    assert proxy.connection_count == 0

    proxy.unblock()

    assert not proxy.blocked
    async with connect(proxy.port) as (reader, writer):
        assert await roundtrip(reader, writer, b"after") == b"after"
        assert proxy.connection_count == 1
    assert echo.accepted == 2


async def test_stop_closes_everything(echo: EchoServer) -> None:
    proxy = TcpProxy(LOCALHOST, echo.port)
    proxy.start()
    port = proxy.port
    assert len(proxy_threads()) == 1
    async with connect(port) as (reader, writer):
        assert await roundtrip(reader, writer, b"ping") == b"ping"

        proxy.stop()

        assert await closed_by_peer(reader)
    assert proxy_threads() == []
    await wait_until(lambda: echo.open == 0)
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection(LOCALHOST, port)
    proxy.stop()  # a second stop is harmless


def test_target_refusing_closes_the_client() -> None:
    with (
        TcpProxy(LOCALHOST, closed_port()) as proxy,
        socket.create_connection((LOCALHOST, proxy.port), timeout=5) as client,
    ):
        assert sock_closed_by_peer(client)
        assert proxy.connection_count == 0


def test_forwards_while_the_caller_blocks() -> None:
    """Driven from plain blocking code: the proxy thread does the forwarding."""
    with (
        socket.create_server((LOCALHOST, 0)) as listener,
        TcpProxy(LOCALHOST, listener.getsockname()[1]) as proxy,
        socket.create_connection((LOCALHOST, proxy.port), timeout=5) as client,
    ):
        listener.settimeout(5)
        target_side, _ = listener.accept()
        with target_side:
            target_side.settimeout(5)
            client.sendall(b"ping")
            assert recv_exactly(target_side, 4) == b"ping"
            target_side.sendall(b"pong")
            assert recv_exactly(client, 4) == b"pong"
            assert proxy.connection_count == 1

            proxy.cut()

            assert proxy.connection_count == 0
            assert sock_closed_by_peer(client)
            assert sock_closed_by_peer(target_side)
    assert proxy_threads() == []


def test_needs_start() -> None:
    proxy = TcpProxy(LOCALHOST, 1)
    with pytest.raises(RuntimeError, match="not started"):
        _ = proxy.port
    with pytest.raises(RuntimeError, match="not started"):
        proxy.cut()
    proxy.stop()  # stopping a proxy that never started is a no-op
    assert proxy.connection_count == 0
