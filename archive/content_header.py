"""Received frames read the archive's way, on the archive's own connections only.

pamqp (under aiormq) turns a content header's property table into Python values, losing the
AMQP field types (integer widths, float vs double, byte arrays), and decodes the names in
`basic.deliver`/`basic.return` as strict UTF-8, so one producer sending a routing key that is
not UTF-8 would break the connection on every redelivery. The archive keeps the property
bytes exactly as the broker sent them (decoded by archive.amqp_codec when needed) and names
with surrogate escapes (archive.records.name_columns gives back their bytes).

Nothing global is replaced: `RawFrames` wraps the frame receiver of one connection
(archive.frames.Connection), and every other AMQP client in the process decodes as before.
"""

import asyncio
import struct
from typing import Any

import aiormq.exceptions
import pamqp.frame
from pamqp import commands, constants, header
from pamqp.exceptions import PAMQPException

_HEADER_PREFIX = struct.Struct(">HHQ")
_FRAME_PREFIX = struct.Struct(">BHI")
_METHOD_ID = struct.Struct(">HH")
_U16 = struct.Struct(">H")
_U64 = struct.Struct(">Q")
_DELIVER = (60, 60)
_RETURN = (60, 50)
_GET_OK = (60, 71)


class RawContentHeader(header.ContentHeader):
    """A content header that carries its property bytes as received (`raw_properties`)."""

    raw_properties: bytes


def raw_properties(content_header: header.ContentHeader) -> bytes:
    """The property bytes of a header received on an archive connection."""
    raw: bytes = content_header.raw_properties  # type: ignore[attr-defined]
    return raw


class _Reader:
    """Reads short strings and integers from a method frame's arguments."""

    def __init__(self, data: bytes, position: int) -> None:
        self.data = data
        self.position = position

    def shortstr(self) -> str:
        length = self.data[self.position]
        start = self.position + 1
        self.position = start + length
        if self.position > len(self.data):
            raise ValueError("short string runs past the frame")
        return self.data[start : self.position].decode("utf-8", "surrogateescape")

    def u16(self) -> int:
        (value,) = _U16.unpack_from(self.data, self.position)
        self.position += 2
        return int(value)

    def u64(self) -> int:
        (value,) = _U64.unpack_from(self.data, self.position)
        self.position += 8
        return int(value)

    def octet(self) -> int:
        value = self.data[self.position]
        self.position += 1
        return value


def _method(payload: bytes) -> Any:
    """basic.deliver, basic.return and basic.get-ok with names kept as surrogate-escaped text."""
    ids = _METHOD_ID.unpack_from(payload, 0)
    read = _Reader(payload, 4)
    if ids == _DELIVER:
        frame: Any = commands.Basic.Deliver.__new__(commands.Basic.Deliver)
        frame.consumer_tag = read.shortstr()
        frame.delivery_tag = read.u64()
        frame.redelivered = bool(read.octet() & 1)
        frame.exchange = read.shortstr()
        frame.routing_key = read.shortstr()
        return frame
    if ids == _RETURN:
        frame = commands.Basic.Return.__new__(commands.Basic.Return)
        frame.reply_code = read.u16()
        frame.reply_text = read.shortstr()
        frame.exchange = read.shortstr()
        frame.routing_key = read.shortstr()
        return frame
    if ids == _GET_OK:
        frame = commands.Basic.GetOk.__new__(commands.Basic.GetOk)
        frame.delivery_tag = read.u64()
        frame.redelivered = bool(read.octet() & 1)
        frame.exchange = read.shortstr()
        frame.routing_key = read.shortstr()
        (frame.message_count,) = struct.unpack_from(">I", payload, read.position)
        return frame
    return None


def unmarshal(data: bytes) -> tuple[int, int, Any]:
    """One whole frame (prefix to frame-end) the archive's way; others as pamqp decodes them."""
    frame_type, channel, size = _FRAME_PREFIX.unpack_from(data, 0)
    payload = data[7 : 7 + size]
    try:
        if frame_type == constants.FRAME_HEADER:
            content = RawContentHeader()
            content.class_id, content.weight, content.body_size = _HEADER_PREFIX.unpack_from(payload, 0)
            content.raw_properties = bytes(payload[12:])
            return len(data), channel, content
        if frame_type == constants.FRAME_METHOD:
            method = _method(payload)
            if method is not None:
                return len(data), channel, method
    except (struct.error, IndexError, ValueError) as error:
        raise aiormq.exceptions.InvalidFrameError(f"malformed frame: {error}") from None
    try:
        return pamqp.frame.unmarshal(data)
    except PAMQPException as error:
        raise aiormq.exceptions.InvalidFrameError(str(error)) from error


class RawFrames:
    """aiormq's frame receiver for one connection, decoding with `unmarshal` above."""

    def __init__(self, receiver: Any) -> None:
        self._reader: asyncio.StreamReader = receiver.reader
        self._lock: asyncio.Lock = receiver.lock

    def __aiter__(self) -> "RawFrames":
        return self

    async def __anext__(self) -> tuple[int, int, Any]:
        return await self.get_frame()

    async def get_frame(self) -> tuple[int, int, Any]:
        """The next frame; the same errors as aiormq's own receiver."""
        if self._reader.at_eof():
            raise StopAsyncIteration
        async with self._lock:
            try:
                prefix = await self._reader.readexactly(7)
                _, _, size = _FRAME_PREFIX.unpack(prefix)
                rest = await self._reader.readexactly(size + 1)
            except asyncio.IncompleteReadError as error:
                raise aiormq.exceptions.AMQPConnectionError(
                    f"Server connection unexpectedly closed. Read {len(error.partial)} bytes "
                    f"but {error.expected} bytes expected"
                ) from error
            except OSError as error:
                raise aiormq.exceptions.AMQPConnectionError(f"communication error: {error!r}") from error
        return unmarshal(prefix + rest)
