"""AMQP method frames written here, byte for byte, for every method that carries a name.

RabbitMQ accepts any UTF-8 exchange or queue name up to 255 bytes, routing keys up to 255
bytes and binding arguments of any field type; pamqp (under aiormq) refuses names outside
a narrow character class or longer than 127 characters, counts routing keys in characters
and cannot encode every argument type. These frames never ask pamqp: the broker decides
what it accepts and answers with a channel error we report per item.

Names are ``str`` as the rest of the code base holds them; a name that arrived as invalid
UTF-8 was decoded with surrogate escapes and goes back on the wire as its original bytes.
"""

import asyncio
import contextlib
import logging
import struct
from collections.abc import Mapping, Sequence
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import aiormq
import aiormq.abc
from pamqp import base, commands

from rabbit_archive.archive import content_header
from rabbit_archive.archive.amqp_codec import CodecError, FieldValue, Table, encode_table
from rabbit_archive.config.urls import host_of, split_hosts

log = logging.getLogger(__name__)
_SHORT = struct.Struct(">H")
_EMPTY_TABLE = b"\x00\x00\x00\x00"
_INT64 = (-(2**63), 2**63 - 1)


class NameTooLong(ValueError):
    """A name or key is longer than the 255 bytes an AMQP short string can hold."""


class Unrepresentable(ValueError):
    """A value (from the management API's JSON) that no AMQP field type carries faithfully."""


def name_bytes(name: str | bytes) -> bytes:
    """The wire bytes of a name: UTF-8, with surrogate escapes turned back into their bytes."""
    return name if isinstance(name, bytes) else name.encode("utf-8", "surrogateescape")


def _shortstr(name: str | bytes) -> bytes:
    raw = name_bytes(name)
    if len(raw) > 255:
        raise NameTooLong(f"{len(raw)} bytes, AMQP allows 255: {raw[:40]!r}...")
    return bytes((len(raw),)) + raw


def _bits(*flags: bool) -> bytes:
    value = 0
    for position, flag in enumerate(flags):
        if flag:
            value |= 1 << position
    return bytes((value,))


def field_value(value: Any) -> FieldValue:
    """The AMQP field value for a JSON value, the way RabbitMQ's own clients type them.

    bool -> t, int -> l (64-bit), float -> d, str -> S, list -> A, dict -> F, None -> V.
    Raises Unrepresentable for what none of them carries (an integer beyond 64 bits).
    """
    if value is None:
        return ("V", None)
    if isinstance(value, bool):
        return ("t", value)
    if isinstance(value, int):
        if not _INT64[0] <= value <= _INT64[1]:
            raise Unrepresentable(f"integer {value} does not fit a 64-bit AMQP field")
        return ("l", value)
    if isinstance(value, float):
        return ("d", value)
    if isinstance(value, str):
        return ("S", value.encode("utf-8", "surrogateescape"))
    if isinstance(value, Mapping):
        return ("F", table_from_json(value))
    if isinstance(value, Sequence):
        return ("A", [field_value(item) for item in value])
    raise Unrepresentable(f"a {type(value).__name__} has no AMQP field type")


def table_from_json(arguments: Mapping[str, Any]) -> Table:
    """An AMQP field table for JSON-style arguments (binding or queue arguments)."""
    table: Table = []
    for key, value in arguments.items():
        raw_key = name_bytes(str(key))
        if len(raw_key) > 255:
            raise Unrepresentable(f"argument name of {len(raw_key)} bytes (AMQP allows 255)")
        table.append((raw_key, field_value(value)))
    return table


def _table(arguments: Mapping[str, Any] | None) -> bytes:
    if not arguments:
        return _EMPTY_TABLE
    try:
        return encode_table(table_from_json(arguments))
    except CodecError as error:
        raise Unrepresentable(str(error)) from None


def _method(command: type[base.Frame], payload: bytes, **attributes: Any) -> base.Frame:
    """A frame of the command's class (aiormq checks replies by it) that marshals as payload."""
    frame = _RAW_CLASSES[command].__new__(_RAW_CLASSES[command])
    frame.payload = payload  # type: ignore[attr-defined]
    for name, value in attributes.items():
        setattr(frame, name, value)
    return frame


class _RawMixin:
    payload: bytes

    def marshal(self) -> bytes:
        """The arguments exactly as built here."""
        return self.payload

    def validate(self) -> None:
        """The broker validates; see the module docstring."""


def _raw_class(command: type[base.Frame]) -> type[base.Frame]:
    # No __slots__: instances get a __dict__ for the payload, the parent's slots stay usable.
    return type(f"Raw{command.name.replace('.', '')}", (_RawMixin, command), {})


_RAW_CLASSES: dict[type[base.Frame], type[base.Frame]] = {
    command: _raw_class(command)
    for command in (
        commands.Queue.Declare,
        commands.Queue.Bind,
        commands.Queue.Unbind,
        commands.Queue.Delete,
        commands.Exchange.Declare,
        commands.Exchange.Delete,
        commands.Exchange.Unbind,
        commands.Basic.Consume,
        commands.Connection.Open,
    )
}


def queue_declare(
    queue: str,
    *,
    passive: bool = False,
    durable: bool = False,
    exclusive: bool = False,
    auto_delete: bool = False,
    arguments: Mapping[str, Any] | None = None,
) -> base.Frame:
    """queue.declare (passive: only check that it exists and read its counts)."""
    payload = (
        _SHORT.pack(0)
        + _shortstr(queue)
        + _bits(passive, durable, exclusive, auto_delete, False)
        + _table(arguments)
    )
    return _method(commands.Queue.Declare, payload, queue=queue, nowait=False)


def queue_delete(queue: str, *, if_unused: bool = False, if_empty: bool = False) -> base.Frame:
    """queue.delete."""
    payload = _SHORT.pack(0) + _shortstr(queue) + _bits(if_unused, if_empty, False)
    return _method(commands.Queue.Delete, payload, queue=queue, nowait=False)


def queue_bind(
    queue: str, exchange: str, routing_key: str, arguments: Mapping[str, Any] | None = None
) -> base.Frame:
    """queue.bind; Unrepresentable when an argument has no faithful AMQP type."""
    payload = (
        _SHORT.pack(0)
        + _shortstr(queue)
        + _shortstr(exchange)
        + _shortstr(routing_key)
        + _bits(False)
        + _table(arguments)
    )
    return _method(commands.Queue.Bind, payload, queue=queue, exchange=exchange, nowait=False)


def queue_unbind(
    queue: str, exchange: str, routing_key: str, arguments: Mapping[str, Any] | None = None
) -> base.Frame:
    """queue.unbind (it has no nowait flag)."""
    payload = (
        _SHORT.pack(0) + _shortstr(queue) + _shortstr(exchange) + _shortstr(routing_key) + _table(arguments)
    )
    return _method(commands.Queue.Unbind, payload, queue=queue, exchange=exchange)


def exchange_declare(
    exchange: str,
    exchange_type: str = "direct",
    *,
    passive: bool = False,
    durable: bool = False,
    auto_delete: bool = False,
    internal: bool = False,
    arguments: Mapping[str, Any] | None = None,
) -> base.Frame:
    """exchange.declare (passive: only check that it exists)."""
    payload = (
        _SHORT.pack(0)
        + _shortstr(exchange)
        + _shortstr(exchange_type)
        + _bits(passive, durable, auto_delete, internal, False)
        + _table(arguments)
    )
    return _method(commands.Exchange.Declare, payload, exchange=exchange, nowait=False)


def exchange_delete(exchange: str) -> base.Frame:
    """exchange.delete."""
    payload = _SHORT.pack(0) + _shortstr(exchange) + _bits(False, False)
    return _method(commands.Exchange.Delete, payload, exchange=exchange, nowait=False)


def exchange_unbind(
    destination: str, source: str, routing_key: str, arguments: Mapping[str, Any] | None = None
) -> base.Frame:
    """exchange.unbind."""
    payload = (
        _SHORT.pack(0)
        + _shortstr(destination)
        + _shortstr(source)
        + _shortstr(routing_key)
        + _bits(False)
        + _table(arguments)
    )
    return _method(commands.Exchange.Unbind, payload, destination=destination, source=source, nowait=False)


def basic_consume(
    queue: str, consumer_tag: str, *, no_ack: bool = False, arguments: Mapping[str, Any] | None = None
) -> base.Frame:
    """basic.consume."""
    payload = (
        _SHORT.pack(0)
        + _shortstr(queue)
        + _shortstr(consumer_tag)
        + _bits(False, no_ack, False, False)
        + _table(arguments)
    )
    return _method(commands.Basic.Consume, payload, queue=queue, consumer_tag=consumer_tag, nowait=False)


async def consume(
    channel: aiormq.Channel,
    queue: str,
    callback: aiormq.abc.ConsumerCallback,
    *,
    consumer_tag: str,
    no_ack: bool = False,
) -> commands.Basic.ConsumeOk:
    """basic.consume through aiormq's consumer bookkeeping, with the queue name sent as is."""
    channel.consumers[consumer_tag] = aiormq.tools.awaitable(callback)
    try:
        reply = await channel.rpc(basic_consume(queue, consumer_tag, no_ack=no_ack))
    except BaseException:
        channel.consumers.pop(consumer_tag, None)
        raise
    return cast(commands.Basic.ConsumeOk, reply)


async def consume_directly(
    channel: aiormq.Channel,
    queue: str,
    callback: content_header.DirectCallback,
    *,
    consumer_tag: str,
) -> commands.Basic.ConsumeOk:
    """basic.consume whose deliveries go to a plain function, called as each one is read.

    The function gets (delivery_tag, redelivered, exchange, routing_key, property bytes, body).
    aiormq would turn each delivery's three frames into objects, queue them to the channel's
    task and start a task per delivery for the consumer: on a busy archive queue that was
    almost half of the daemon's time per message. Here the connection's frame reader
    (content_header.RawFrames) parses the deliveries to this consumer tag itself and calls the
    function in delivery order, a whole read of the socket at a time; the channel's other
    frames reach aiormq as before. An exception from the function is logged (as aiormq logs a
    failed consumer task) and reading goes on.
    """
    raw_frames = cast(Connection, channel.connection).raw_frames
    number = channel.number
    raw_frames.deliver_directly(number, consumer_tag, callback)
    channel.closing.add_done_callback(lambda _: raw_frames.stop_delivering(number, consumer_tag))
    try:
        return await consume(channel, queue, _never_called, consumer_tag=consumer_tag)
    except BaseException:
        raw_frames.stop_delivering(number, consumer_tag)
        raise


async def _never_called(_message: aiormq.abc.DeliveredMessage) -> None:
    raise AssertionError("consume_directly's deliveries never reach aiormq's consumer table")


async def rpc(channel: aiormq.abc.AbstractChannel, frame: base.Frame) -> Any:
    """Send a synchronous method built here and wait for the broker's reply."""
    return await cast(aiormq.Channel, channel).rpc(frame)


# The frames of a publish as bytes: type, channel, size, payload, frame-end (AMQP 0-9-1, 2.3.5).
_FRAME = struct.Struct(">BHI")
_CONTENT_HEADER = struct.Struct(">BHIHHQ")  # frame header, then class 60, weight 0, body size
_FRAME_END = b"\xce"
# basic.publish's method frames by (exchange, routing key, mandatory): a replay sends many
# messages to few destinations. Cleared when it grows past this many.
_PUBLISH_METHODS: dict[tuple[int, str, str, bool], bytes] = {}
_PUBLISH_METHODS_MAX = 4096


def publish_frames(
    channel: int,
    frame_max: int,
    exchange: str,
    routing_key: str,
    properties_raw: bytes,
    body: bytes,
    *,
    mandatory: bool = False,
) -> list[bytes]:
    """The bytes of one publish on a channel: basic.publish, the content header with the property
    bytes as given, and the body cut into frames of at most frame_max bytes (NameTooLong for an
    exchange or routing key over 255 bytes)."""
    key = (channel, exchange, routing_key, mandatory)
    method = _PUBLISH_METHODS.get(key)
    if method is None:
        # class 60 (basic), method 40 (publish), reserved short, names, mandatory / immediate bits
        names = _shortstr(exchange) + _shortstr(routing_key)
        payload = b"\x00\x3c\x00\x28\x00\x00" + names + _bits(mandatory, False)
        method = _FRAME.pack(1, channel, len(payload)) + payload + _FRAME_END
        if len(_PUBLISH_METHODS) >= _PUBLISH_METHODS_MAX:
            _PUBLISH_METHODS.clear()
        _PUBLISH_METHODS[key] = method
    size = len(body)
    parts = [
        method,
        _CONTENT_HEADER.pack(2, channel, 12 + len(properties_raw), 60, 0, size),
        properties_raw,
        _FRAME_END,
    ]
    # frame_max counts the frame's 8 bytes of header and end; 0 means no limit.
    chunk = frame_max - 8 if frame_max > 8 else max(size, 1)
    for start in range(0, size, chunk):
        piece = body[start : start + chunk]
        parts += (_FRAME.pack(3, channel, len(piece)), piece, _FRAME_END)
    return parts


__all__ = [
    "NameTooLong",
    "Unrepresentable",
    "basic_consume",
    "consume",
    "exchange_declare",
    "exchange_delete",
    "field_value",
    "name_bytes",
    "publish_frames",
    "queue_bind",
    "queue_declare",
    "queue_delete",
    "queue_unbind",
    "rpc",
    "table_from_json",
]


def connection_open(vhost: str) -> base.Frame:
    """connection.open for a vhost of any name (pamqp refuses names over 127 characters)."""
    payload = _shortstr(vhost) + _shortstr("") + _bits(False)
    return _method(commands.Connection.Open, payload, virtual_host=vhost)


class Connection(aiormq.Connection):
    """aiormq's connection, opening the vhost it is given by name with a connection.open built here,
    and reading frames with archive.content_header (raw property bytes, names of any bytes).

    aiormq parses the vhost from the URL path and builds connection.open through pamqp, which
    refuses long names; the name given here is sent as is.
    """

    raw_frames: content_header.RawFrames
    stream_writer: asyncio.StreamWriter

    def __init__(self, url: str, *, vhost: str, **kwargs: Any) -> None:
        self._vhost_name = vhost
        super().__init__(url, **kwargs)

    @property
    def vhost(self) -> str:
        """The vhost name as aiormq may hold it (it builds connection.open from it; _rpc replaces that)."""
        return self._vhost_name if len(self._vhost_name) <= 127 else "/"

    @vhost.setter
    def vhost(self, _parsed: str) -> None:
        # aiormq assigns the vhost it parsed from the URL; the name given explicitly wins.
        pass

    async def _Connection__writer(self, writer: asyncio.StreamWriter) -> None:
        # Kept for write_now: aiormq hands its writer task the stream and keeps no reference.
        self.stream_writer = writer
        await getattr(super(), "_Connection__writer")(writer)  # noqa: B009 - a mangled name

    def write_now(self, data: bytes) -> None:
        """Write whole frames to the socket at once, beside aiormq's write queue (whole frames
        never interleave: aiormq's writer also writes each of its frames in one call).

        Bytes for a socket that is already closing are dropped: the connection is lost, and its
        close fails everything that waits for an answer on it.
        """
        writer = self.stream_writer
        if writer.transport.is_closing():
            return
        with contextlib.suppress(RuntimeError, OSError):  # closed between the check and the write
            writer.write(data)

    async def _Connection__reader(self, frame_receiver: Any) -> None:
        # After the handshake every frame of this connection is decoded the archive's way
        # (archive.content_header): raw property bytes, names that need not be UTF-8.
        reader = getattr(super(), "_Connection__reader")  # noqa: B009 - a mangled name
        self.raw_frames = content_header.RawFrames(frame_receiver, self._frames_read)
        await reader(self.raw_frames)

    def _frames_read(self) -> None:
        # Frames read for a direct consumer (consume_directly) never reach aiormq's reader loop,
        # which times the last frame it saw to tell a connection that is stuck.
        self._Connection__last_frame_time = self.loop.time()

    async def _rpc(  # type: ignore[override]
        self,
        request: base.Frame,
        writer: asyncio.StreamWriter,
        frame_receiver: Any,
        wait_response: bool = True,
    ) -> Any:
        if isinstance(request, commands.Connection.Open):
            request = connection_open(self._vhost_name)
        return await super()._rpc(request, writer, frame_receiver, wait_response)


# Per URL of a cluster, the host that answered last: reconnecting tries it first, then the
# next ones at once (a stopped node refuses at once, so moving on costs nothing).
_last_good: dict[str, int] = {}
# How long one host may take to answer before the next is tried.
HOST_TIMEOUT = 5.0


async def connect(url: str, vhost: str | None = None, **kwargs: Any) -> aiormq.abc.AbstractConnection:
    """Open an AMQP connection to the vhost (named explicitly, so any name the broker holds works;
    by default the URL's, percent-decoded).

    A URL naming several hosts (`amqp://u:p@h1:5672,h2:5672/v`) connects to the first that
    answers, starting with the one that answered last; the last error is raised when none does.
    """
    if vhost is None:
        vhost = unquote(urlsplit(url).path[1:]) or "/"
    candidates = split_hosts(url)
    if len(candidates) == 1:
        connection = Connection(url, vhost=vhost, **kwargs)
        await connection.connect()
        return connection
    first = _last_good.get(url, 0)
    error: BaseException | None = None
    for offset in range(len(candidates)):
        index = (first + offset) % len(candidates)
        connection = Connection(candidates[index], vhost=vhost, **kwargs)
        try:
            await asyncio.wait_for(connection.connect(), HOST_TIMEOUT)
        except (aiormq.exceptions.AMQPConnectionError, OSError, TimeoutError) as failed:
            # Wrong credentials or vhost are the same on every node: not a reason to go on.
            if isinstance(failed, aiormq.exceptions.ProbableAuthenticationError):
                raise
            error = failed
            continue
        _last_good[url] = index
        return connection
    assert error is not None
    raise error


def move_on(url: str) -> None:
    """The node that answered last for url went away: the next connect starts with the one after it
    (and tries that node last)."""
    hosts = len(split_hosts(url))
    if hosts > 1:
        _last_good[url] = (_last_good.get(url, 0) + 1) % hosts


def node_of(connection: aiormq.abc.AbstractConnection) -> str:
    """`host:port` of the node a connection is open to."""
    url = getattr(connection, "url", None)
    return host_of(str(url)) if url is not None else "?"
