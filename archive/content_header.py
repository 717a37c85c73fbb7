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
import logging
import struct
from collections.abc import Callable
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

log = logging.getLogger(__name__)


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


# Called for each delivery to a consumer registered with RawFrames.deliver_directly:
# (delivery_tag, redelivered, exchange, routing_key, property bytes, body).
DirectCallback = Callable[[int, bool, str, str, bytes, bytes], None]
# Bytes asked of the socket per read: many deliveries per read, one read per await.
READ_SIZE = 256 * 1024
_FRAME_END = 0xCE
_DELIVER_ID = _METHOD_ID.pack(*_DELIVER)
_DELIVER_FIELDS = struct.Struct(">QB")


class _Content:
    """A delivery to a direct consumer whose header or body frames are still to come."""

    __slots__ = ("body_size", "callback", "delivery", "parts", "properties", "received")

    def __init__(self, callback: DirectCallback, delivery: tuple[int, bool, str, str]) -> None:
        self.callback = callback
        self.delivery = delivery
        self.properties: bytes | None = None
        self.body_size = 0
        self.received = 0
        self.parts: list[bytes] = []


class RawFrames:
    """aiormq's frame receiver for one connection, decoding with `unmarshal` above.

    It reads the socket in bulk (up to READ_SIZE bytes per read) and parses every whole frame
    those bytes hold. Deliveries to a consumer registered with `deliver_directly` never become
    frames for aiormq: their method, header and body frames are parsed here, with struct on the
    bytes as read, and the consumer's function is called with the delivery's fields at once, in
    the order the broker sent them. Every other frame goes to aiormq, one per `get_frame`.
    AMQP lets another channel's frames come between a delivery's own, so a delivery's content is
    collected per channel.
    """

    def __init__(self, receiver: Any, on_frames_read: Callable[[], None] | None = None) -> None:
        self._reader: asyncio.StreamReader = receiver.reader
        self._lock: asyncio.Lock = receiver.lock
        # Called after direct deliveries were read: aiormq counts the time since the last frame it
        # saw to tell a stuck connection, and it sees none of those.
        self._on_frames_read = on_frames_read
        self._data = b""
        self._position = 0
        # Per channel, the direct consumers by their tag's bytes (as a deliver frame carries it).
        self._direct: dict[int, dict[bytes, DirectCallback]] = {}
        self._content: dict[int, _Content] = {}

    def __aiter__(self) -> "RawFrames":
        return self

    async def __anext__(self) -> tuple[int, int, Any]:
        return await self.get_frame()

    def deliver_directly(self, channel: int, consumer_tag: str, callback: DirectCallback) -> None:
        """From now on, call `callback` for each delivery to `consumer_tag` on `channel`."""
        self._direct.setdefault(channel, {})[consumer_tag.encode("utf-8", "surrogateescape")] = callback

    def stop_delivering(self, channel: int, consumer_tag: str) -> None:
        """Forget a direct consumer (its channel closed); a delivery half read is dropped."""
        consumers = self._direct.get(channel, {})
        consumers.pop(consumer_tag.encode("utf-8", "surrogateescape"), None)
        if not consumers:
            self._direct.pop(channel, None)
            self._content.pop(channel, None)

    async def get_frame(self) -> tuple[int, int, Any]:
        """The next frame for aiormq; the same errors as aiormq's own receiver."""
        while True:
            frame = self._parse()
            if frame is not None:
                return frame
            await self._read()

    async def _read(self) -> None:
        rest = self._data[self._position :]
        if not rest and not self._content and self._reader.at_eof():
            raise StopAsyncIteration
        async with self._lock:
            try:
                chunk = await self._reader.read(READ_SIZE)
            except OSError as error:
                raise aiormq.exceptions.AMQPConnectionError(f"communication error: {error!r}") from error
        if not chunk:
            raise aiormq.exceptions.AMQPConnectionError(
                f"Server connection unexpectedly closed, {len(rest)} bytes into a frame"
                + (" or inside a delivery" if self._content else "")
            )
        self._data = rest + chunk if rest else chunk
        self._position = 0

    def _parse(self) -> tuple[int, int, Any] | None:
        """The next frame for aiormq among the bytes read, after every direct delivery before it;
        None when the bytes end first."""
        data = self._data
        position = self._position
        length = len(data)
        content = self._content
        direct = self._direct
        read_directly = False
        frame: tuple[int, int, Any] | None = None
        try:
            while position + 8 <= length:
                frame_type, channel, size = _FRAME_PREFIX.unpack_from(data, position)
                start = position + 7
                end = start + size
                if end >= length:
                    break
                if data[end] != _FRAME_END:
                    raise aiormq.exceptions.InvalidFrameError("malformed frame: no frame-end octet")
                pending = content.get(channel)
                if pending is not None:
                    position = end + 1
                    read_directly = True
                    self._add_content(channel, pending, frame_type, data, start, end)
                    continue
                if (
                    frame_type == constants.FRAME_METHOD
                    and channel in direct
                    and data[start : start + 4] == _DELIVER_ID
                ):
                    after = self._deliver(channel, data, start, end)
                    if after is not None:
                        position = after
                        read_directly = True
                        continue
                frame = unmarshal(data[position : end + 1])
                position = end + 1
                break
        except (struct.error, IndexError, ValueError) as error:
            raise aiormq.exceptions.InvalidFrameError(f"malformed frame: {error}") from None
        finally:
            self._position = position
            if read_directly and self._on_frames_read is not None:
                self._on_frames_read()
        return frame

    def _deliver(self, channel: int, data: bytes, start: int, end: int) -> int | None:
        """A basic.deliver whose arguments are data[start:end]: None when it is not for a direct
        consumer, else the position after what was read of it.

        Its header and its one body frame usually follow at once in the same read: they are
        parsed here and the consumer called. Otherwise (a body of several frames, another
        channel's frame in between, bytes still to come) the content is collected frame by frame.
        """
        position = start + 4
        tag_end = position + 1 + data[position]
        callback = self._direct[channel].get(data[position + 1 : tag_end])
        if callback is None:
            return None
        delivery_tag, flags = _DELIVER_FIELDS.unpack_from(data, tag_end)
        position = tag_end + _DELIVER_FIELDS.size
        exchange_end = position + 1 + data[position]
        routing_key_end = exchange_end + 1 + data[exchange_end]
        if routing_key_end > end:
            raise ValueError("short string runs past the frame")
        exchange = data[position + 1 : exchange_end].decode("utf-8", "surrogateescape")
        routing_key = data[exchange_end + 1 : routing_key_end].decode("utf-8", "surrogateescape")
        redelivered = bool(flags & 1)
        header = end + 1
        header_end = _whole_frame(data, header, constants.FRAME_HEADER, channel)
        if header_end is not None and header_end - header - 7 >= 12:
            (body_size,) = _U64.unpack_from(data, header + 11)
            properties = data[header + 19 : header_end]
            body = header_end + 1
            if body_size == 0:
                _call(callback, delivery_tag, redelivered, exchange, routing_key, properties, b"")
                return body
            body_end = _whole_frame(data, body, constants.FRAME_BODY, channel)
            if body_end is not None and body_end - body - 7 == body_size:
                content = data[body + 7 : body_end]
                _call(callback, delivery_tag, redelivered, exchange, routing_key, properties, content)
                return body_end + 1
        self._content[channel] = _Content(callback, (delivery_tag, redelivered, exchange, routing_key))
        return end + 1

    def _add_content(
        self, channel: int, pending: _Content, frame_type: int, data: bytes, start: int, end: int
    ) -> None:
        if frame_type == constants.FRAME_HEADER and pending.properties is None and end - start >= 12:
            (pending.body_size,) = _U64.unpack_from(data, start + 4)
            pending.properties = data[start + 12 : end]
        elif frame_type == constants.FRAME_BODY and pending.properties is not None:
            pending.parts.append(data[start:end])
            pending.received += end - start
        else:
            raise aiormq.exceptions.InvalidFrameError(
                f"malformed frame: type {frame_type} inside a delivery's content on channel {channel}"
            )
        if pending.properties is None or pending.received < pending.body_size:
            return
        if pending.received > pending.body_size:
            raise aiormq.exceptions.InvalidFrameError("malformed frame: a body longer than its header says")
        del self._content[channel]
        parts = pending.parts
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        _call(pending.callback, *pending.delivery, pending.properties, body)


def _whole_frame(data: bytes, at: int, frame_type: int, channel: int) -> int | None:
    """Where the frame starting at `at` ends (its frame-end octet), when the bytes hold all of it
    and it is of that type on that channel; None otherwise."""
    if at + 8 > len(data):
        return None
    kind, on_channel, size = _FRAME_PREFIX.unpack_from(data, at)
    end: int = at + 7 + size
    if kind != frame_type or on_channel != channel or end >= len(data) or data[end] != _FRAME_END:
        return None
    return end


def _call(
    callback: DirectCallback,
    delivery_tag: int,
    redelivered: bool,
    exchange: str,
    routing_key: str,
    properties: bytes,
    body: bytes,
) -> None:
    try:
        callback(delivery_tag, redelivered, exchange, routing_key, properties, body)
    except Exception:
        log.exception("consumer_callback_failed")
