"""One replay from start (or resume) to finish: read in archive-id order, tag, publish, confirm, record.

The confirmed cursor is the position (archive id, or line of an export file) of the last
message such that it and every message before it were settled by the broker; it is saved
in the replay history about once a second and at the end, so a resume sends again at most
the window that was unconfirmed when the replay stopped.
"""

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from rabbit_archive.archive.amqp_codec import CodecError
from rabbit_archive.archive.db import CONNECTION_ERRORS, Connection
from rabbit_archive.archive.errors import (
    AccessRefused,
    ArchiveError,
    BrokerUnavailable,
    DatabaseUnavailable,
    UsageError,
    describe,
)
from rabbit_archive.archive.stopping import Backoff, sleep_unless
from rabbit_archive.replay import history, selection
from rabbit_archive.replay.deaths import origin
from rabbit_archive.replay.edits import HeaderEdits
from rabbit_archive.replay.filters import Filters
from rabbit_archive.replay.following import Following
from rabbit_archive.replay.history import Target
from rabbit_archive.replay.publisher import CONNECTION_LOST_ERRORS, Nacked, Publisher, Returned
from rabbit_archive.replay.records import from_export_line
from rabbit_archive.replay.selection import ArchivedMessage
from rabbit_archive.replay.tagging import Tag, tagged_properties

log = logging.getLogger(__name__)

# Publishes awaiting their confirm: enough to keep the broker busy, few enough that an
# interruption sends at most this many messages twice.
WINDOW = 500
# Body bytes in flight: a run of 20 MB messages waits for confirms instead of piling up.
WINDOW_BYTES = 16 * 1024 * 1024
SAVE_EVERY = 0.2
# Seconds to wait for the confirms in flight when the replay stops: with the rest of the
# shutdown (saving, closing a connection that may not answer), a stop takes under 30 s.
STOP_GRACE = 20.0
# How long a replay whose broker node went away tries the other nodes of AMQP_URL before it stops
# as interrupted (a node that is down refuses at once: the next one usually answers in the first
# round), and the pauses between rounds when none answers. A stop request cuts it short.
FAILOVER_DEADLINE = 30.0
FAILOVER_PAUSES = (0.2, 5.0)  # first and longest (archive.stopping.Backoff)

T = TypeVar("T")


class ReplayStopped(ArchiveError):
    """The replay ended before every message was confirmed; it can be resumed."""


@dataclass
class Counts:
    """What one run of a replay did (a resume starts from the stored counts)."""

    published: int = 0
    confirmed: int = 0
    returned: int = 0
    nacked: int = 0
    skipped: int = 0
    # Of the skipped, those `--to-origin` could not send back (no x-death): expected, not a fault.
    without_death: int = 0


@dataclass
class Job:
    """A replay to run: what to read, where to send it, how, and where it stands."""

    replay_id: str
    target: Target
    tag: Tag
    selected: int
    filters: Filters | None = None
    file: Path | None = None
    rate: float | None = None
    max_queue_depth: int | None = None
    new_message_id: bool = False
    edits: HeaderEdits = field(default_factory=HeaderEdits)
    # `--canary N`: after the first N publishes of this run are settled, the gate is awaited with
    # the queues they went to; it returns to go on or raises ReplayStopped.
    canary: int | None = None
    canary_gate: "Callable[[list[str]], Awaitable[None]] | None" = None
    # Where a resume continues (the last position answered, with every earlier one), and the
    # history's confirmed cursor when it lies before (messages nacked or returned in between).
    cursor: int = 0
    counts: Counts = field(default_factory=Counts)
    confirmed_cursor: int | None = None
    # Positions nacked or returned (-> "nacked" / "returned"), sent again first on resume;
    # execute() keeps it up to date, so that it holds what is still not routed at the end.
    failed: dict[int, str] = field(default_factory=dict)
    # Go on with messages archived later (`run --follow`) until stopped.
    follow: bool = False


class Pacer:
    """Spaces publishes evenly at `rate` messages per second (no limit when None)."""

    def __init__(self, rate: float | None, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = 1.0 / rate if rate else 0.0
        self._clock = clock
        self._next = clock()

    def delay(self) -> float:
        """Seconds to wait before the next publish; reserves its slot."""
        if not self._interval:
            return 0.0
        now = self._clock()
        # After a pause (queue depth, slow broker) the rate resumes instead of bursting.
        self._next = max(self._next, now - self._interval)
        wait = self._next - now
        self._next += self._interval
        return max(0.0, wait)


@dataclass(slots=True)
class _InFlight:
    """One message in the confirm window: its position, its publish (None: skipped), body size,
    whether it is a failed one sent again, and how to publish it again on a new connection."""

    position: int
    confirmation: "asyncio.Future[None] | None"
    size: int
    retry: bool
    send: "Callable[[], asyncio.Future[None]] | None"


def _answered(confirmation: "asyncio.Future[None]") -> bool:
    """Whether the broker answered this publish (confirm, nack or return), as opposed to a publish
    still waiting or one that failed with its connection."""
    if not confirmation.done() or confirmation.cancelled():
        return False
    error = confirmation.exception()
    return error is None or isinstance(error, (Nacked, Returned))


class ConfirmWindow:
    """Publishes in flight, in order; settles the head as the broker answers.

    Two cursors: `cursor` is the last position such that it and every earlier one were
    answered (confirmed, nacked, returned or skipped): a resume continues after it.
    `confirmed_cursor` is the last position such that it and every earlier one were confirmed
    as routed (or skipped): it stops before the first message nacked or returned. The
    positions nacked or returned in between are in `failed` (position -> "nacked" or
    "returned"); a resume sends them again first (added with retry=True).
    """

    def __init__(
        self,
        cursor: int,
        counts: Counts,
        *,
        confirmed_cursor: int | None = None,
        failed: dict[int, str] | None = None,
    ) -> None:
        self._pending: deque[_InFlight] = deque()
        self.bytes_in_flight = 0
        self.cursor = cursor
        self.confirmed_cursor = cursor if confirmed_cursor is None else confirmed_cursor
        self.failed: dict[int, str] = failed if failed is not None else {}
        self._counts = counts

    def __len__(self) -> int:
        return len(self._pending)

    def add(
        self,
        position: int,
        confirmation: "asyncio.Future[None] | None",
        size: int = 0,
        *,
        retry: bool = False,
        send: "Callable[[], asyncio.Future[None]] | None" = None,
    ) -> None:
        """Track a publish of the message at position, with its body size (retry: a failed one
        again; send: publishes it again, for resend_lost)."""
        self._pending.append(_InFlight(position, confirmation, size, retry, send))
        self.bytes_in_flight += size

    def _outcome(self, confirmation: "asyncio.Future[None] | None") -> str:
        """'confirmed', 'nacked', 'returned' or 'skipped'; BrokerUnavailable for a lost publish."""
        if confirmation is None:
            return "skipped"
        error = confirmation.exception() if not confirmation.cancelled() else asyncio.CancelledError()
        if error is None:
            return "confirmed"
        if isinstance(error, Nacked):
            return "nacked"
        if isinstance(error, Returned):
            return "returned"
        raise BrokerUnavailable(f"lost the broker while publishing: {describe(error)}")

    def _count(self, outcome: str, delta: int) -> None:
        if outcome == "confirmed":
            self._counts.confirmed += delta
        elif outcome == "nacked":
            self._counts.nacked += delta
        elif outcome == "returned":
            self._counts.returned += delta

    def settle(self) -> None:
        """Advance the cursors over the answered head; a lost broker raises BrokerUnavailable."""
        while self._pending and (
            self._pending[0].confirmation is None or self._pending[0].confirmation.done()
        ):
            head = self._pending[0]
            outcome = self._outcome(head.confirmation)
            self._pending.popleft()
            self.bytes_in_flight -= head.size
            position = head.position
            if head.retry:
                # Counted as failed before: counted again by its new outcome.
                self._count(self.failed.pop(position, ""), -1)
            self._count(outcome, 1)
            if outcome in ("nacked", "returned"):
                self.failed[position] = outcome
                log.warning(f"replay.{outcome}", extra={"position": position})
            if not head.retry:
                self.cursor = max(self.cursor, position)
            if not self.failed:
                self.confirmed_cursor = self.cursor
            elif outcome not in ("nacked", "returned") and position < min(self.failed):
                self.confirmed_cursor = max(self.confirmed_cursor, position)

    def resend_lost(self) -> int:
        """Publish again (each through its send, on the new connection) every message of the window
        that the lost connection left unanswered, in window order; returns how many.

        What the broker answered before the loss keeps its outcome; only these can reach the
        target twice (the broker may have routed one whose confirm was lost with the connection).
        """
        resent = 0
        for entry in self._pending:
            if entry.confirmation is None or entry.send is None or _answered(entry.confirmation):
                continue
            # A publish still waiting belongs to the dead connection: nothing will answer it.
            entry.confirmation.cancel()
            entry.confirmation = entry.send()
            resent += 1
        return resent

    async def wait_for_room(
        self, size: int, max_bytes: int | None = None, stop: asyncio.Event | None = None
    ) -> None:
        """Wait until fewer than size publishes (and fewer than max_bytes body bytes) are in flight.

        Returns early, with the window still full, once stop is set.
        """
        while self._pending and (
            len(self._pending) >= size or (max_bytes is not None and self.bytes_in_flight >= max_bytes)
        ):
            if stop is not None and stop.is_set():
                return
            head = self._pending[0].confirmation
            if head is not None:
                await _first_of(head, stop)
            self.settle()

    async def drain(self, grace: float, stop: asyncio.Event | None = None, *, strict: bool = True) -> None:
        """Wait for every publish in flight (or the timeout, or stop), settling what was answered.

        With strict=False a lost publish stops the settling instead of raising.
        """
        if self._pending:
            confirmations = [entry.confirmation for entry in self._pending if entry.confirmation is not None]
            if confirmations:
                waiting = asyncio.ensure_future(asyncio.wait(confirmations, timeout=grace))
                await _first_of(waiting, stop)
                waiting.cancel()
        if strict:
            self.settle()
        else:
            with contextlib.suppress(BrokerUnavailable):
                self.settle()

    def abandon(self) -> None:
        """Forget what is still in flight (the connection is gone); their outcome is unknown."""
        for entry in self._pending:
            if entry.confirmation is not None:
                entry.confirmation.cancel()
        self._pending.clear()
        self.bytes_in_flight = 0


async def _first_of(awaitable: "asyncio.Future[Any]", stop: asyncio.Event | None) -> None:
    """Wait for awaitable to finish, or for stop to be set (the awaitable is left running)."""
    if stop is None:
        await asyncio.wait([awaitable])
        return
    if stop.is_set():
        return
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([awaitable, stopped], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()


async def _archive_items(connection: Connection, job: Job) -> AsyncIterator[tuple[int, ArchivedMessage]]:
    assert job.filters is not None
    messages = selection.messages(connection, job.filters, after_id=job.cursor, views=False)
    while True:
        try:
            message = await anext(messages)
        except StopAsyncIteration:
            return
        except CONNECTION_ERRORS as error:
            raise DatabaseUnavailable(f"lost PostgreSQL during the replay: {describe(error)}") from None
        yield message.id, message


async def _archive_retries(connection: Connection, job: Job) -> AsyncIterator[tuple[int, ArchivedMessage]]:
    for archive_id in sorted(job.failed):
        try:
            message = await selection.message(connection, archive_id)
        except CONNECTION_ERRORS as error:
            raise DatabaseUnavailable(f"lost PostgreSQL during the replay: {describe(error)}") from None
        except UsageError:
            # Pruned since: it cannot be sent again; reported like a message that cannot be republished.
            outcome = job.failed.pop(archive_id)
            setattr(job.counts, outcome, getattr(job.counts, outcome) - 1)
            job.counts.skipped += 1
            log.error(
                "replay.skipped",
                extra={"archive_id": archive_id, "error": "no longer archived"},
            )
            continue
        yield archive_id, message


async def file_retries(path: Path, positions: list[int]) -> AsyncIterator[tuple[int, ArchivedMessage]]:
    """The messages on the given lines of an export file, in file order."""
    wanted = set(positions)
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if number in wanted and line.strip():
                yield number, from_export_line(line, f"{path}:{number}")


async def _items(connection: Connection, job: Job) -> AsyncIterator[tuple[int, ArchivedMessage, bool]]:
    """What the job publishes: first the positions that failed before (retry), then after the cursor."""
    if job.failed:
        again = (
            _archive_retries(connection, job)
            if job.file is None
            else file_retries(job.file, sorted(job.failed))
        )
        async for position, message in again:
            yield position, message, True
    rest = _archive_items(connection, job) if job.file is None else file_items(job.file, job.cursor)
    async for position, message in rest:
        yield position, message, False


async def _later(
    messages: AsyncIterator[tuple[int, ArchivedMessage]], job: Job
) -> AsyncIterator[tuple[int, ArchivedMessage, bool]]:
    """A follower's next round, counted into its selection as it comes."""
    async for position, message in messages:
        job.selected += 1
        yield position, message, False


async def file_items(path: Path, after_line: int = 0) -> AsyncIterator[tuple[int, ArchivedMessage]]:
    """The messages of an export file with their line numbers, after after_line."""
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if number <= after_line or not line.strip():
                continue
            yield number, from_export_line(line, f"{path}:{number}")


def count_file(path: Path) -> int:
    """Validate an export file line by line and count its messages."""
    try:
        with path.open(encoding="utf-8") as lines:
            total = 0
            for number, line in enumerate(lines, start=1):
                if line.strip():
                    from_export_line(line, f"{path}:{number}")
                    total += 1
            return total
    except OSError as error:
        raise UsageError(f"cannot read {path}: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not a UTF-8 text file written by 'rabbit-replay export'") from None


def destination(target: Target, message: ArchivedMessage) -> tuple[str, str] | None:
    """Exchange and routing key to publish the message to (None: `--to-origin` without x-death)."""
    routing_key = message.routing_key_bytes.decode("utf-8", "surrogateescape")
    if target.queue is not None:
        return "", target.queue
    if target.origin is not None:
        return origin(message.properties_raw, target.origin)
    if target.exchange is not None:
        exchange = target.exchange
    else:
        exchange = message.exchange_bytes.decode("utf-8", "surrogateescape")
    return exchange, routing_key if target.routing_key is None else target.routing_key


class Progress:
    """Progress callbacks; the CLI shows a bar on a terminal and nothing otherwise."""

    def start(self, total: int, done: int) -> None:
        """The replay starts with `done` of `total` already confirmed."""

    def advance(self, published: int) -> None:
        """`published` messages were sent so far in this run."""

    def stop(self) -> None:
        """The replay ended."""


async def execute(
    job: Job,
    *,
    connection: Connection,
    publisher: Publisher,
    stop: asyncio.Event,
    progress: Progress,
) -> Counts:
    """Publish the job's messages after its cursor, in order; ReplayStopped or an ArchiveError when cut short.

    Messages that failed before (job.failed) are sent first. When the broker connection is lost
    and AMQP_URL names several nodes, the replay goes on with another node (see fail_over): the
    unanswered window is sent again there and the loop continues. However the loop ends (done,
    a stop request, a lost broker no other node replaced, a vanished target queue, any
    exception), the publishes in flight are waited for (STOP_GRACE at most, cut short when the
    connection is gone), and the counts and both cursors are saved before it returns or raises.
    On return, job.failed holds what the broker nacked or returned: the caller marks such a
    replay incomplete. `connection` holds the replay's lock and serves both the reads and the
    history.
    """
    counts = job.counts
    window = ConfirmWindow(job.cursor, counts, confirmed_cursor=job.confirmed_cursor, failed=job.failed)
    pacer = Pacer(job.rate)
    items = _items(connection, job)
    following: Following | None = None
    if job.follow and job.filters is not None:
        following = Following(connection, job.replay_id, job.filters, job.cursor)
        await following.start()
    last_save = time.monotonic()
    depth_budget = 0  # publishes --max-queue-depth still allows before the depth is read again
    progress.start(job.selected, counts.confirmed + counts.nacked + counts.skipped)

    async def save() -> None:
        try:
            await history.save_progress(
                connection,
                job.replay_id,
                published=counts.published,
                confirmed=counts.confirmed,
                returned=counts.returned,
                nacked=counts.nacked,
                skipped=counts.skipped,
                without_death=counts.without_death,
                cursor=window.confirmed_cursor,
            )
            await history.save_failures(
                connection, job.replay_id, failed=sorted(window.failed), settled_cursor=window.cursor
            )
        except CONNECTION_ERRORS as error:
            raise DatabaseUnavailable(f"lost PostgreSQL during the replay: {describe(error)}") from None

    canary_queues: set[str] = set()
    canary_sent = 0
    # The message being handled: kept when the broker goes away before it was published, so
    # that it is published on the next node.
    current: tuple[int, ArchivedMessage, bool] | None = None
    failure: BaseException | None = None
    try:
        while True:
            try:
                if current is None:
                    current = await anext(items, None)
                    if current is None:
                        # Everything was published: the last confirms may still be lost with a node.
                        await window.drain(STOP_GRACE, stop)
                        if following is None or stop.is_set():
                            break
                        # A follower caught up: keep what is confirmed, then wait for more.
                        await save()
                        last_save = time.monotonic()
                        items = _later(await following.next_round(stop), job)
                        continue
                if stop.is_set():
                    break
                position, message, retry = current
                delay = pacer.delay()
                if delay and await sleep_unless(stop, delay):
                    break
                if job.max_queue_depth is not None and job.target.queue is not None:
                    if depth_budget <= 0:
                        # The broker counts a message in the queue once it confirms it: settle what
                        # is in flight, then read the depth and publish only what still fits.
                        limit = max(job.max_queue_depth, 1)
                        await window.drain(STOP_GRACE, stop)
                        queued: int | None = None
                        while not stop.is_set():
                            queued = await _unless_stopped(stop, _target_depth(publisher, job.target.queue))
                            if queued is None or queued < limit:
                                break
                            if await sleep_unless(stop, 0.2):
                                break
                        if stop.is_set() or queued is None:
                            break
                        depth_budget = limit - queued
                    depth_budget -= 1
                await window.wait_for_room(WINDOW, WINDOW_BYTES, stop)
                if stop.is_set():
                    break
                route = destination(job.target, message)
                if route is None:
                    counts.skipped += 1
                    counts.without_death += 1
                    log.warning("replay.no_death", extra={"archive_id": message.id})
                    window.add(position, None, retry=retry)
                    current = None
                    continue
                exchange, routing_key = route
                try:
                    properties = tagged_properties(
                        job.edits.apply(message.properties_raw),
                        job.tag,
                        archive_id=message.id,
                        replayed_at=int(time.time()),
                        original_exchange=message.exchange_bytes,
                        original_routing_key=message.routing_key_bytes,
                        captured_at=int(message.captured_at.timestamp()),
                        new_message_id=str(uuid.uuid4()) if job.new_message_id else None,
                    )
                    # Names that are not UTF-8 survive as surrogate escapes; they must fit a shortstr.
                    if len(routing_key.encode("utf-8", "surrogateescape")) > 255:
                        raise CodecError("routing key longer than 255 bytes")
                except (CodecError, UnicodeEncodeError) as error:
                    # Stored bytes that cannot go on the wire again: reported, never silently dropped.
                    counts.skipped += 1
                    log.error("replay.skipped", extra={"archive_id": message.id, "error": describe(error)})
                    window.add(position, None, retry=retry)
                    current = None
                    continue
                # Sent again as the very same bytes (same x-replayed-at) if its node goes away.
                send = functools.partial(
                    publisher.publish, exchange, routing_key, properties, message.body, message.id
                )
                window.add(position, send(), len(message.body), retry=retry, send=send)
                current = None
                counts.published += 1
                progress.advance(counts.published)
                window.settle()
                if job.canary is not None:
                    canary_sent += 1
                    if not exchange:
                        canary_queues.add(routing_key)
                    if canary_sent >= job.canary:
                        # The canary's confirms first: the gate judges what the broker holds.
                        await window.drain(STOP_GRACE, stop)
                        if stop.is_set():
                            break
                        await save()
                        gate, job.canary = job.canary_gate, None
                        if gate is not None:
                            await gate(sorted(canary_queues))
                if time.monotonic() - last_save >= SAVE_EVERY:
                    await save()
                    last_save = time.monotonic()
            except Exception as error:
                resent = await fail_over(error, publisher, window, stop)
                if resent is None:
                    raise
                depth_budget = 0  # the depth is read again on the new node
                counts.published += resent
                progress.advance(counts.published)
    except BaseException as error:  # every way out waits for the confirms and saves
        failure = error
    finally:
        progress.stop()
        if following is not None:
            with contextlib.suppress(*CONNECTION_ERRORS):
                await following.close()
    lost = isinstance(failure, (*CONNECTION_LOST_ERRORS, BrokerUnavailable))
    # A connection that is gone answers nothing more: what it confirmed is settled at once.
    await window.drain(0 if lost and publisher.closed else STOP_GRACE, strict=False)
    if failure is None:
        try:
            window.settle()  # a publish that failed (not a late one) is a lost broker
        except BrokerUnavailable as error:
            failure = error
    unconfirmed = len(window)
    window.abandon()
    try:
        await save()
    except DatabaseUnavailable:
        if failure is None or not isinstance(failure, DatabaseUnavailable):
            raise
    if failure is not None:
        if isinstance(failure, CONNECTION_LOST_ERRORS):
            raise BrokerUnavailable(f"lost the broker during the replay: {describe(failure)}") from None
        raise failure
    if unconfirmed:
        raise ReplayStopped(f"{unconfirmed} publishes were not confirmed within {STOP_GRACE:.0f} s")
    if stop.is_set():
        raise ReplayStopped("interrupted")
    return counts


def _broker_error(error: BaseException) -> bool:
    # aiormq fails what waits on a dropped connection with its close reason, or a bare Exception.
    return isinstance(error, (*CONNECTION_LOST_ERRORS, BrokerUnavailable)) or type(error) is Exception


async def fail_over(
    error: BaseException, publisher: Publisher, window: ConfirmWindow, stop: asyncio.Event
) -> int | None:
    """After error, go on with another node of AMQP_URL: how many unanswered publishes of the
    window were sent again there.

    None when error is not a lost connection (a channel error, a refused publish, a broker that
    does not answer), AMQP_URL names one node, or stop is set first: the caller ends the replay
    as before (interrupted, resumable). BrokerUnavailable when no node took the replay within
    FAILOVER_DEADLINE; ReplayStopped when the node that answered lacks a target found before (a
    classic queue whose node is down).
    """
    if not _broker_error(error) or stop.is_set():
        return None
    if not publisher.can_fail_over or not publisher.lost or publisher.refused is not None:
        return None
    lost_at = time.monotonic()
    lost_node = publisher.node
    # What the broker answered before the connection went is settled and keeps its outcome.
    with contextlib.suppress(BrokerUnavailable):
        window.settle()
    log.warning(
        "replay.broker_lost",
        extra={
            "node": lost_node,
            "error": describe(error),
            "unconfirmed": len(window),
        },
    )
    pauses = Backoff(*FAILOVER_PAUSES)
    last_error: BaseException = error
    while not stop.is_set():
        left = lost_at + FAILOVER_DEADLINE - time.monotonic()
        if left <= 0:
            break
        try:
            node = await _unless_stopped(stop, asyncio.wait_for(publisher.reconnect(), left))
        except AccessRefused:
            raise
        except UsageError as missing:
            raise ReplayStopped(
                f"lost the broker node {lost_node} and moved to {publisher.node}, where {missing}"
            ) from None
        except Exception as failed:
            # Every node refused, or the new connection went too: the next round, after a pause.
            if not _broker_error(failed):
                raise
            last_error = failed
            left = lost_at + FAILOVER_DEADLINE - time.monotonic()
            await sleep_unless(stop, max(0.0, min(pauses.next(), left)))
            continue
        if node is None:  # stopped while connecting
            break
        resent = window.resend_lost()
        log.warning(
            "replay.failed_over",
            extra={
                "node": node,
                "lost_node": lost_node,
                "seconds": round(time.monotonic() - lost_at, 3),
                "resent": resent,
            },
        )
        return resent
    if stop.is_set():
        return None
    raise BrokerUnavailable(
        f"lost the broker node {lost_node} and no node of RABBIT_ARCHIVE_AMQP_URL took the replay within "
        f"{FAILOVER_DEADLINE:.0f} s: {describe(last_error)}"
    )


async def _unless_stopped(stop: asyncio.Event, coroutine: "Coroutine[Any, Any, T]") -> T | None:
    """The coroutine's result, or None when stop is set first (the coroutine is cancelled)."""
    task = asyncio.ensure_future(coroutine)
    await _first_of(task, stop)
    if task.done():
        return task.result()
    task.cancel()
    return None


async def _target_depth(publisher: Publisher, queue: str) -> int:
    """The target queue's depth; a queue deleted during the replay stops it (resumable)."""
    try:
        return await publisher.queue_depth(queue)
    except UsageError:
        raise ReplayStopped(
            f"the target queue {queue!r} was deleted during the replay: declare it again"
        ) from None
