"""One replay from start (or resume) to finish: read in archive-id order, tag, publish, confirm, record.

The confirmed cursor is the position (archive id, or line of an export file) of the last
message such that it and every message before it were settled by the broker; it is saved
in the replay history about once a second and at the end, so a resume sends again at most
the window that was unconfirmed when the replay stopped.
"""

import asyncio
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from archive.amqp_codec import CodecError
from archive.db import CONNECTION_ERRORS, Connection
from archive.errors import ArchiveError, BrokerUnavailable, DatabaseUnavailable, UsageError, describe
from archive.stopping import sleep_unless
from replay import history, selection
from replay.filters import Filters
from replay.history import Target
from replay.publisher import BROKER_ERRORS, Nacked, Publisher
from replay.records import from_export_line
from replay.selection import ArchivedMessage
from replay.tagging import Tag, tagged_properties

log = logging.getLogger("rabbit_archive.replay")

# Publishes awaiting their confirm: enough to keep the broker busy, few enough that an
# interruption sends at most this many messages twice.
WINDOW = 500
# Body bytes in flight: a run of 20 MB messages waits for confirms instead of piling up.
WINDOW_BYTES = 16 * 1024 * 1024
SAVE_EVERY = 0.2
STOP_GRACE = 30.0


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
    cursor: int = 0
    counts: Counts = field(default_factory=Counts)


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


class ConfirmWindow:
    """Publishes in flight, in order; settles the head as the broker confirms."""

    def __init__(self, cursor: int, counts: Counts) -> None:
        # A None task stands for a message skipped without publishing: settled at once.
        self._pending: deque[tuple[int, asyncio.Task[None] | None, int]] = deque()
        self.bytes_in_flight = 0
        self.cursor = cursor
        self._counts = counts

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, position: int, task: "asyncio.Task[None] | None", size: int = 0) -> None:
        """Track a publish of the message at position, with its body size."""
        self._pending.append((position, task, size))
        self.bytes_in_flight += size

    def settle(self) -> None:
        """Advance the cursor over the confirmed head; a lost broker raises BrokerUnavailable."""
        while self._pending and (self._pending[0][1] is None or self._pending[0][1].done()):
            position, task, size = self._pending[0]
            if task is None:
                error: BaseException | None = None
            else:
                error = task.exception() if not task.cancelled() else asyncio.CancelledError()
            if task is None:
                pass
            elif error is None:
                self._counts.confirmed += 1
            elif isinstance(error, Nacked):
                self._counts.nacked += 1
                log.warning("message nacked", extra={"event": "replay.nacked", "position": position})
            else:
                raise BrokerUnavailable(f"lost the broker while publishing: {describe(error)}")
            self._pending.popleft()
            self.bytes_in_flight -= size
            self.cursor = position

    async def wait_for_room(self, size: int, max_bytes: int | None = None) -> None:
        """Wait until fewer than size publishes (and fewer than max_bytes body bytes) are in flight."""
        while self._pending and (
            len(self._pending) >= size or (max_bytes is not None and self.bytes_in_flight >= max_bytes)
        ):
            head = self._pending[0][1]
            if head is not None:
                await asyncio.wait([head])
            self.settle()

    async def drain(self, grace: float) -> None:
        """Wait for every publish in flight (or the timeout), settling what was confirmed."""
        if self._pending:
            tasks = [task for _, task, _ in self._pending if task is not None]
            if tasks:
                await asyncio.wait(tasks, timeout=grace)
        self.settle()

    def abandon(self) -> None:
        """Forget what is still in flight (the connection is gone); their outcome is unknown."""
        for _, task, _ in self._pending:
            if task is not None:
                task.cancel()
        self._pending.clear()
        self.bytes_in_flight = 0


async def _archive_items(connection: Connection, job: Job) -> AsyncIterator[tuple[int, ArchivedMessage]]:
    assert job.filters is not None
    messages = selection.messages(connection, job.filters, after_id=job.cursor)
    while True:
        try:
            message = await anext(messages)
        except StopAsyncIteration:
            return
        except CONNECTION_ERRORS as error:
            raise DatabaseUnavailable(f"lost PostgreSQL during the replay: {describe(error)}") from None
        yield message.id, message


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


def destination(target: Target, message: ArchivedMessage) -> tuple[str, str]:
    """Exchange and routing key to publish the message to."""
    routing_key = message.routing_key_bytes.decode("utf-8", "surrogateescape")
    if target.queue is not None:
        return "", target.queue
    if target.exchange is not None:
        return target.exchange, routing_key
    return message.exchange_bytes.decode("utf-8", "surrogateescape"), routing_key


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

    `connection` holds the replay's lock and serves both the reads and the history.
    """
    counts = job.counts
    base_returned = counts.returned
    window = ConfirmWindow(job.cursor, counts)
    pacer = Pacer(job.rate)
    items = _archive_items(connection, job) if job.file is None else file_items(job.file, job.cursor)
    last_save = time.monotonic()
    depth_budget = 0  # publishes --max-queue-depth still allows before the depth is read again
    progress.start(job.selected, counts.confirmed + counts.nacked + counts.skipped)

    async def save() -> None:
        counts.returned = base_returned + publisher.returned
        try:
            await history.save_progress(
                connection,
                job.replay_id,
                published=counts.published,
                confirmed=counts.confirmed,
                returned=counts.returned,
                nacked=counts.nacked,
                cursor=window.cursor,
            )
        except CONNECTION_ERRORS as error:
            raise DatabaseUnavailable(f"lost PostgreSQL during the replay: {describe(error)}") from None

    try:
        async for position, message in items:
            if stop.is_set():
                break
            delay = pacer.delay()
            if delay and await sleep_unless(stop, delay):
                break
            if job.max_queue_depth is not None and job.target.queue is not None:
                if depth_budget <= 0:
                    # The broker counts a message in the queue once it confirms it: settle what
                    # is in flight, then read the depth and publish only what still fits.
                    limit = max(job.max_queue_depth, 1)
                    await window.drain(STOP_GRACE)
                    while (queued := await publisher.queue_depth(job.target.queue)) >= limit:
                        if await sleep_unless(stop, 0.2):
                            break
                    depth_budget = limit - queued
                if stop.is_set():
                    break
                depth_budget -= 1
            await window.wait_for_room(WINDOW, WINDOW_BYTES)
            exchange, routing_key = destination(job.target, message)
            try:
                properties = tagged_properties(
                    message.properties_raw,
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
                log.error(
                    "message cannot be republished",
                    extra={"event": "replay.skipped", "archive_id": message.id, "error": describe(error)},
                )
                window.add(position, None)
                continue
            window.add(
                position,
                publisher.publish(exchange, routing_key, properties, message.body),
                len(message.body),
            )
            counts.published += 1
            progress.advance(counts.published)
            window.settle()
            if time.monotonic() - last_save >= SAVE_EVERY:
                await save()
                last_save = time.monotonic()
        await window.drain(STOP_GRACE)
        await save()
    except BROKER_ERRORS as error:
        window.abandon()
        await save()
        raise BrokerUnavailable(f"lost the broker during the replay: {describe(error)}") from None
    except BrokerUnavailable:
        window.abandon()
        await save()
        raise
    finally:
        progress.stop()
    if len(window):
        raise ReplayStopped(f"{len(window)} publishes were not confirmed within {STOP_GRACE:.0f} s")
    if stop.is_set():
        raise ReplayStopped("interrupted")
    return counts
