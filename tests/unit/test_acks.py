"""The acknowledgement machine (capture.acks) driven step by step against an in-memory broker
and store: random interleavings of deliveries, redeliveries, identical twins, commits, lost
COMMIT replies, acks, fences (answered at once, or waiting while later batches are stored and
acked, as the consumer runs them), lost connections and crashes. After every step nothing the
broker settled is missing from the archive and nothing is stored twice; a drain at any point
brings the archive to exactly one row per published message.
"""

import contextlib
import itertools
from collections import Counter, deque
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from rabbit_archive.archive.amqp_codec import Properties, encode_properties
from rabbit_archive.archive.errors import DatabaseUnavailable
from rabbit_archive.capture.acks import Acknowledger
from rabbit_archive.capture.batching import Delivery
from rabbit_archive.capture.store import identify
from tests.support.memory_store import MemoryStore

VHOST = "v"
RARELY = 4
_T = TypeVar("_T")


def run(coroutine: Coroutine[Any, Any, _T]) -> _T:
    """Drive a coroutine that never suspends (every fake here answers at once)."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coroutine.close()
    raise AssertionError("the coroutine suspended")


class ConnectionLost(Exception):
    """The fake channel's connection is gone."""


@dataclass
class Message:
    ident: int
    body: bytes


@dataclass
class Channel:
    """One consumer channel: deliveries not yet acknowledged, acks sent but not yet processed."""

    broker: "Broker"
    alive: bool = True
    unacked: dict[int, Message] = field(default_factory=dict)
    acks_in_flight: list[int] = field(default_factory=list)
    tags: "itertools.count[int]" = field(default_factory=lambda: itertools.count(1))

    # Fences wait for `answer` instead of being answered at once (see AckMachine.send_fence).
    deferred_fences: bool = False
    acks_sent: int = 0
    acks_processed: int = 0
    # Per waiting fence: how many acks were sent before it.
    fences: deque[int] = field(default_factory=deque)

    async def ack(self, delivery_tag: int) -> None:
        if not self.alive:
            raise ConnectionLost
        self.acks_in_flight.append(delivery_tag)
        self.acks_sent += 1

    async def fence(self) -> None:
        if not self.alive:
            raise ConnectionLost
        if not self.deferred_fences:
            self.process_acks()
            return
        self.fences.append(self.acks_sent)
        await _Suspend()
        if not self.alive:
            raise ConnectionLost

    def answer(self) -> None:
        """The broker processes what was sent before the oldest waiting fence, then replies."""
        sent_before = self.fences.popleft()
        self.process_acks(sent_before - self.acks_processed)

    def process_acks(self, count: int | None = None) -> None:
        todo = self.acks_in_flight if count is None else self.acks_in_flight[: max(count, 0)]
        for up_to in todo:
            for tag in [tag for tag in self.unacked if tag <= up_to]:
                self.broker.settled.add(self.unacked.pop(tag).ident)
        self.acks_processed += len(todo)
        del self.acks_in_flight[: len(todo)]


class _Suspend:
    """Suspends a coroutine once: the test resumes it when the fence is answered."""

    def __await__(self) -> Any:
        yield self


@dataclass
class Broker:
    """A queue with one active consumer; a lost channel's unacked messages go back to the head."""

    queue: deque[tuple[Message, bool]] = field(default_factory=deque)
    settled: set[int] = field(default_factory=set)

    def lose(self, channel: Channel, *, acks_processed: bool) -> None:
        if acks_processed:
            channel.process_acks()
        channel.alive = False
        for message in reversed(list(channel.unacked.values())):
            self.queue.appendleft((message, True))
        channel.unacked.clear()
        channel.acks_in_flight.clear()


def delivery(tag: int, message: Message, redelivered: bool) -> Delivery:
    return Delivery(tag, redelivered, "orders", "created", b"\x00\x00", message.body)


class AckMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.broker = Broker()
        self.store = MemoryStore(strip_delivery_count=False)
        self.acks = Acknowledger(VHOST, self.store)
        self.channel: Channel | None = None
        self.buffer: list[Delivery] = []
        self.by_tag: dict[int, Message] = {}
        self.published: Counter[bytes] = Counter()
        self.bodies: dict[int, bytes] = {}
        self.batches: dict[int, list[int]] = {}
        self.batch_ids = itertools.count(1)
        self.idents = itertools.count(1)
        # Bodies a stale fingerprint could wrongly cancel (the documented limit, see README).
        self.at_risk: Counter[bytes] = Counter()
        # A fence sent and not answered yet, as the consumer runs it beside later batches.
        self.fencing: Coroutine[Any, Any, None] | None = None

    # --- helpers -------------------------------------------------------------------------

    def _stored(self) -> Counter[bytes]:
        return Counter(row[4] for row in self.store.rows)

    def _fingerprint_body(self, digest: bytes) -> bytes | None:
        for body in self.published:
            probe = Delivery(0, True, "orders", "created", b"\x00\x00", body)
            if identify(VHOST, probe, strip_delivery_count=False)[1] == digest:
                return body
        return None

    def _mark_stale(self) -> None:
        """After a loss: fingerprints of settled messages the daemon no longer knows to forget."""
        forgettable = set(self.acks.fenced_batches)
        for row in self.store.pending:
            if row.batch_id in forgettable:
                continue
            if all(ident in self.broker.settled for ident in self.batches.get(row.batch_id, [])):
                body = self._fingerprint_body(row.fingerprint)
                if body is not None:
                    self.at_risk[body] += 1

    def _session_lost(self) -> None:
        self.channel = None
        self.buffer.clear()
        if self.fencing is not None:
            # The consumer cancels a fence still waiting when its session ends.
            self.fencing.close()
            self.fencing = None

    def _connect(self) -> None:
        self.channel = Channel(self.broker, deferred_fences=True)
        self.acks.start_session()

    def _finish_fence(self) -> bool:
        """Wait for the fence in progress (the broker answers it); False if the session ended."""
        if self.fencing is None:
            return True
        assert self.channel is not None
        fencing, self.fencing = self.fencing, None
        self.channel.answer()
        try:
            fencing.send(None)
        except StopIteration:
            return True
        except ConnectionLost:
            self._session_lost()
            return False
        raise AssertionError("the fence waited twice")

    def _fence_now(self) -> bool:
        """As VhostCapture._fence_now: the fence in progress, then one for what was acked since."""
        if not self._finish_fence():
            return False
        assert self.channel is not None
        if self.acks.has_unfenced:
            self._send_fence()
            return self._finish_fence()
        return True

    def _flush(self, size: int, fault: str | None, *, fence_after: bool = False) -> None:
        assert self.channel is not None
        batch, self.buffer = self.buffer[:size], self.buffer[size:]
        batch_id = next(self.batch_ids)
        self.batches[batch_id] = [self.by_tag[item.delivery_tag].ident for item in batch]
        self.store.fault = fault
        retry = False
        while True:  # as VhostCapture._write_until_stored: the same batch until it commits
            try:
                run(self.acks.store(batch, batch_id, retry=retry))
                break
            except DatabaseUnavailable:
                retry = True
        try:
            run(self.acks.acknowledge(self.channel, batch_id, batch[-1].delivery_tag))
        except ConnectionLost:
            self._session_lost()
            return
        if fence_after and self.fencing is None:
            # As the consumer: a fence after the batch's ack, waiting beside the next batches.
            self._send_fence()

    # --- rules ---------------------------------------------------------------------------

    @rule(twin=st.sampled_from([b"twin-a", b"twin-b", None]))
    def publish(self, twin: bytes | None) -> None:
        ident = next(self.idents)
        body = twin if twin is not None else f"unique-{ident}".encode()
        self.broker.queue.append((Message(ident, body), False))
        self.published[body] += 1
        self.bodies[ident] = body

    @precondition(lambda self: self.broker.queue)
    @rule(count=st.integers(1, 4))
    def deliver(self, count: int) -> None:
        if self.channel is None:  # the daemon reconnects whenever it has no session
            self._connect()
        assert self.channel is not None
        for _ in range(min(count, len(self.broker.queue))):
            message, redelivered = self.broker.queue.popleft()
            tag = next(self.channel.tags)
            self.channel.unacked[tag] = message
            self.by_tag[tag] = message
            self.buffer.append(delivery(tag, message, redelivered))

    @precondition(lambda self: self.channel is not None and self.buffer)
    @rule(
        size=st.integers(1, 5),
        fault=st.sampled_from([None, None, "refuse", "lost_reply"]),
        fence_after=st.booleans(),
    )
    def flush(self, size: int, fault: str | None, fence_after: bool) -> None:
        self._flush(size, fault, fence_after=fence_after)

    @precondition(lambda self: self.channel is not None and len(self.buffer) >= 2)
    @rule(
        first=st.integers(1, 4),
        second=st.integers(1, 4),
        later_commits_first=st.booleans(),
        lost_between=st.sampled_from([None, None, "connection", "crash"]),
        fault=st.sampled_from([None, None, "refuse", "lost_reply"]),
    )
    def flush_beside(
        self, first: int, second: int, later_commits_first: bool, lost_between: str | None, fault: str | None
    ) -> None:
        """Two batches written at once (VhostCapture._flush, large rows), acked in their order.

        The consumer commits them in order too (tests/unit/test_writes_beside.py); here either
        may commit first, and the session may end between the two commits: the machine does not
        rely on that order."""
        assert self.channel is not None
        first = min(first, len(self.buffer) - 1)
        batches = [self.buffer[:first], self.buffer[first : first + second]]
        if not self.acks.read_past or any(item.redelivered for batch in batches for item in batch):
            # The consumer writes such batches alone (VhostCapture._may_write_beside).
            self._flush(first, fault)
            return
        del self.buffer[: first + len(batches[1])]
        ids = [next(self.batch_ids), next(self.batch_ids)]
        for batch, batch_id in zip(batches, ids, strict=True):
            self.batches[batch_id] = [self.by_tag[item.delivery_tag].ident for item in batch]
        order = [1, 0] if later_commits_first else [0, 1]
        for position, index in enumerate(order):
            self.store.fault = fault if position == 0 else None
            retry = False
            while True:
                try:
                    run(self.acks.store(batches[index], ids[index], retry=retry))
                    break
                except DatabaseUnavailable:
                    retry = True
            if position == 0 and lost_between is not None:
                # The other batch never commits; neither is acknowledged.
                self.broker.lose(self.channel, acks_processed=False)
                self._session_lost()
                if lost_between == "crash":
                    self.acks = Acknowledger(VHOST, self.store)
                self._mark_stale()
                return
        for batch, batch_id in zip(batches, ids, strict=True):
            try:
                run(self.acks.acknowledge(self.channel, batch_id, batch[-1].delivery_tag))
            except ConnectionLost:
                self._session_lost()
                return

    @rule(fault=st.sampled_from([None, None, "refuse", "lost_reply"]), roll=st.integers(0, RARELY - 1))
    def idle_rule(self, fault: str | None, roll: int) -> None:
        if not roll:
            self.idle(fault)

    def idle(self, fault: str | None) -> None:
        """Nothing to store: fence what is acked, then forget what is fenced (as the consumer)."""
        if self.channel is None:
            self._connect()
        assert self.channel is not None
        if not self._fence_now():
            return
        self.store.fault = fault
        with contextlib.suppress(DatabaseUnavailable):
            run(self.acks.forget_fenced())
        self.store.fault = None

    def _send_fence(self) -> None:
        assert self.channel is not None
        self.fencing = self.acks.fence(self.channel)
        try:
            self.fencing.send(None)
        except ConnectionLost:
            self.fencing = None
            self._session_lost()

    @precondition(lambda self: self.fencing is not None)
    @rule()
    def fence_answered(self) -> None:
        self._finish_fence()

    @precondition(lambda self: self.channel is not None)
    @rule()
    def broker_processes_acks(self) -> None:
        assert self.channel is not None
        self.channel.process_acks()

    # The rules that end a session, empty the queue or idle act on one draw in RARELY: with
    # every rule as likely, runs rarely got as far as a fence waiting beside a later batch.
    @precondition(lambda self: self.channel is not None)
    @rule(acks_processed=st.booleans(), roll=st.integers(0, RARELY - 1))
    def lose_connection(self, acks_processed: bool, roll: int) -> None:
        if roll:
            return
        assert self.channel is not None
        self.broker.lose(self.channel, acks_processed=acks_processed)
        self._session_lost()
        self._mark_stale()

    @rule(acks_processed=st.booleans(), roll=st.integers(0, RARELY - 1))
    def crash_and_restart(self, acks_processed: bool, roll: int) -> None:
        if roll:
            return
        if self.channel is not None:
            self.broker.lose(self.channel, acks_processed=acks_processed)
        self._session_lost()
        self.acks = Acknowledger(VHOST, self.store)
        self._mark_stale()

    @rule(roll=st.integers(0, RARELY - 1))
    def drain(self, roll: int) -> None:
        """Run without faults until the queue is empty: then every message is stored once."""
        if roll:
            return
        for _ in range(1000):
            if self.channel is None:
                self._connect()
            assert self.channel is not None
            if self.broker.queue:
                self.deliver(len(self.broker.queue))
            if self.buffer:
                self._flush(len(self.buffer), None)
            elif self.acks.has_unfenced or self.fencing is not None:
                self.idle(None)
            else:
                run(self.acks.forget_fenced())
                if not self.broker.queue and not self.buffer and not self.channel.unacked:
                    break
        stored = self._stored()
        for body, count in self.published.items():
            assert count - self.at_risk[body] <= stored[body] <= count, (body, count, stored[body])

    # --- invariants ----------------------------------------------------------------------

    @invariant()
    def nothing_stored_twice(self) -> None:
        stored = self._stored()
        for body, count in stored.items():
            assert count <= self.published[body], (body, count, self.published[body])

    @invariant()
    def a_fenced_batch_is_settled(self) -> None:
        """What the machine takes as fenced the broker has settled: its fingerprints may go."""
        for batch_id in self.acks.fenced_batches:
            assert all(ident in self.broker.settled for ident in self.batches[batch_id]), batch_id

    @invariant()
    def nothing_settled_is_missing(self) -> None:
        settled = Counter(self.bodies[ident] for ident in self.broker.settled)
        stored = self._stored()
        for body, count in settled.items():
            assert stored[body] >= count - self.at_risk[body], (body, count, stored[body])


AckMachine.TestCase.settings = settings(
    max_examples=600,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_acknowledgement_machine = AckMachine.TestCase


# --- the numbered windows of issue 13, one example each ------------------------------------


def test_a_fence_on_a_new_channel_does_not_forget_acks_sent_on_the_dead_one() -> None:
    """Window 1: the ack was lost with the connection; its redeliveries must still match."""
    store = MemoryStore(strip_delivery_count=False)
    acks = Acknowledger(VHOST, store)
    broker = Broker()
    old = Channel(broker)
    acks.start_session()
    first = [delivery(n, Message(n, f"m{n}".encode()), False) for n in (1, 2, 3)]
    for item in first:
        old.unacked[item.delivery_tag] = Message(item.delivery_tag, item.body)
    run(acks.store(first, 1, retry=False))
    run(acks.acknowledge(old, 1, 3))
    broker.lose(old, acks_processed=False)  # the ack never reached the broker
    new = Channel(broker)
    acks.start_session()
    run(acks.fence(new))  # idle fence on the new channel
    run(acks.forget_fenced())
    redelivered = [delivery(n + 10, Message(n, f"m{n}".encode()), True) for n in (1, 2, 3)]
    # Two batches: the redeliveries span more than one.
    result_a = run(acks.store(redelivered[:2], 2, retry=False))
    result_b = run(acks.store(redelivered[2:], 3, retry=False))
    assert result_a.duplicates + result_b.duplicates == 3
    assert len(store.rows) == 3


def test_a_batch_of_recognised_redeliveries_is_found_again_after_a_lost_commit_reply() -> None:
    """Window 2: the matched fingerprint moves to the retried batch, which so shows it committed."""
    store = MemoryStore(strip_delivery_count=False)
    acks = Acknowledger(VHOST, store)
    acks.start_session()
    first = [delivery(1, Message(1, b"m1"), False)]
    run(acks.store(first, 1, retry=False))
    acks.start_session()
    again = [delivery(7, Message(1, b"m1"), True)]
    store.fault = "lost_reply"
    with pytest.raises(DatabaseUnavailable):
        run(acks.store(again, 2, retry=False))
    result = run(acks.store(again, 2, retry=True))
    assert result.already_committed
    assert len(store.rows) == 1


def test_the_producers_own_delivery_count_header_does_not_hide_a_redelivery() -> None:
    """Window 3: a quorum queue replaces the producer's x-delivery-count on redelivery."""
    store = MemoryStore(strip_delivery_count=True)
    acks = Acknowledger(VHOST, store)
    acks.start_session()
    first = encode_properties(Properties(headers=[(b"x-delivery-count", ("I", 42)), (b"a", ("l", 1))]))
    # As measured on RabbitMQ 3.10: the header moves to the end with the queue's count, type l.
    redelivered = encode_properties(Properties(headers=[(b"a", ("l", 1)), (b"x-delivery-count", ("l", 1))]))
    run(acks.store([Delivery(1, False, "orders", "k", first, b"body")], 1, retry=False))
    acks.start_session()
    result = run(acks.store([Delivery(1, True, "orders", "k", redelivered, b"body")], 2, retry=False))
    assert result.duplicates == 1
    assert store.rows == [(VHOST, "orders", "k", first, b"body")]  # the producer's header kept


def test_stale_fingerprints_of_earlier_sessions_go_once_the_queue_is_read_past_them() -> None:
    """Window 4: a daemon killed after the broker settled its ack leaves fingerprints behind;
    once a later session commits a first-time delivery they are gone, and a later identical
    message that arrives redelivered is stored."""
    store = MemoryStore(strip_delivery_count=False)
    acks = Acknowledger(VHOST, store)
    acks.start_session()
    run(acks.store([delivery(1, Message(1, b"same"), False)], 1, retry=False))
    # Killed here: the ack was settled by the broker, the fingerprint stays.
    restarted = Acknowledger(VHOST, store)
    restarted.start_session()
    run(restarted.store([delivery(1, Message(2, b"other"), False)], 2, retry=False))
    assert {row.batch_id for row in store.pending} == {2}
    # A new, byte-identical message, delivered, lost with a connection, redelivered.
    restarted.start_session()
    result = run(restarted.store([delivery(5, Message(3, b"same"), True)], 3, retry=False))
    assert result.stored == 1
    assert Counter(row[4] for row in store.rows)[b"same"] == 2


def test_a_fence_answered_after_the_session_changed_settles_nothing_of_the_new_one() -> None:
    """A fence waits beside later batches; the reply of one sent on a channel that is gone since
    says nothing of what was acked on the new channel, nor of the old channel's acks."""
    store = MemoryStore(strip_delivery_count=False)
    acks = Acknowledger(VHOST, store)
    broker = Broker()
    old = Channel(broker, deferred_fences=True)
    acks.start_session()
    run(acks.store([delivery(1, Message(1, b"m1"), False)], 1, retry=False))
    run(acks.acknowledge(old, 1, 1))
    fencing = acks.fence(old)
    fencing.send(None)  # sent, waiting for its reply
    acks.start_session()  # the old channel is replaced before the reply is read
    new = Channel(broker, deferred_fences=True)
    run(acks.store([delivery(1, Message(2, b"m2"), False)], 2, retry=False))
    run(acks.acknowledge(new, 2, 1))
    old.answer()
    with pytest.raises(StopIteration):
        fencing.send(None)
    assert acks.fenced_batches == ()
    assert acks.has_unfenced  # batch 2 still waits for a fence of its own channel


def test_batches_acked_while_a_fence_waits_are_settled_only_by_a_later_fence() -> None:
    store = MemoryStore(strip_delivery_count=False)
    acks = Acknowledger(VHOST, store)
    channel = Channel(Broker(), deferred_fences=True)
    acks.start_session()
    run(acks.store([delivery(1, Message(1, b"m1"), False)], 1, retry=False))
    run(acks.acknowledge(channel, 1, 1))
    fencing = acks.fence(channel)
    fencing.send(None)
    run(acks.store([delivery(2, Message(2, b"m2"), False)], 2, retry=False))
    run(acks.acknowledge(channel, 2, 2))
    channel.answer()
    with pytest.raises(StopIteration):
        fencing.send(None)
    assert acks.fenced_batches == (1,)
    assert acks.has_unfenced
    run(acks.forget_fenced())
    assert {row.batch_id for row in store.pending} == {2}
