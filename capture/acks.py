"""The acknowledgement machine of one vhost: commit, then ack, then fence, then forget.

A batch's rows and the fingerprints of its messages commit in one transaction; only then is
the batch acknowledged (`basic.ack multiple=True` on its last delivery tag). A message the
broker redelivers (after a crash or a lost connection) whose fingerprint is pending was
already stored and is dropped, one stored copy cancelling one redelivered copy.

Fingerprints are the only defence against duplicates, and a stale one could make a new,
byte-identical message look like a redelivery; so each is deleted once its message can no
longer come back, by one of two rules:

* **Fenced.** `basic.qos` is answered only after the broker processed everything sent
  before it on the connection, acks included: once a fence sent after a batch's ack is
  answered on the same channel, those messages are settled and their fingerprints go (with
  the next batch's transaction, or when idle).
* **Read past.** A batch acked on a connection that was lost before its fence was answered
  is in doubt: the ack may never have reached the broker. Its fingerprints stay. When the
  broker closes a consumer's channel it requeues that consumer's unacknowledged messages
  ahead of every other message of the queue, and with a single active consumer no later
  session receives anything before that. So once a later session of the same vhost has
  committed a batch holding a message delivered for the first time (not redelivered),
  every message requeued from earlier sessions has been delivered and matched before it:
  the fingerprints of all earlier sessions of the vhost are deleted in that transaction.

A fence on a new channel says nothing about acks sent on a dead one, so each session
starts with nothing unfenced. The machine speaks to the broker only through `AckChannel`
and to PostgreSQL only through `ArchiveStore`, so it is driven step by step in unit tests
(tests/unit/test_acks.py) with an in-memory store and broker.
"""

import asyncio
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from rabbit_archive.capture.batching import Delivery
from rabbit_archive.capture.store import ArchiveStore, WriteResult


class AckChannel(Protocol):
    """What the machine needs from one AMQP channel."""

    async def ack(self, delivery_tag: int) -> None:
        """Acknowledge every delivery up to and including this tag (multiple=True)."""

    async def fence(self) -> None:
        """A request whose reply comes after the broker processed the acks sent before it."""


class Acknowledger:
    """Commit → ack → fence → forget for one vhost; one broker session at a time."""

    def __init__(self, vhost: str, store: ArchiveStore) -> None:
        self._vhost = vhost
        self._store = store
        # Acked and fenced: their messages cannot come back, their fingerprints can go.
        self._fenced: list[int] = []
        # Acked on the current session's channel, fence not answered yet.
        self._unfenced: list[int] = []
        self.session_id = 0
        # Whether this session has committed a first-time delivery (see "Read past").
        self._read_past = False

    def start_session(self) -> int:
        """A new channel consumes: what was unfenced on the old one stays in doubt."""
        self.session_id = random.getrandbits(63) or 1
        self._unfenced = []
        self._read_past = False
        return self.session_id

    @property
    def has_unsettled(self) -> bool:
        """Whether a fence or a forget is due (checked when the consumer is idle)."""
        return bool(self._fenced or self._unfenced)

    @property
    def fenced_batches(self) -> tuple[int, ...]:
        """Batches known settled whose fingerprints are still to be deleted."""
        return tuple(self._fenced)

    @property
    def read_past(self) -> bool:
        """Whether this session committed a first-time delivery: no earlier session's
        redelivery can come any more, and no batch of it will delete their fingerprints."""
        return self._read_past

    @property
    def has_unfenced(self) -> bool:
        """Whether batches acked on this session wait for a fence."""
        return bool(self._unfenced)

    async def store(
        self,
        batch: Sequence[Delivery],
        batch_id: int,
        *,
        retry: bool,
        ids_taken: asyncio.Event | None = None,
        before_commit: Callable[[], Awaitable[None]] | None = None,
    ) -> WriteResult:
        """Write the batch in one transaction, with the fenced batches' fingerprints deleted in it.

        Raises what the store raises (DatabaseUnavailable); nothing is lost then: the fenced
        batches are forgotten with a later transaction. Two batches may be stored at once (see
        `ids_taken` and `before_commit` in ArchiveStore.write_batch): they commit and are
        acknowledged in the order they were taken.
        """
        forget, self._fenced = self._fenced, []
        read_past = not self._read_past and any(not delivery.redelivered for delivery in batch)
        try:
            result = await self._store.write_batch(
                self._vhost,
                batch,
                batch_id,
                forget,
                retry=retry,
                session_id=self.session_id,
                forget_other_sessions=read_past,
                ids_taken=ids_taken,
                before_commit=before_commit,
            )
        except BaseException:
            self._fenced = forget + self._fenced
            raise
        if read_past:
            self._read_past = True
        return result

    async def acknowledge(self, channel: AckChannel, batch_id: int, last_tag: int) -> None:
        """Ack a committed batch (only ever after store() returned for it)."""
        await channel.ack(last_tag)
        self._unfenced.append(batch_id)

    async def fence(self, channel: AckChannel) -> None:
        """Wait until the broker processed the acks sent so far on this channel.

        Batches may be stored and acked while it waits; one fence at a time.
        """
        session, sent_before = self.session_id, len(self._unfenced)
        await channel.fence()
        if self.session_id != session:
            # Answered on a channel that is gone: it says nothing of the new channel's acks.
            return
        # Only the batches acked before the fence was sent are settled by its reply.
        self._fenced.extend(self._unfenced[:sent_before])
        del self._unfenced[:sent_before]

    async def forget_fenced(self) -> None:
        """Delete the fenced batches' fingerprints now (when idle); kept for later on failure."""
        if not self._fenced:
            return
        forget, self._fenced = self._fenced, []
        try:
            await self._store.forget_pending(forget)
        except BaseException:
            self._fenced = forget + self._fenced
            raise
