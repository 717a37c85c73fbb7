"""Publishing replayed messages: exact property bytes, publisher confirms, mandatory, counted returns.

A publish costs one future and its bytes, nothing more: its frames are written here (archive.frames
publish_frames) and go to the socket together with the others of the same turn of the event loop,
and the broker's confirms settle the futures by delivery tag here, a `multiple` ack a whole range at
once. aiormq's own publish would add a write-queue item, a channel-lock turn, pamqp marshalling and a
tracked future per message, and a scheduled callback per message for each multiple ack.
"""

import asyncio
import contextlib
import functools
import logging
import re
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import aiormq
import aiormq.abc
from aiormq.channel import exception_by_code
from pamqp import commands

from rabbit_archive.archive import content_header, frames
from rabbit_archive.archive.amqp_codec import CodecError, decode_properties
from rabbit_archive.archive.errors import AccessRefused, BrokerUnavailable, UsageError, describe, reply_text
from rabbit_archive.config.settings import mask_url
from rabbit_archive.config.urls import split_hosts
from rabbit_archive.replay.tagging import REPLAY_ARCHIVE_ID

log = logging.getLogger(__name__)

# Errors that mean the broker connection is gone: with several hosts in AMQP_URL the replay goes
# on with another node (replay.runner), else it stops and can be resumed.
CONNECTION_LOST_ERRORS: tuple[type[Exception], ...] = (
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelInvalidStateError,
    aiormq.exceptions.ChannelClosed,
    ConnectionError,
    OSError,
    TimeoutError,
)


# Seconds a synchronous request (a passive declare) may go unanswered: a broker that blocks
# the connection (memory or disk alarm) or a network that drops packets must not hang a replay.
RPC_TIMEOUT = 10.0
# Seconds closing the connection may take: a broker that does not answer is simply left.
CLOSE_TIMEOUT = 3.0
# Publish bytes wait for the end of the event loop's turn, so that a page of messages goes to the
# socket in one write; beyond this many bytes they are written at once.
FLUSH_BYTES = 256 * 1024


class Nacked(Exception):
    """The broker refused responsibility for a published message (basic.nack)."""


class Returned(Exception):
    """The broker returned a mandatory message as unroutable (basic.return before its ack)."""


class Confirms:
    """The publishes of one confirm channel still awaiting the broker's answer, by delivery tag.

    The broker numbers a channel's publishes from 1 and answers each once: basic.ack or
    basic.nack of one tag, or with `multiple` of every tag up to it. Its returns are counted
    apart (by x-replay-archive-id); `returned` tells whether an acked publish was one of them.
    """

    __slots__ = ("failed", "last", "oldest", "waiting")

    def __init__(self) -> None:
        self.waiting: dict[int, tuple[asyncio.Future[None], int | None]] = {}
        self.last = 0  # the delivery tag of the latest publish
        self.oldest = 1  # no tag below it still waits
        # Why the channel closed: every later publish on it fails with this.
        self.failed: BaseException | None = None

    def add(self, confirmation: "asyncio.Future[None]", archive_id: int | None) -> int:
        """Track the next publish; its delivery tag."""
        self.last += 1
        self.waiting[self.last] = (confirmation, archive_id)
        return self.last

    def answer(
        self, tag: int, *, multiple: bool, nacked: bool, returned: Callable[[int | None], bool]
    ) -> None:
        """Settle what an ack or nack answers: a future done already (abandoned, or sent again on
        another connection) is left as it is."""
        waiting = self.waiting
        for answered in range(self.oldest, min(tag, self.last) + 1) if multiple else (tag,):
            entry = waiting.pop(answered, None)
            if entry is None:
                continue
            confirmation, archive_id = entry
            if confirmation.done():
                continue
            if nacked:
                _fail(confirmation, Nacked(f"delivery tag {answered} nacked"))
            elif returned(archive_id):
                _fail(confirmation, Returned(f"archive id {archive_id} returned as unroutable"))
            else:
                confirmation.set_result(None)
        while self.oldest <= self.last and self.oldest not in waiting:
            self.oldest += 1

    def fail(self, error: BaseException) -> None:
        """The channel closed: every publish still waiting, and every later one, fails with error."""
        self.failed = error
        for confirmation, _ in self.waiting.values():
            if not confirmation.done():
                _fail(confirmation, error)
        self.waiting.clear()


def _fail(future: "asyncio.Future[None]", error: BaseException) -> None:
    future.set_exception(error)
    # Read once, so that a publish abandoned with the window logs nothing when collected.
    future.exception()


class Publisher:
    """One AMQP connection with a confirm channel for publishing and a channel for passive checks."""

    def __init__(
        self, url: str, vhost: str, unacknowledged: "Callable[[str], Awaitable[int | None]] | None" = None
    ) -> None:
        self._url = url
        self._vhost = vhost
        # Messages delivered to the target queue's consumers but not yet acknowledged (from the
        # management API): --max-queue-depth counts them, or a consumer with a large prefetch
        # would hold thousands while the queue reads empty.
        self._unacknowledged = unacknowledged
        self._connection: frames.Connection | None = None
        self._channel: aiormq.Channel | None = None
        self._confirms = Confirms()
        self._frame_max = 0
        self._probe: aiormq.abc.AbstractChannel | None = None
        # Publish bytes not yet written (see FLUSH_BYTES), and whether a write is scheduled.
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._flush_scheduled = False
        self._last_exchange = ""
        self.returned = 0
        self.returned_ids: list[int] = []
        # Returns not yet matched with their publish, by x-replay-archive-id: the broker sends
        # a message's basic.return before its basic.ack, and aiormq reads frames in order.
        self._unclaimed_returns: Counter[int] = Counter()
        # Set when the broker refused a publish for lack of write permission (the channel
        # is closed then; the replay fails with this one line instead of "lost the broker").
        self.refused: AccessRefused | None = None
        # The queues and exchanges found before the replay started (operations checks the
        # target), checked again on the node a failover moves to: a classic queue lives on one
        # node, and a node that left the cluster may not know an exchange declared since.
        self._checked_queues: dict[str, None] = {}
        self._checked_exchanges: dict[str, str] = {}

    @property
    def _user(self) -> str:
        return unquote(urlsplit(self._url).username or "guest")

    async def connect(self) -> None:
        """Open the connection and the confirm channel."""
        # Returned messages come back with the same headers a replay sent: this connection
        # reads them raw (archive.content_header), so no header type can break it.
        try:
            self._connection = cast(frames.Connection, await frames.connect(self._url, self._vhost))
            self._channel = cast(aiormq.Channel, await self._connection.channel(publisher_confirms=True))
        except aiormq.exceptions.ProbableAuthenticationError:
            raise AccessRefused(
                f"RabbitMQ at {mask_url(self._url)} rejected the credentials of user {self._user!r}: "
                "check RABBIT_ARCHIVE_AMQP_URL, or --target-url / RABBIT_ARCHIVE_REPLAY_TARGET_URL"
            ) from None
        except aiormq.exceptions.InvalidFrameError as error:
            # aiormq reports the broker's Connection.Close answering Connection.Open (vhost
            # missing, or no permissions in it) this way, without the reply text.
            if "Connection.Close" not in str(error):
                raise BrokerUnavailable(
                    f"cannot talk to RabbitMQ at {mask_url(self._url)}: {describe(error)}"
                ) from None
            raise AccessRefused(
                f"RabbitMQ did not let user {self._user!r} into vhost {self._vhost!r}: the vhost does not "
                f"exist or the user has no permissions there (rabbitmqctl set_permissions -p "
                f"{self._vhost} {self._user} '^$' '<write regex>' '^$')"
            ) from None
        except CONNECTION_LOST_ERRORS as error:
            raise BrokerUnavailable(
                f"cannot reach RabbitMQ at {mask_url(self._url)}: {describe(error)}"
            ) from None
        # aiormq maps a basic.return to its publish by message id, which replayed messages
        # share or lack; returns are counted here instead, and the broker's ack that follows
        # each return settles the publish as usual.
        channel = self._channel
        channel._on_return_frame = functools.partial(self._on_return, channel)  # type: ignore[method-assign]
        # Confirms are matched here (see the module's docstring); a new channel numbers from 1.
        self._confirms = confirms = Confirms()
        channel._on_confirm_frame = functools.partial(self._on_confirm, confirms)  # type: ignore[method-assign]
        channel._on_close_frame = functools.partial(  # type: ignore[method-assign]
            self._on_close_frame, confirms, channel._on_close_frame
        )
        channel.closing.add_done_callback(functools.partial(self._on_channel_closed, confirms))
        self._frame_max = self._connection.connection_tune.frame_max
        if self.can_fail_over:
            # Which node of the cluster, as the daemon's `consuming` line says it.
            log.info("replay.connected", extra={"node": self.node})

    @property
    def can_fail_over(self) -> bool:
        """Whether AMQP_URL names several nodes, so that a lost one can be replaced by another."""
        return len(split_hosts(self._url)) > 1

    @property
    def lost(self) -> bool:
        """Whether the connection itself is gone (not merely a channel the broker closed over an error)."""
        return self._connection is None or self._connection.is_closed

    @property
    def node(self) -> str:
        """`host:port` of the node the connection is (or was last) open to."""
        return frames.node_of(self._connection) if self._connection is not None else "?"

    async def reconnect(self) -> str:
        """After a lost connection: connect again, to the next node of AMQP_URL first, and check the
        queues and exchanges found before again (UsageError when one is missing there); the node."""
        await self.close()
        self._channel = None
        self._probe = None
        # The node that went away is tried last: it refuses at once while it is down, but one
        # that is shutting down may still take a connection and drop it again.
        frames.move_on(self._url)
        # A return read on the old connection cannot be matched with the confirm of a publish
        # that will be sent again on the new one: it did not happen as far as the replay goes.
        for archive_id, unmatched in self._unclaimed_returns.items():
            for _ in range(unmatched):
                with contextlib.suppress(ValueError):
                    self.returned_ids.remove(archive_id)
                self.returned -= 1
        self._unclaimed_returns.clear()
        await self.connect()
        for queue in self._checked_queues:
            await self._check_queue(queue)
        for exchange, hint in self._checked_exchanges.items():
            await self.check_exchange(exchange, hint)
        return self.node

    @property
    def closed(self) -> bool:
        """Whether the publishing channel is gone (nothing more will be confirmed on it)."""
        channel, connection = self._channel, self._connection
        return channel is None or channel.is_closed or connection is None or connection.is_closed

    async def _on_return(self, channel: Any, frame: commands.Basic.Return) -> None:
        header = await channel._Channel__get_content_header()
        message = await channel._read_content(frame, header)
        if channel is not self._channel:
            # Read late from a connection given up (its close timed out): what it returned is
            # published again on the new one, and counted there if returned again.
            return
        self.returned += 1
        archive_id = None
        with contextlib.suppress(CodecError, AttributeError):
            props = decode_properties(content_header.raw_properties(message.header))
            for key, (_, value) in props.headers or ():
                if key == REPLAY_ARCHIVE_ID:
                    archive_id = value
        if isinstance(archive_id, int):
            self.returned_ids.append(archive_id)
            self._unclaimed_returns[archive_id] += 1
        log.warning(
            "replay.returned",
            extra={
                "archive_id": archive_id,
                "exchange": frame.exchange,
                "routing_key": frame.routing_key,
                "reply_text": frame.reply_text,
            },
        )

    async def _probe_channel(self) -> aiormq.abc.AbstractChannel:
        if self._probe is None or self._probe.is_closed:
            assert self._connection is not None
            self._probe = await self._connection.channel(publisher_confirms=False)
        return self._probe

    async def _rpc(self, frame: Any) -> Any:
        """A request on the probe channel; BrokerUnavailable when no answer comes in RPC_TIMEOUT."""
        try:
            async with asyncio.timeout(RPC_TIMEOUT):
                channel = await self._probe_channel()
                return await frames.rpc(channel, frame)
        except TimeoutError:
            # The channel may still await that answer: the next request opens a new one.
            self._probe = None
            raise BrokerUnavailable(
                f"RabbitMQ did not answer within {RPC_TIMEOUT:.0f} s (a memory or disk alarm blocks "
                "the connection, or the network drops packets)"
            ) from None

    async def _check_queue(self, queue: str) -> int:
        """Messages ready in a queue (a passive declare); UsageError when it does not exist."""
        try:
            declared = await self._rpc(frames.queue_declare(queue, passive=True))
        except frames.NameTooLong:
            raise UsageError(f"queue name {queue!r} is longer than the 255 bytes AMQP allows") from None
        except aiormq.exceptions.ChannelNotFoundEntity:
            self._probe = None
            raise UsageError(
                f"queue {queue!r} does not exist in vhost {self._vhost!r}: check --to-queue, or declare "
                "the queue (its consumer usually does) and run again"
            ) from None
        self._checked_queues[queue] = None
        return int(declared.message_count or 0)

    async def queue_depth(self, queue: str) -> int:
        """Messages in a queue (ready, plus unacknowledged when the management API answers);
        UsageError when it does not exist."""
        ready = await self._check_queue(queue)
        if self._unacknowledged is None:
            return ready
        return ready + (await self._unacknowledged(queue) or 0)

    async def check_exchange(self, exchange: str, hint: str) -> None:
        """UsageError when the exchange does not exist (the default exchange always does)."""
        if not exchange:
            return
        try:
            await self._rpc(frames.exchange_declare(exchange, passive=True))
        except frames.NameTooLong:
            raise UsageError(f"exchange name {exchange!r} is longer than the 255 bytes AMQP allows") from None
        except aiormq.exceptions.ChannelNotFoundEntity:
            self._probe = None
            raise UsageError(
                f"exchange {exchange!r} does not exist in vhost {self._vhost!r}: {hint}"
            ) from None
        self._checked_exchanges[exchange] = hint

    def publish(
        self,
        exchange: str,
        routing_key: str,
        properties_raw: bytes,
        body: bytes,
        archive_id: int | None = None,
    ) -> "asyncio.Future[None]":
        """Send one message with mandatory set; the future is done when the broker answered it.

        It fails with Nacked when the broker nacks it, with Returned when the broker returned it
        as unroutable (matched by archive_id, the x-replay-archive-id it carries), and with the
        channel's error when the channel or connection closes first. Messages go to the broker in
        the order of these calls.
        """
        confirmation: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        channel, confirms = self._channel, self._confirms
        if channel is None or channel.is_closed or confirms.failed is not None:
            _fail(
                confirmation, confirms.failed or aiormq.exceptions.ChannelInvalidStateError("channel closed")
            )
            return confirmation
        try:
            # Written here, not by aiormq: pamqp would refuse names RabbitMQ accepts.
            parts = frames.publish_frames(
                channel.number, self._frame_max, exchange, routing_key, properties_raw, body, mandatory=True
            )
        except frames.NameTooLong as error:
            _fail(confirmation, error)
            return confirmation
        confirms.add(confirmation, archive_id)
        self._last_exchange = exchange
        self._out += parts
        self._out_bytes += len(body) + 64
        if self._out_bytes >= FLUSH_BYTES:
            self._flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        return confirmation

    def _flush(self) -> None:
        """Write the publish bytes waiting, in one write."""
        self._flush_scheduled = False
        if not self._out:
            return
        data = b"".join(self._out)
        self._drop_unwritten()
        connection = self._connection
        if connection is not None and not connection.is_closed:
            # A socket that fails closes the connection, and its channel's close fails what waits.
            connection.write_now(data)

    def _drop_unwritten(self) -> None:
        self._out.clear()
        self._out_bytes = 0

    async def _on_confirm(self, confirms: Confirms, frame: commands.Basic.Ack | commands.Basic.Nack) -> None:
        # Called by the channel's reader in frame order, so a message's basic.return (counted in
        # _on_return) always comes before the ack that settles it.
        nacked = isinstance(frame, commands.Basic.Nack)
        confirms.answer(
            frame.delivery_tag, multiple=frame.multiple, nacked=nacked, returned=self._claim_return
        )

    def _claim_return(self, archive_id: int | None) -> bool:
        """Whether a return of this archive id is still to be matched with its ack (and match it)."""
        if archive_id is None or self._unclaimed_returns[archive_id] <= 0:
            return False
        self._unclaimed_returns[archive_id] -= 1
        return True

    async def _on_close_frame(
        self,
        confirms: Confirms,
        answer_close: Callable[[commands.Channel.Close], Awaitable[None]],
        frame: commands.Channel.Close,
    ) -> None:
        # Before aiormq answers the broker's channel.close with close-ok: no publish may follow
        # that on the wire, or the broker closes the whole connection (a frame on a closed
        # channel), and the reason (a refused permission) would be lost.
        if confirms is self._confirms:
            self._drop_unwritten()
        self._channel_failed(confirms, exception_by_code(frame))
        await answer_close(frame)  # aiormq's own: close-ok, then the channel closes

    def _on_channel_closed(self, confirms: Confirms, closing: "asyncio.Future[Any]") -> None:
        error = None if closing.cancelled() else closing.exception()
        self._channel_failed(confirms, error or aiormq.exceptions.ChannelInvalidStateError("channel closed"))

    def _channel_failed(self, confirms: Confirms, error: BaseException) -> None:
        """Fail every publish waiting on the channel, and every later one (the first reason stands)."""
        if confirms.failed is not None:
            return
        if isinstance(error, aiormq.exceptions.ChannelAccessRefused):
            if self.refused is None:
                self.refused = self._publish_refused(self._last_exchange, reply_text(error))
            error = self.refused
        confirms.fail(error)

    def _publish_refused(self, exchange: str, text: str) -> AccessRefused:
        # Every publish in flight fails with the same reply; it names the refused exchange.
        named = re.search(r"access to exchange '(.*)' in vhost '", text)
        if named:
            exchange = "" if named.group(1) == "amq.default" else named.group(1)
        if "access to topic" in text:
            need = "topic write permission for the routing keys replayed"
        elif exchange:
            need = f"write permission on exchange {exchange!r}"
        else:
            # RabbitMQ checks a publish to the default exchange (--to-queue) against the
            # name 'amq.default', whatever the queue.
            need = "write permission on the default exchange (its write regex must match 'amq.default')"
        return AccessRefused(
            f"RabbitMQ refused to publish in vhost {self._vhost!r} ({text}): user {self._user!r} needs {need}"
        )

    async def close(self) -> None:
        """Close the connection (confirms still outstanding are abandoned)."""
        # Bytes of this connection's channel must never reach the next one.
        self._drop_unwritten()
        if self._connection is not None:
            with contextlib.suppress(*CONNECTION_LOST_ERRORS, RuntimeError):
                # A blocked or silent broker never answers connection.close.
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    await self._connection.close()
            self._connection = None
