"""The capture loop of one vhost: consume the archive queue, write batches, acknowledge after commit."""

import asyncio
import collections
import contextlib
import functools
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import aiormq
import aiormq.abc

from rabbit_archive.archive import content_header, frames
from rabbit_archive.archive.amqp_codec import CodecError, decode_properties, text_view
from rabbit_archive.archive.errors import (
    AccessRefused,
    BrokerUnavailable,
    DatabaseUnavailable,
    QueueMismatch,
    UsageError,
    describe,
    reply_text,
)
from rabbit_archive.archive.stopping import Backoff, sleep_unless
from rabbit_archive.capture import firehose
from rabbit_archive.capture.acks import Acknowledger
from rabbit_archive.capture.batching import Batcher, Delivery
from rabbit_archive.capture.coverage import CoverageEvent
from rabbit_archive.capture.discovery import BindingKeeper
from rabbit_archive.capture.health import Health
from rabbit_archive.capture.metrics import CaptureMetrics
from rabbit_archive.capture.read_gate import ReadGate
from rabbit_archive.capture.store import ArchiveStore
from rabbit_archive.config.settings import Settings, mask_url
from rabbit_archive.config.urls import split_hosts

log = logging.getLogger(__name__)

# Errors that end a broker session; the supervisor reconnects after a backoff.
SESSION_ENDING_ERRORS: tuple[type[Exception], ...] = (
    aiormq.exceptions.AMQPError,
    aiormq.exceptions.ChannelInvalidStateError,
    ConnectionError,
    OSError,
    BrokerUnavailable,
    TimeoutError,
)


# Seconds before a vhost that could not be captured (see VhostCapture.run) is tried again.
VHOST_RETRY = 15.0


# Seconds a session's end waits for its cancelled writes (a COMMIT under way, a pool release).
ABANDON_TIMEOUT = 10.0


class _EarlierBatchFailed(Exception):
    """The batch written before this one did not commit: this one rolls back and follows it."""


@dataclass(eq=False)
class _Write:
    """A batch written beside the loop (VhostCapture._flush), as the batch after it sees it."""

    # Set once the task exists (it is given this object).
    task: "asyncio.Task[None]" = field(init=False)
    # Its rows' ids are taken: the next batch may start (its ids are all higher).
    ids_taken: asyncio.Event = field(default_factory=asyncio.Event)
    # Set when an attempt committed, or when one failed (`failed`: the next batch then rolls
    # back and follows it).
    failed: bool = False
    settled: asyncio.Event = field(default_factory=asyncio.Event)

    def mark_committed(self) -> None:
        self.settled.set()

    def mark_failed(self) -> None:
        self.failed = True
        self.settled.set()

    async def commit_or_fail(self) -> None:
        """Return when this batch committed; raise _EarlierBatchFailed when an attempt failed.

        Awaited inside the next batch's transaction, which holds a share of the selection fence
        meanwhile: a failed attempt lets it go at once, as the retry may have to queue for the
        fence behind a reader that waits for that transaction.
        """
        await self.settled.wait()
        if self.failed:
            # Even if a retry committed since: it took its ids after the waiting batch took its own.
            raise _EarlierBatchFailed


def queue_arguments(settings: Settings) -> dict[str, Any]:
    """The archive queue's arguments; they cannot change once the queue exists."""
    arguments: dict[str, Any] = {"x-queue-type": settings.queue_type}
    if settings.single_active_consumer:
        arguments["x-single-active-consumer"] = True
    if settings.queue_max_bytes is not None:
        arguments["x-max-length-bytes"] = settings.queue_max_bytes
        arguments["x-overflow"] = "drop-head"
        # Dropped messages are dead-lettered to a queue of their own, only to be counted.
        arguments["x-dead-letter-exchange"] = ""
        arguments["x-dead-letter-routing-key"] = dropped_queue(settings)
    return arguments


def dropped_queue(settings: Settings) -> str:
    """The queue that receives what the archive queue drops when QUEUE_MAX_BYTES is reached."""
    return f"{settings.queue}.dropped"


def dropped_from(properties_raw: bytes) -> tuple[str, str]:
    """Exchange and routing key of a dead-lettered message, from its first x-death entry."""
    try:
        headers = decode_properties(properties_raw).headers or []
    except CodecError:
        return "?", "?"
    for key, (letter, value) in headers:
        if key == b"x-death" and letter == "A" and value and value[0][0] == "F":
            death = {entry_key: entry_value for entry_key, (_, entry_value) in value[0][1]}
            exchange = death.get(b"exchange", b"?")
            keys = death.get(b"routing-keys", [])
            routing_key = keys[0][1] if keys and isinstance(keys[0][1], bytes) else b"?"
            if isinstance(exchange, bytes):
                return text_view(exchange), text_view(routing_key)
    return "?", "?"


async def declare_archive_queue(channel: aiormq.abc.AbstractChannel, settings: Settings, vhost: str) -> None:
    """Declare the durable archive queue, explaining a clash with an existing one in one line."""
    try:
        if settings.queue_max_bytes is not None:
            # Bounded as well: a long outage must not fill the broker through this queue.
            await frames.rpc(
                channel,
                frames.queue_declare(
                    dropped_queue(settings),
                    durable=True,
                    arguments={"x-max-length": 10_000, "x-overflow": "drop-head"},
                ),
            )
        await frames.rpc(
            channel, frames.queue_declare(settings.queue, durable=True, arguments=queue_arguments(settings))
        )
    except aiormq.exceptions.ChannelPreconditionFailed as error:
        raise QueueMismatch(
            f"queue {settings.queue!r} in vhost {vhost!r} exists with other arguments "
            f"({reply_text(error)}); delete it (rabbitmqctl delete_queue -p {vhost} "
            f"{settings.queue}) after draining it, or set RABBIT_ARCHIVE_QUEUE to a new name"
        ) from None
    except aiormq.exceptions.ChannelAccessRefused as error:
        raise UsageError(
            f"the broker refused to declare queue {settings.queue!r} in vhost {vhost!r} "
            f"({reply_text(error)}): the user needs configure permission on it"
        ) from None


class VhostCapture:
    """Captures one vhost for the daemon's life, reconnecting whenever the broker goes away."""

    def __init__(
        self,
        settings: Settings,
        vhost: str,
        store: ArchiveStore,
        metrics: CaptureMetrics,
        health: Health,
        stop: asyncio.Event,
        bindings: BindingKeeper,
        *,
        isolated: bool = False,
    ) -> None:
        self._settings = settings
        # With several vhosts (a list or "*"), what stops one vhost is reported and retried
        # instead of ending the daemon: the others go on being captured.
        self._isolated = isolated
        self._vhost = vhost
        self._store = store
        self._metrics = metrics
        self._health = health
        self._stop = stop
        self._bindings = bindings
        self._url = settings.amqp_url_for(vhost)
        self._cluster = len(split_hosts(self._url)) > 1
        self._acks = Acknowledger(vhost, store)
        self._unavailable = False
        self._ever_connected = False
        # Largest body of each of the last few batches: a guess at what may be in flight.
        self._recent_sizes: collections.deque[int] = collections.deque(maxlen=8)
        # The fence sent after a batch's ack, awaited beside the next batches' writes: its reply
        # comes after every delivery the broker pushed before it (up to PREFETCH of them), which
        # at the start of a backlog of large messages takes most of a second to read.
        self._fencing: asyncio.Task[None] | None = None
        # Writes running beside the loop, in the order their batches were taken (see _flush).
        self._writes: list[_Write] = []

    async def run(self) -> None:
        """Keep a broker session going until stop is set; return after the final flush."""
        backoff = Backoff()
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                await self._session()
            except (QueueMismatch, UsageError) as error:
                if not self._isolated:
                    raise
                # Missing vhost, no permissions there, an archive queue of that name with other
                # arguments: this vhost only, reported and tried again later.
                self._metrics.errors.labels("vhost").inc()
                self._metrics.vhost_unavailable.labels(self._vhost).set(1)
                if not self._unavailable and self._bindings.coverage is not None:
                    self._bindings.coverage.note(CoverageEvent(self._vhost, None, "unavailable", str(error)))
                self._unavailable = True
                log.error(
                    "vhost_unavailable",
                    extra={"vhost": self._vhost, "error": str(error), "retry_seconds": VHOST_RETRY},
                )
                await sleep_unless(self._stop, VHOST_RETRY)
                continue
            except SESSION_ENDING_ERRORS as error:
                self._metrics.errors.labels("broker").inc()
                log.warning(
                    "broker_session_lost",
                    extra={"vhost": self._vhost, "error": describe(error)},
                )
            if time.monotonic() - started > 30:
                backoff.reset()
            if self._cluster and time.monotonic() - started > 1:
                # A node of a cluster went away after a working session: another answers at
                # once (archive.frames.connect moves on), so no backoff before trying them.
                continue
            if not self._stop.is_set():
                await sleep_unless(self._stop, backoff.next())

    async def _session(self) -> None:
        try:
            gate = ReadGate(tls=self._url.startswith("amqps:"))
            connection = await asyncio.wait_for(
                frames.connect(
                    self._url,
                    self._vhost,
                    client_properties={"connection_name": f"rabbit-capture {self._vhost}"},
                    transport_factory=gate,
                ),
                timeout=15,
            )
        except aiormq.exceptions.ProbableAuthenticationError:
            if self._ever_connected:  # the broker may be restarting: retry
                raise BrokerUnavailable(f"RabbitMQ at {mask_url(self._url)} refused the login") from None
            raise AccessRefused(
                f"RabbitMQ at {mask_url(self._url)} rejected the credentials: check RABBIT_ARCHIVE_AMQP_URL"
            ) from None
        except aiormq.exceptions.InvalidFrameError as error:
            # aiormq reports the broker's Connection.Close answering Connection.Open (vhost
            # missing, or no permissions in it) this way, without the reply text.
            if "Connection.Close" not in str(error) or self._ever_connected:
                # Later on, a vhost that is not up yet is a broker restart still in progress.
                raise BrokerUnavailable(f"cannot talk to {mask_url(self._url)}: {describe(error)}") from None
            raise AccessRefused(
                f"RabbitMQ did not let the user of {mask_url(self._url)} into vhost {self._vhost!r}: the "
                "vhost does not exist or the user has no permissions there"
            ) from None
        except SESSION_ENDING_ERRORS as error:
            raise BrokerUnavailable(f"cannot connect to {mask_url(self._url)}: {describe(error)}") from error
        self._ever_connected = True
        try:
            channel = await connection.channel()
            await declare_archive_queue(channel, self._settings, self._vhost)
            await channel.basic_qos(prefetch_count=self._settings.prefetch)
            log.info(
                "consuming",
                extra={
                    "vhost": self._vhost,
                    "queue": self._settings.queue,
                    "url": mask_url(self._url),
                    "node": frames.node_of(connection),
                },
            )
            async with asyncio.TaskGroup() as group:
                if self._settings.source == "firehose":
                    # One binding sees every publish of the vhost, default exchange included.
                    await frames.rpc(
                        channel,
                        frames.queue_bind(
                            self._settings.queue, firehose.TRACE_EXCHANGE, firehose.PUBLISH_EVENTS
                        ),
                    )
                    self._health.set_bound(self._vhost, True)
                else:
                    bound = functools.partial(self._health.set_bound, self._vhost, True)
                    group.create_task(
                        self._bindings.keep(connection, self._vhost, self._stop, bound),
                        name=f"bindings:{self._vhost}",
                    )
                group.create_task(self._consume(channel, gate), name=f"consume:{self._vhost}")
                if self._settings.queue_max_bytes is not None:
                    await self._count_dropped(connection)
        except* (QueueMismatch, UsageError) as errors:
            raise errors.exceptions[0] from None
        except* SESSION_ENDING_ERRORS as errors:
            raise errors.exceptions[0] from None
        except* Exception as errors:
            if not connection.is_closed:
                raise
            # aiormq fails the requests still waiting for a reply when the connection drops
            # with a bare Exception (the close reason it was given): a lost broker all the same.
            raise BrokerUnavailable(
                f"connection to vhost {self._vhost!r} lost: {describe(errors.exceptions[0])}"
            ) from None
        finally:
            self._health.set_consuming(self._vhost, False)
            self._metrics.connected.labels(self._vhost).set(0)
            if not connection.is_closed:
                with contextlib.suppress(*SESSION_ENDING_ERRORS):
                    await asyncio.wait_for(connection.close(), timeout=5)

    async def _count_dropped(self, connection: aiormq.abc.AbstractConnection) -> None:
        """Count and log each message the archive queue drops for QUEUE_MAX_BYTES (then forget it)."""
        channel = await connection.channel()

        async def on_dropped(message: aiormq.abc.DeliveredMessage) -> None:
            exchange, routing_key = dropped_from(content_header.raw_properties(message.header))
            self._metrics.dropped_messages.labels(self._vhost, exchange).inc()
            if self._bindings.coverage is not None:
                self._bindings.coverage.dropped(self._vhost, exchange)
            log.error(
                "message_dropped",
                extra={
                    "vhost": self._vhost,
                    "exchange": exchange,
                    "routing_key": routing_key,
                    "bytes": len(message.body),
                    "reason": "QUEUE_MAX_BYTES reached",
                },
            )

        await frames.consume(
            cast(aiormq.Channel, channel),
            dropped_queue(self._settings),
            on_dropped,
            consumer_tag="rabbit-archive-dropped",
            no_ack=True,
        )

    async def _consume(self, channel: aiormq.abc.AbstractChannel, gate: ReadGate) -> None:
        settings = self._settings
        batcher = Batcher(settings.batch_size, settings.batch_max_bytes)
        # Trace copies arrive with SOURCE=firehose (all publishes) and bindings+default (those
        # to the default exchange): either way they are turned back into the message.
        firehose_source = settings.source in ("firehose", "bindings+default")
        wake = asyncio.Event()
        store, vhost = self._store, self._vhost
        buffer_max_bytes = settings.buffer_max_bytes

        def on_message(
            delivery_tag: int,
            redelivered: bool,
            exchange: str,
            routing_key: str,
            properties_raw: bytes,
            body: bytes,
        ) -> None:
            if firehose_source and exchange == firehose.TRACE_EXCHANGE:
                try:
                    traced = firehose.original_message(properties_raw)
                except Exception:
                    # This function must not fail: a delivery it drops would be acknowledged with
                    # the next batch (multiple=True) without being stored. The copy is stored as is.
                    log.exception("trace_unreadable", extra={"vhost": vhost})
                    traced = None
                if traced is not None:
                    # Names as pamqp would have decoded them (see archive.records.name_columns).
                    exchange = traced.exchange.decode("utf-8", "surrogateescape")
                    routing_key = traced.routing_key.decode("utf-8", "surrogateescape")
                    properties_raw = traced.properties_raw
                    if traced.lost is not None:
                        # The broker's copy lost a property: the copy itself is stored, flagged.
                        self._metrics.trace_properties_lost.labels(self._vhost).inc()
            delivery = Delivery(delivery_tag, redelivered, exchange, routing_key, properties_raw, body)
            try:
                # While an earlier batch commits, this work overlaps the database's.
                store.prepare(vhost, delivery)
            except Exception:
                # The writer does it again and meets the error where a batch's errors are handled.
                log.exception("prepare_failed", extra={"vhost": vhost})
            buffered = batcher.add(delivery)
            # An idle writer takes it at once; a busy one with the next batch (group commit).
            wake.set()
            if buffered >= buffer_max_bytes:
                # The database is slower than the broker: hold what we have, read no more
                # (reading resumes when a flush makes room).
                gate.pause()

        cancelled = False

        def on_cancel(_frame: Any) -> None:
            # The broker cancels the consumer when the queue is deleted or its node goes
            # away; the channel stays open, so without this the loop would idle forever.
            nonlocal cancelled
            cancelled = True
            # A queue deleted and declared again has no bindings: not ready until they are made.
            self._health.set_bound(self._vhost, False)
            wake.set()

        channel.closing.add_done_callback(lambda _: wake.set())
        channel.on_consumer_cancel_callbacks.add(on_cancel)
        # Before the first delivery: batches left unfenced by an earlier channel stay in doubt.
        self._acks.start_session()
        if self._unavailable:
            self._unavailable = False
            self._metrics.vhost_unavailable.labels(self._vhost).set(0)
            if self._bindings.coverage is not None:
                self._bindings.coverage.note(CoverageEvent(self._vhost, None, "available"))
        try:
            consume_ok = await frames.consume_directly(
                cast(aiormq.Channel, channel), settings.queue, on_message, consumer_tag="rabbit-archive"
            )
        except aiormq.exceptions.ChannelAccessRefused as error:
            raise AccessRefused(
                f"RabbitMQ refused to consume queue {settings.queue!r} in vhost {self._vhost!r} "
                f"({reply_text(error)}): the user needs read permission on it"
            ) from None
        self._health.set_consuming(self._vhost, True)
        self._metrics.connected.labels(self._vhost).set(1)
        acks = _ChannelAcks(channel, settings.prefetch)
        try:
            await self._consume_until_stopped(channel, acks, batcher, gate, wake, lambda: cancelled)
            await self._drain(channel, acks, consume_ok.consumer_tag or "", batcher, gate)
        finally:
            await self._abandon_writes()
            self._abandon_fence()

    async def _consume_until_stopped(
        self,
        channel: aiormq.abc.AbstractChannel,
        acks: "_ChannelAcks",
        batcher: Batcher,
        gate: ReadGate,
        wake: asyncio.Event,
        cancelled: Callable[[], bool],
    ) -> None:
        settings = self._settings
        loop = asyncio.get_running_loop()
        idle_since = loop.time()
        while not self._stop.is_set():
            self._raise_if_fence_failed()
            if channel.is_closed:
                raise BrokerUnavailable(f"channel to vhost {self._vhost!r} closed")
            if cancelled():
                raise BrokerUnavailable(f"the broker cancelled the consumer of {self._settings.queue!r}")
            if not batcher.due(beside=self._beside_allowed()):
                try:
                    # Short waits keep the loop responsive to stop without another task;
                    # FLUSH_INTERVAL bounds them too, should a wake-up ever be missed.
                    async with asyncio.timeout(min(settings.flush_interval, 0.2)):
                        await wake.wait()
                except TimeoutError:
                    pass
            wake.clear()
            self._raise_if_write_failed()
            now = loop.time()
            if batcher.due(beside=self._beside_allowed()):
                await self._flush(channel, acks, batcher, gate, wake)
                if self._reply_is_cheap(gate):
                    self._start_fence(acks, gate, wake)
                if batcher.bytes < settings.buffer_max_bytes:
                    gate.resume()
                idle_since = now
            elif not self._writes and self._acks.has_unsettled and now - idle_since > settings.flush_interval:
                # Idle: little can be in flight, so the fence's reply comes at once.
                await self._fence_now(acks, gate)
                await self._forget_fenced()
                self._recent_sizes.clear()

    async def _drain(
        self,
        channel: aiormq.abc.AbstractChannel,
        acks: "_ChannelAcks",
        consumer_tag: str,
        batcher: Batcher,
        gate: ReadGate,
    ) -> None:
        """Stop consuming, then write and acknowledge everything already delivered."""
        if channel.is_closed:
            return
        await self._finish_writes()
        # basic.cancel waits for the channel's lock, which a fence holds until answered.
        await self._finish_fence()
        if not self._reply_is_cheap(gate):
            # A CancelOk would sit behind everything the broker already pushed: store what
            # is held and leave the rest to the broker, which requeues it when we close.
            while len(batcher):
                await self._flush(channel, acks, batcher, gate)
            log.info("drained", extra={"vhost": self._vhost, "reading_paused": True})
            return
        with gate.held_open():
            await channel.basic_cancel(consumer_tag)
        # Deliveries that arrived before CancelOk were read (and batched) before it.
        while len(batcher):
            await self._flush(channel, acks, batcher, gate)
        if self._acks.has_unfenced:
            await self._fence_now(acks, gate)
        await self._forget_fenced()
        log.info("drained", extra={"vhost": self._vhost})

    async def _flush(
        self,
        channel: aiormq.abc.AbstractChannel,
        acks: "_ChannelAcks",
        batcher: Batcher,
        gate: ReadGate,
        wake: asyncio.Event | None = None,
    ) -> None:
        """Write and acknowledge the next batch; with `wake`, a large one goes on beside the loop.

        With large rows one COPY backend of PostgreSQL is the bound while the other core idles,
        so a batch of at least half BATCH_MAX_BYTES is written as a task: once its ids are taken
        the loop may start the next full batch on a second connection (Batcher.due(beside=True)).
        The two COPYs run at once; everything else stays in the batches' order: ids (each batch
        takes all of its own before the next starts), commits (the second waits inside its
        transaction for the first to commit, and rolls back to follow it should that fail) and
        acknowledgements. Any other batch is written by the loop itself, after those in
        progress.
        """
        beside = self._beside_allowed()
        batch = batcher.take(beside=beside)
        if wake is None or not self._may_write_beside(batch):
            try:
                await self._finish_writes()
                await self._write_and_acknowledge(channel, acks, batch, gate)
            finally:
                batcher.written()
            return
        after = self._writes[-1] if self._writes else None
        write = _Write()

        async def write_beside() -> None:
            try:
                await self._write_and_acknowledge(channel, acks, batch, gate, write=write, after=after)
            finally:
                # Here, not in a done callback: the loop may see the task done before such a
                # callback ran, and take a batch while the batcher still counts this write.
                batcher.written()
                wake.set()

        write.task = asyncio.create_task(write_beside(), name=f"write:{self._vhost}")
        self._writes.append(write)
        if after is not None:
            self._metrics.batches_beside.labels(self._vhost).inc()
        taken = asyncio.ensure_future(write.ids_taken.wait())
        try:
            await asyncio.wait((write.task, taken), return_when=asyncio.FIRST_COMPLETED)
        finally:
            taken.cancel()

    def _may_write_beside(self, batch: list[Delivery]) -> bool:
        """Whether the batch may be written while another is (or may start beside it).

        Only large batches, where a second COPY pays off, and only batches whose transaction
        has nothing to do with another's: no redelivered message to match against pending
        fingerprints, and this session past the first first-time delivery (whose batch deletes
        the fingerprints of earlier sessions, see capture/acks.py), so it must run alone.
        """
        if not self._acks.read_past or any(item.redelivered for item in batch):
            return False
        return 2 * sum(item.size for item in batch) >= self._settings.batch_max_bytes

    def _beside_allowed(self) -> bool:
        """Whether a second batch may be taken now: exactly one write runs beside the loop (and
        none of its attempts failed: the second would only roll back)."""
        return len(self._writes) == 1 and not self._writes[0].task.done() and not self._writes[0].failed

    async def _finish_writes(self) -> None:
        """Wait for the writes running beside the loop; the first failure is the session's."""
        while self._writes:
            await self._writes.pop(0).task

    def _raise_if_write_failed(self) -> None:
        for write in [write for write in self._writes if write.task.done()]:
            self._writes.remove(write)
            write.task.result()

    async def _abandon_writes(self) -> None:
        """The session ends: writes still running are cancelled (their messages are requeued).

        They are awaited, so that no transaction of this session is still being ended on the
        client's side when the next session matches its redeliveries against pending rows.
        """
        writes, self._writes = self._writes, []
        tasks = [write.task for write in writes]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=ABANDON_TIMEOUT)
        for task in tasks:
            if task.done() and not task.cancelled():
                task.exception()  # retrieved: the session's own error is what gets reported

    async def _write_and_acknowledge(
        self,
        channel: aiormq.abc.AbstractChannel,
        acks: "_ChannelAcks",
        batch: list[Delivery],
        gate: ReadGate,
        *,
        write: _Write | None = None,
        after: _Write | None = None,
    ) -> None:
        batch_id = random.getrandbits(63)
        started = time.perf_counter()
        result = await self._write_until_stored(channel, batch, batch_id, write, after)
        self._health.set_database_ok(True)
        elapsed = time.perf_counter() - started
        if after is not None:
            # The ack is multiple=True, so it covers the batch written before this one: that
            # batch is acknowledged first (its failure ends the session with this one unacked).
            await after.task
        # Acknowledge only now that the rows are committed: a crash before this line means
        # redelivery, recognised by the pending fingerprints.
        await self._acks.acknowledge(acks, batch_id, batch[-1].delivery_tag)
        self._recent_sizes.append(max(len(item.body) for item in batch))
        metrics = self._metrics
        for exchange, count in result.stored_by_exchange.items():
            metrics.messages_stored.labels(self._vhost, exchange).inc(count)
            metrics.bytes_stored.labels(self._vhost, exchange).inc(result.stored_bytes[exchange])
        if result.duplicates:
            metrics.duplicates_skipped.labels(self._vhost).inc(result.duplicates)
            log.info(
                "redeliveries_recognised",
                extra={"vhost": self._vhost, "duplicates": result.duplicates},
            )
        if result.unstorable:
            metrics.unstorable_messages.labels(self._vhost).inc(result.unstorable)
        metrics.batch_seconds.labels(self._vhost).observe(elapsed)
        metrics.batch_size.labels(self._vhost).observe(len(batch))
        log.debug(
            "batch_committed",
            extra={"vhost": self._vhost, "batch_size": len(batch), "seconds": round(elapsed, 4)},
        )

    async def _write_until_stored(
        self,
        channel: aiormq.abc.AbstractChannel,
        batch: list[Delivery],
        batch_id: int,
        write: _Write | None = None,
        after: _Write | None = None,
    ) -> Any:
        """Write the batch, retrying while PostgreSQL is away; the broker keeps the messages.

        A batch written beside another (`write`, `after` the one before it) commits after it.
        """
        backoff = Backoff(first=0.5, cap=5.0)
        retry = False
        while True:
            try:
                result = await self._acks.store(
                    batch,
                    batch_id,
                    retry=retry,
                    ids_taken=None if write is None else write.ids_taken,
                    before_commit=None if after is None else after.commit_or_fail,
                )
            except _EarlierBatchFailed:
                # Rolled back, with ids that may now be lower than the batch before's: once
                # that batch is written and acknowledged, this one is written again after it.
                if write is not None:
                    write.mark_failed()
                if after is not None:
                    await after.task
                after, retry = None, True
                continue
            except DatabaseUnavailable as error:
                if write is not None:
                    write.mark_failed()
                self._health.set_database_ok(False)
                self._metrics.errors.labels("database").inc()
                log.warning(
                    "database_unavailable",
                    extra={"vhost": self._vhost, "error": str(error), "batch_size": len(batch)},
                )
                if channel.is_closed:
                    raise BrokerUnavailable("channel closed while the database was away") from None
                retry = True
                # Keep retrying after stop too: the messages are safe in the queue either
                # way, and the daemon's hard deadline ends this if the outage outlasts it.
                await asyncio.sleep(backoff.next())
                continue
            except BaseException:
                if write is not None:
                    write.mark_failed()
                raise
            if write is not None:
                write.mark_committed()
            return result

    def _reply_is_cheap(self, gate: ReadGate) -> bool:
        """Whether a request's reply can be awaited now without risking memory.

        A reply comes after every delivery the broker already pushed: up to PREFETCH messages.
        With small messages that is always within BUFFER_MAX_BYTES; with large ones the
        reply is awaited only when idle, and never while reading is paused.
        """
        settings = self._settings
        largest = max(self._recent_sizes, default=0)
        return not gate.paused and settings.prefetch * largest <= settings.buffer_max_bytes

    async def _fence(self, acks: "_ChannelAcks", gate: ReadGate) -> None:
        """basic.qos is answered only after the broker processed the acks sent before it."""
        with gate.held_open():
            await self._acks.fence(acks)

    def _start_fence(self, acks: "_ChannelAcks", gate: ReadGate, wake: asyncio.Event) -> None:
        """Fence the batches acknowledged so far, while the next ones are written.

        One fence at a time: the batches acknowledged meanwhile wait for the next one.
        """
        if self._fencing is None and self._acks.has_unfenced:
            self._fencing = asyncio.create_task(self._fence(acks, gate), name=f"fence:{self._vhost}")
            # The loop looks at a failed fence at once (the session ends as if it failed inline).
            self._fencing.add_done_callback(lambda _: wake.set())

    async def _finish_fence(self) -> None:
        """Wait for the fence in progress, if any; its failure is the session's."""
        fencing, self._fencing = self._fencing, None
        if fencing is not None:
            await fencing

    async def _fence_now(self, acks: "_ChannelAcks", gate: ReadGate) -> None:
        """Fence everything acknowledged so far (after the fence in progress, if any)."""
        await self._finish_fence()
        if self._acks.has_unfenced:
            await self._fence(acks, gate)

    def _raise_if_fence_failed(self) -> None:
        fencing = self._fencing
        if fencing is not None and fencing.done():
            self._fencing = None
            fencing.result()

    def _abandon_fence(self) -> None:
        """The session ends: a fence still waiting can settle nothing of the next one."""
        fencing, self._fencing = self._fencing, None
        if fencing is None:
            return
        if fencing.done():
            if not fencing.cancelled():
                fencing.exception()  # retrieved: the session's own error is what gets reported
        else:
            fencing.cancel()

    async def _forget_fenced(self) -> None:
        with contextlib.suppress(DatabaseUnavailable):
            # Kept and deleted with a later batch's transaction.
            await self._acks.forget_fenced()


class _ChannelAcks:
    """capture.acks.AckChannel on an aiormq channel."""

    def __init__(self, channel: aiormq.abc.AbstractChannel, prefetch: int) -> None:
        self._channel = channel
        self._prefetch = prefetch

    async def ack(self, delivery_tag: int) -> None:
        """basic.ack multiple=True."""
        await self._channel.basic_ack(delivery_tag, multiple=True)

    async def fence(self) -> None:
        """basic.qos with the same prefetch: a round trip that changes nothing.

        A connection lost while it waits fails it with a bare Exception; _session turns
        that into BrokerUnavailable for every request of the session alike.
        """
        await self._channel.basic_qos(prefetch_count=self._prefetch)
