"""The daemon's AMQP socket with a tap: stop reading while too many bytes wait to be stored.

RabbitMQ applies basic.qos only to consumers started after it, and a quorum queue has no
channel-wide byte limit, so prefetch alone cannot bound memory when messages are large.
Not reading the socket can: the broker's further deliveries wait in TCP buffers and in the
queue (backpressure) until the daemon has committed and acknowledged what it holds.
"""

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

import aiormq
from aiormq.connection import TCPTransportFactory, TLSTransportFactory
from yarl import URL


class ReadGate(aiormq.TransportFactory):
    """Opens the AMQP connection's socket (TCP or TLS) and can pause and resume reading it."""

    def __init__(self, tls: bool) -> None:
        self._inner: aiormq.TransportFactory = TLSTransportFactory() if tls else TCPTransportFactory()
        self._transport: Any = None
        self._resume_reading: Any = None
        self._held_open = 0
        self.paused = False

    async def create(self, url: URL, **kwargs: Any) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Open the socket, remembering its transport."""
        reader, writer = await self._inner.create(url, **kwargs)
        transport: Any = writer.transport
        # The stream reader pauses and resumes the transport for its own 64 KB buffer; while
        # the gate is closed its resume must not reopen the socket.
        self._resume_reading = transport.resume_reading

        def resume_unless_gated() -> None:
            if not self.paused:
                self._resume_reading()

        transport.resume_reading = resume_unless_gated
        self._transport = transport
        self.paused = False
        return reader, writer

    def pause(self) -> None:
        """Stop reading, unless a request awaits its reply (see held_open)."""
        if self._held_open:
            return
        if self._transport is not None and not self.paused and not self._transport.is_closing():
            self._transport.pause_reading()
            self.paused = True

    @contextlib.contextmanager
    def held_open(self) -> Iterator[None]:
        """Keep reading while a request awaits its reply: the reply may sit behind deliveries."""
        self._held_open += 1
        self.resume()
        try:
            yield
        finally:
            self._held_open -= 1

    def resume(self) -> None:
        """Read again."""
        if self._transport is not None and self.paused:
            self.paused = False
            if not self._transport.is_closing():
                self._resume_reading()
