"""Batches written two at a time (capture.consumer, large rows): whatever each attempt's speed
and failures, the batches take their ids, commit and are acknowledged in the order they were
taken, and each commits exactly once.

The capture loop's own write path runs here against a store that interleaves with it at every
step: hypothesis draws how many turns of the event loop each step of each attempt takes and
which attempts fail, before or after taking their ids.
"""

import asyncio
import itertools
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rabbit_archive.archive.errors import DatabaseUnavailable
from rabbit_archive.capture import consumer as consumer_module
from rabbit_archive.capture.batching import Delivery
from rabbit_archive.capture.consumer import VhostCapture, _Write
from rabbit_archive.capture.discovery import BindingKeeper
from rabbit_archive.capture.health import Health
from rabbit_archive.capture.metrics import CaptureMetrics
from rabbit_archive.capture.read_gate import ReadGate
from rabbit_archive.capture.store import WriteResult
from rabbit_archive.config.settings import Settings


@dataclass
class Attempt:
    """How one attempt at a batch goes: turns of the event loop per step, and where it fails."""

    turns: tuple[int, int, int]  # before taking ids, copying, before COMMIT
    fails: str | None  # None, "before_ids" or "before_commit"


@dataclass
class OrderedStore:
    """Takes ids from one counter and records commits, failing the attempts it was told to."""

    attempts: dict[int, list[Attempt]]  # per batch (its first delivery tag), attempt by attempt
    next_id: "itertools.count[int]" = field(default_factory=lambda: itertools.count(1))
    committed: list[tuple[int, list[int]]] = field(default_factory=list)  # (batch, ids)

    def prepare(self, vhost: str, delivery: Delivery) -> None:
        """Nothing ahead."""

    async def forget_pending(self, batch_ids: Sequence[int]) -> None:
        """Nothing pending."""

    async def write_batch(
        self,
        vhost: str,
        deliveries: Sequence[Delivery],
        batch_id: int,
        forget: Sequence[int],
        *,
        retry: bool = False,
        session_id: int = 0,
        forget_other_sessions: bool = False,
        ids_taken: asyncio.Event | None = None,
        before_commit: Callable[[], Awaitable[None]] | None = None,
    ) -> WriteResult:
        batch = deliveries[0].delivery_tag
        plan = self.attempts[batch]
        attempt = plan.pop(0) if len(plan) > 1 else plan[0]
        await turns(attempt.turns[0])
        if attempt.fails == "before_ids":
            raise DatabaseUnavailable("injected before the ids")
        ids = [next(self.next_id) for _ in deliveries]
        if ids_taken is not None:
            ids_taken.set()
        await turns(attempt.turns[1])
        if attempt.fails == "before_commit":
            raise DatabaseUnavailable("injected before COMMIT")
        if before_commit is not None:
            await before_commit()  # what it raises rolls this attempt back
        await turns(attempt.turns[2])
        self.committed.append((batch, ids))
        return WriteResult(stored=len(deliveries))


async def turns(count: int) -> None:
    for _ in range(count):
        await asyncio.sleep(0)


@dataclass
class Channel:
    """Records acknowledgements (multiple=True) in the order sent."""

    acked: list[int] = field(default_factory=list)
    is_closed: bool = False

    async def ack(self, delivery_tag: int) -> None:
        self.acked.append(delivery_tag)

    async def fence(self) -> None:
        """Not used here."""


class NoBackoff:
    def __init__(self, **_: Any) -> None:
        pass

    def next(self) -> float:
        return 0.0


attempts = st.builds(
    Attempt,
    turns=st.tuples(st.integers(0, 8), st.integers(0, 8), st.integers(0, 8)),
    fails=st.sampled_from([None, None, "before_ids", "before_commit"]),
)
# Up to three attempts per batch; the last one drawn is never a failure (the database comes back).
plans = st.lists(st.lists(attempts, min_size=1, max_size=3), min_size=2, max_size=6)


@settings(max_examples=300, deadline=None)
@given(plans=plans)
def test_batches_written_beside_commit_and_are_acknowledged_in_order(plans: list[list[Attempt]]) -> None:
    for plan in plans:
        plan[-1].fails = None
    batches = [
        [Delivery(10 * index + tag, False, "x", "k", b"", b"b") for tag in (1, 2)]
        for index in range(len(plans))
    ]
    store = OrderedStore(
        {batch[0].delivery_tag: list(plan) for batch, plan in zip(batches, plans, strict=True)}
    )
    channel = Channel()
    asyncio.run(write_two_at_a_time(store, channel, batches))

    first_tags = [batch[0].delivery_tag for batch in batches]
    assert [batch for batch, _ in store.committed] == first_tags, "each commits once, in order"
    ids = [row_id for _, batch_ids in store.committed for row_id in batch_ids]
    assert ids == sorted(ids), "ids follow the order of the batches"
    assert channel.acked == [batch[-1].delivery_tag for batch in batches]


async def write_two_at_a_time(store: OrderedStore, channel: Channel, batches: list[list[Delivery]]) -> None:
    """As VhostCapture._flush with every batch large: the next starts once the ids are taken,
    with at most two in progress."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(consumer_module, "Backoff", NoBackoff)
        capture = VhostCapture(
            Settings(),
            "v",
            store,
            CaptureMetrics(),
            Health(),
            asyncio.Event(),
            cast(BindingKeeper, None),
        )
        capture._acks.start_session()
        gate, acks = ReadGate(tls=False), cast(Any, channel)
        writes: list[_Write] = []
        for batch in batches:
            after = writes[-1] if writes else None
            if len(writes) >= 2:
                await asyncio.wait([writes[-2].task])
            write = _Write()
            write.task = asyncio.create_task(
                capture._write_and_acknowledge(
                    cast(Any, channel), acks, batch, gate, write=write, after=after
                )
            )
            writes.append(write)
            taken = asyncio.ensure_future(write.ids_taken.wait())
            await asyncio.wait([write.task, taken], return_when=asyncio.FIRST_COMPLETED)
            taken.cancel()
        await asyncio.gather(*(write.task for write in writes))
