"""Tests for the fault-injecting TCP proxy in tests/support/proxy.py (no broker, no database)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import random
import socket
import struct
import threading
import time
import warnings
from asyncio import StreamReader, StreamWriter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.proxy import (
    BASIC_ACK,
    CHUNK_SIZE,
    PROTOCOL_HEADER,
    AmqpFrame,
    AmqpFrameSplitter,
    TcpProxy,
)
from tests.support.tls import make_certificates

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


async def ended_by_peer(reader: StreamReader) -> bool:
    """Whether the other end closes (EOF) or resets the connection within 5 s, whatever it sent first."""
    try:
        await asyncio.wait_for(reader.read(), 5)
    except ConnectionError:
        return True
    except TimeoutError:
        return False
    return True


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


# ---------------------------------------------------------------------- AMQP frames


def amqp_frame(kind: int, channel: int, payload: bytes) -> bytes:
    return struct.pack(">BHI", kind, channel, len(payload)) + payload + b"\xce"


def method_frame(channel: int, class_id: int, method_id: int, arguments: bytes = b"") -> bytes:
    return amqp_frame(1, channel, struct.pack(">HH", class_id, method_id) + arguments)


def basic_ack(channel: int, tag: int) -> bytes:
    return method_frame(channel, 60, 80, struct.pack(">QB", tag, 1))


def basic_qos(channel: int) -> bytes:
    return method_frame(channel, 60, 10, struct.pack(">IHB", 0, 100, 0))


HEARTBEAT = amqp_frame(8, 0, b"")


def some_frames(count: int) -> list[bytes]:
    """Method, header, body and heartbeat frames, acks among them, of all sizes up to 200 kB."""
    frames = []
    for index in range(count):
        match index % 5:
            case 0:
                frames.append(basic_ack(1, index))
            case 1:
                frames.append(basic_qos(1))
            case 2:
                frames.append(amqp_frame(2, 1, random.randbytes(random.randrange(14, 200))))
            case 3:
                frames.append(amqp_frame(3, 1, random.randbytes(random.choice([0, 1, 5000, 200_000]))))
            case _:
                frames.append(HEARTBEAT)
    return frames


def random_splits(data: bytes) -> list[bytes]:
    """The data in pieces of 1 byte to 3 frames' worth."""
    pieces, offset = [], 0
    while offset < len(data):
        size = random.choice([1, 2, 3, 7, 8, 11, 100, 4096, 70_000])
        pieces.append(data[offset : offset + size])
        offset += size
    return pieces


def feed_all(splitter: AmqpFrameSplitter, pieces: list[bytes]) -> list[AmqpFrame | bytes]:
    out: list[AmqpFrame | bytes] = []
    for piece in pieces:
        out.extend(splitter.feed(piece))
    return out


def joined(pieces: list[AmqpFrame | bytes]) -> bytes:
    return b"".join(p.data if isinstance(p, AmqpFrame) else p for p in pieces)


def test_frame_fields() -> None:
    ack = AmqpFrame(basic_ack(7, 42))
    assert (ack.type, ack.channel, ack.method) == (1, 7, BASIC_ACK)
    assert ack.payload == struct.pack(">HHQB", 60, 80, 42, 1)
    assert AmqpFrame(basic_qos(1)).method == (60, 10)
    assert AmqpFrame(HEARTBEAT).method is None
    assert AmqpFrame(amqp_frame(3, 1, b"\x00\x3c\x00\x50")).method is None  # a body is no method
    assert AmqpFrame(amqp_frame(1, 1, b"\x00")).method is None  # too short to name one


@pytest.mark.parametrize("seed", range(20))
def test_splitter_finds_every_frame_however_the_stream_is_cut(seed: int) -> None:
    random.seed(seed)
    frames = some_frames(40)
    stream = PROTOCOL_HEADER + b"".join(frames)
    splitter = AmqpFrameSplitter()

    out = feed_all(splitter, random_splits(stream))

    assert out[0] == PROTOCOL_HEADER
    assert [p.data for p in out[1:] if isinstance(p, AmqpFrame)] == frames
    assert joined(out) == stream
    assert splitter.pending == 0
    assert not splitter.raw


def test_splitter_holds_a_torn_frame_back_until_it_is_complete() -> None:
    splitter = AmqpFrameSplitter()
    ack = basic_ack(1, 9)
    assert splitter.feed(PROTOCOL_HEADER[:5]) == []
    assert splitter.feed(PROTOCOL_HEADER[5:] + ack[:3]) == [PROTOCOL_HEADER]
    assert splitter.pending == 3
    for byte in ack[3:-1]:
        assert splitter.feed(bytes([byte])) == []
    assert splitter.feed(ack[-1:] + HEARTBEAT[:1]) == [AmqpFrame(ack)]
    assert splitter.rest() == HEARTBEAT[:1]
    assert splitter.pending == 0


@pytest.mark.parametrize(
    "stream",
    [
        b"GET / HTTP/1.1\r\n\r\n" + basic_ack(1, 1),  # not AMQP at all
        PROTOCOL_HEADER + basic_ack(1, 1) + b"\x09" + basic_ack(1, 2)[1:],  # no such frame type
        PROTOCOL_HEADER + basic_ack(1, 1) + b"\x03\x00\x01\xff\xff\xff\xff",  # 4 GB announced
        PROTOCOL_HEADER + basic_ack(1, 1) + basic_ack(1, 2)[:-1] + b"\x00" + basic_ack(1, 3),  # bad frame-end
    ],
    ids=["no-header", "bad-type", "bad-size", "bad-frame-end"],
)
def test_splitter_passes_what_is_not_amqp_framing_on_unparsed(stream: bytes) -> None:
    splitter = AmqpFrameSplitter()

    out = feed_all(splitter, [stream[:9], stream[9:30], stream[30:]])

    assert splitter.raw
    assert joined(out) == stream
    assert len([p for p in out if isinstance(p, AmqpFrame)]) <= 1


@dataclass
class RecordingServer:
    """A server on the test's event loop that keeps what each connection sent until it ended."""

    port: int = 0
    received: list[bytearray] = field(default_factory=list)
    ended: list[asyncio.Event] = field(default_factory=list)
    writers: set[StreamWriter] = field(default_factory=set)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def handle(self, reader: StreamReader, writer: StreamWriter) -> None:
        data, ended = bytearray(), asyncio.Event()
        self.received.append(data)
        self.ended.append(ended)
        self.writers.add(writer)
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            writer.write(b"hello from the target")  # unread data on the proxy side: a cut is a reset
            while chunk := await reader.read(CHUNK_SIZE):
                data += chunk
        except OSError:
            pass
        finally:
            ended.set()
            writer.transport.abort()
            self.writers.discard(writer)

    async def wait_connections(self, count: int) -> None:
        await wait_until(lambda: len(self.received) >= count)

    async def wait_received(self, index: int, size: int) -> None:
        await wait_until(lambda: len(self.received[index]) >= size)


@pytest.fixture
async def recorder() -> AsyncIterator[RecordingServer]:
    state = RecordingServer()
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
def amqp_proxy(recorder: RecordingServer) -> Iterator[TcpProxy]:
    with TcpProxy(LOCALHOST, recorder.port, amqp=True) as running:
        yield running


@pytest.fixture
def amqp_echo_proxy(echo: EchoServer) -> Iterator[TcpProxy]:
    with TcpProxy(LOCALHOST, echo.port, amqp=True) as running:
        yield running


async def test_amqp_mode_forwards_byte_exact_both_ways(amqp_echo_proxy: TcpProxy, echo: EchoServer) -> None:
    random.seed(7)
    stream = PROTOCOL_HEADER + b"".join(some_frames(60))
    async with connect(amqp_echo_proxy.port) as (reader, writer):
        for piece in random_splits(stream):
            writer.write(piece)
        await writer.drain()
        assert await asyncio.wait_for(reader.readexactly(len(stream)), 5) == stream
        # Not AMQP framing any more (no such frame type): still passed on byte for byte.
        junk = b"\xff" + random.randbytes(3 * CHUNK_SIZE)
        assert await roundtrip(reader, writer, junk) == junk


@pytest.mark.parametrize("before", [False, True], ids=["after", "before"])
async def test_ack_cut_passes_or_swallows_the_ack_then_cuts_every_connection(
    amqp_proxy: TcpProxy, recorder: RecordingServer, before: bool
) -> None:
    earlier = PROTOCOL_HEADER + basic_qos(1) + HEARTBEAT + amqp_frame(3, 1, random.randbytes(9000))
    ack = basic_ack(1, 5)
    later = basic_qos(1) + basic_ack(1, 6)
    async with (
        connect(amqp_proxy.port) as (reader, writer),
        connect(amqp_proxy.port) as (other_reader, other_writer),
    ):
        other_writer.write(PROTOCOL_HEADER + HEARTBEAT)
        await recorder.wait_connections(2)
        writer.write(earlier)
        await recorder.wait_received(0, len(earlier))
        assert amqp_proxy.connection_count == 2

        cut = amqp_proxy.arm_ack_cut(before=before)
        assert not cut.fired
        writer.write(HEARTBEAT[:3])  # the ack arrives in pieces, behind a torn frame
        await asyncio.sleep(0.05)
        writer.write(HEARTBEAT[3:] + ack[:6])
        await asyncio.sleep(0.05)
        assert not cut.fired
        writer.write(ack[6:] + later)
        await wait_until(lambda: cut.fired)

        assert cut.frame == AmqpFrame(ack)
        # Every connection is cut; their tasks finish closing a moment after the cut fires.
        await wait_until(lambda: amqp_proxy.connection_count == 0)
        assert await ended_by_peer(reader)
        assert await ended_by_peer(other_reader)
        await asyncio.wait_for(recorder.ended[0].wait(), 5)
        await asyncio.wait_for(recorder.ended[1].wait(), 5)
        expected = earlier + HEARTBEAT + (b"" if before else ack)
        assert bytes(recorder.received[0]) == expected  # nothing after the ack, ever

    # One shot: the next ack passes, on a new connection.
    async with connect(amqp_proxy.port) as (reader, writer):
        writer.write(PROTOCOL_HEADER + ack + later)
        await recorder.wait_connections(3)
        await recorder.wait_received(2, len(PROTOCOL_HEADER + ack + later))
        assert amqp_proxy.connection_count == 1
    assert not amqp_proxy.blocked


async def test_cut_after_any_frame_and_disarm(amqp_proxy: TcpProxy, recorder: RecordingServer) -> None:
    async with connect(amqp_proxy.port) as (reader, writer):
        writer.write(PROTOCOL_HEADER)
        await recorder.wait_connections(1)
        disarmed = amqp_proxy.arm_ack_cut()
        amqp_proxy.disarm()
        writer.write(basic_ack(1, 1))
        await recorder.wait_received(0, len(PROTOCOL_HEADER) + len(basic_ack(1, 1)))
        assert not disarmed.fired

        cut = amqp_proxy.cut_after_frame(lambda frame: frame.channel == 2 and frame.type == 3)
        writer.write(amqp_frame(3, 1, b"x") + amqp_frame(3, 2, b"y") + amqp_frame(3, 2, b"z"))
        await wait_until(lambda: cut.fired)
        assert await ended_by_peer(reader)
        await asyncio.wait_for(recorder.ended[0].wait(), 5)
        assert bytes(recorder.received[0]).endswith(amqp_frame(3, 1, b"x") + amqp_frame(3, 2, b"y"))


def test_frame_cuts_need_amqp_mode(proxy: TcpProxy) -> None:
    with pytest.raises(RuntimeError, match="amqp=True"):
        proxy.arm_ack_cut()


def test_stop_during_a_tls_handshake_leaves_nothing_pending_or_open(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that connects and never finishes the handshake (as a failed certificate check
    can leave it): asyncio's accept task waits in it, untracked by the server."""
    certificates = make_certificates(tmp_path)
    with socket.create_server((LOCALHOST, 0)) as listener, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        with TcpProxy(LOCALHOST, listener.getsockname()[1], ssl=certificates.server_context()) as proxy:
            clients = [socket.create_connection((LOCALHOST, proxy.port), timeout=5) for _ in range(2)]
            client_ports = {client.getsockname()[1] for client in clients}
            time.sleep(0.3)  # accepted: their handshakes wait for a ClientHello that never comes
        gc.collect()
        for client in clients:
            client.close()
    assert "Task was destroyed but it is pending" not in caplog.text
    leaked = [str(warning.message) for warning in caught if issubclass(warning.category, ResourceWarning)]
    assert not [
        message
        for message in leaked
        if any(f"raddr=('127.0.0.1', {port})" in message for port in client_ports)
    ]
    assert not [message for message in leaked if "unclosed transport" in message]
