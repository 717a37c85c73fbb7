"""Unit tests for capture.batching: group commit, batches bounded by count and bytes, in delivery order."""

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rabbit_archive.capture.batching import Batcher, Delivery

OVERHEAD = 64  # what Delivery.size adds to body and properties


def delivery(tag: int, body_size: int = 10, properties: bytes = b"") -> Delivery:
    return Delivery(
        delivery_tag=tag,
        redelivered=False,
        exchange="orders",
        routing_key="order.created",
        properties_raw=properties,
        body=b"x" * body_size,
    )


def tags(items: list[Delivery]) -> list[int]:
    return [item.delivery_tag for item in items]


def test_size_counts_body_properties_and_overhead() -> None:
    assert delivery(1, body_size=100, properties=b"\x00" * 7).size == 100 + 7 + OVERHEAD


def test_empty_batcher_has_nothing_to_do() -> None:
    batcher = Batcher(max_count=3, max_bytes=10_000)
    assert len(batcher) == 0
    assert not batcher.full
    assert not batcher.due()
    assert batcher.take() == []
    assert not batcher.writing, "taking nothing starts no write"


def test_full_by_count() -> None:
    batcher = Batcher(max_count=3, max_bytes=1_000_000)
    batcher.add(delivery(1))
    batcher.add(delivery(2))
    assert not batcher.full
    batcher.add(delivery(3))
    assert batcher.full


def test_full_by_bytes() -> None:
    one = delivery(1, body_size=100).size
    batcher = Batcher(max_count=1000, max_bytes=2 * one)
    batcher.add(delivery(1, body_size=100))
    assert not batcher.full
    batcher.add(delivery(2, body_size=100))
    assert batcher.full


def write(batcher: Batcher) -> list[Delivery]:
    """One whole write: take a batch and end the write."""
    batch = batcher.take()
    batcher.written()
    return batch


def test_take_respects_max_bytes() -> None:
    one = delivery(1, body_size=100).size
    batcher = Batcher(max_count=1000, max_bytes=2 * one + one // 2)
    for tag in range(1, 6):
        batcher.add(delivery(tag, body_size=100))
    assert tags(write(batcher)) == [1, 2]
    assert tags(write(batcher)) == [3, 4]
    assert tags(write(batcher)) == [5]
    assert write(batcher) == []


def test_single_oversized_delivery_forms_its_own_batch() -> None:
    batcher = Batcher(max_count=1000, max_bytes=500)
    batcher.add(delivery(1, body_size=10))
    batcher.add(delivery(2, body_size=5_000))
    batcher.add(delivery(3, body_size=10))
    assert batcher.full
    assert tags(write(batcher)) == [1]
    assert tags(write(batcher)) == [2]
    assert tags(write(batcher)) == [3]
    assert len(batcher) == 0


def test_oversized_delivery_alone_is_due_at_once() -> None:
    batcher = Batcher(max_count=1000, max_bytes=500)
    batcher.add(delivery(1, body_size=5_000))
    assert batcher.full
    assert batcher.due()
    assert tags(batcher.take()) == [1]


def test_due_as_soon_as_the_writer_is_idle_and_something_is_buffered() -> None:
    batcher = Batcher(max_count=100, max_bytes=1_000_000)
    batcher.add(delivery(1))
    # One delivery is enough: nothing waits for a timer or a fuller batch.
    assert batcher.due()
    assert tags(batcher.take()) == [1]
    assert batcher.writing
    assert not batcher.due()


def test_deliveries_during_a_write_form_the_next_batch() -> None:
    batcher = Batcher(max_count=100, max_bytes=1_000_000)
    batcher.add(delivery(1))
    batcher.take()
    batcher.add(delivery(2))
    batcher.add(delivery(3))
    assert not batcher.due(), "one writer: the next batch waits for the write in progress"
    batcher.written()
    assert not batcher.writing
    assert batcher.due()
    assert tags(batcher.take()) == [2, 3]


def test_a_full_buffer_still_waits_for_the_write_in_progress() -> None:
    batcher = Batcher(max_count=2, max_bytes=1_000_000)
    batcher.add(delivery(1))
    batcher.take()
    for tag in (2, 3, 4):
        batcher.add(delivery(tag))
    assert batcher.full
    assert not batcher.due()
    batcher.written()
    assert tags(batcher.take()) == [2, 3]
    batcher.written()
    # What one batch could not hold is due right after it.
    assert batcher.due()
    assert tags(batcher.take()) == [4]


def test_a_second_write_at_once_is_refused() -> None:
    batcher = Batcher(max_count=100, max_bytes=1_000_000)
    batcher.add(delivery(1))
    batcher.take()
    batcher.add(delivery(2))
    with pytest.raises(RuntimeError):
        batcher.take()
    assert len(batcher) == 1


def test_nothing_buffered_is_never_due() -> None:
    batcher = Batcher(max_count=100, max_bytes=1_000_000)
    batcher.add(delivery(1))
    batcher.take()
    batcher.written()
    assert not batcher.due()
    assert not batcher.writing


def test_take_returns_delivery_order_and_leaves_the_rest() -> None:
    batcher = Batcher(max_count=3, max_bytes=1_000_000)
    for tag in [7, 3, 9, 1, 5]:
        batcher.add(delivery(tag))
    assert tags(write(batcher)) == [7, 3, 9]
    assert len(batcher) == 2
    assert not batcher.full
    assert tags(write(batcher)) == [1, 5]
    assert len(batcher) == 0


def test_take_accounts_the_bytes_of_the_remainder() -> None:
    one = delivery(1, body_size=100).size
    batcher = Batcher(max_count=1000, max_bytes=3 * one)
    for tag in range(1, 5):
        batcher.add(delivery(tag, body_size=100))
    assert tags(write(batcher)) == [1, 2, 3]
    # One delivery left: the bytes of the three taken ones no longer count.
    assert not batcher.full
    batcher.add(delivery(5, body_size=100))
    assert not batcher.full
    batcher.add(delivery(6, body_size=100))
    assert batcher.full
    assert tags(write(batcher)) == [4, 5, 6]


def test_clear_drops_everything_and_says_how_many() -> None:
    one = delivery(1).size
    batcher = Batcher(max_count=1000, max_bytes=3 * one)
    for tag in range(1, 4):
        batcher.add(delivery(tag))
    assert batcher.full
    assert batcher.clear() == 3
    assert len(batcher) == 0
    assert not batcher.full
    assert not batcher.due()
    assert batcher.clear() == 0
    # Bytes were reset too: one new delivery is not "full".
    batcher.add(delivery(4))
    assert not batcher.full
    assert batcher.due()


# An operation is either the size of a body to add, or None for a take().
operations = st.lists(st.one_of(st.integers(min_value=0, max_value=400), st.none()), max_size=60)


@given(
    ops=operations,
    max_count=st.integers(min_value=1, max_value=8),
    max_bytes=st.integers(min_value=1, max_value=1_500),
)
def test_batches_keep_order_and_limits(ops: list[int | None], max_count: int, max_bytes: int) -> None:
    batcher = Batcher(max_count=max_count, max_bytes=max_bytes)
    added: list[Delivery] = []
    taken: list[Delivery] = []
    for op in ops:
        if op is None:
            pending = len(batcher)
            batch = write(batcher)
            assert len(batch) <= max_count
            if len(batch) > 1:
                assert sum(item.size for item in batch) <= max_bytes
            if pending:
                assert batch, "take() on a non-empty batcher must make progress"
            taken.extend(batch)
        else:
            item = delivery(len(added), body_size=op)
            added.append(item)
            buffered = batcher.add(item)
            assert buffered == batcher.bytes == sum(each.size for each in added[len(taken) :])
        remaining = added[len(taken) :]
        assert len(batcher) == len(remaining)
        expected_full = len(remaining) >= max_count or sum(item.size for item in remaining) >= max_bytes
        assert batcher.full == expected_full
    while len(batcher):
        taken.extend(write(batcher))
    assert tags(taken) == tags(added)


# An interleaving in time: each delivery comes `gap` seconds after the one before with a body of
# `size` bytes; each write (COPY and commit) lasts the next of `durations`, cycled.
arrivals = st.lists(
    st.tuples(st.floats(min_value=0.0, max_value=0.02), st.integers(min_value=0, max_value=400)), max_size=80
)
durations = st.lists(st.floats(min_value=0.0001, max_value=0.05), min_size=1, max_size=10)


@given(
    arrivals=arrivals,
    durations=durations,
    max_count=st.integers(min_value=1, max_value=8),
    max_bytes=st.integers(min_value=1, max_value=1_500),
)
def test_group_commit_over_interleavings(
    arrivals: list[tuple[float, int]], durations: list[float], max_count: int, max_bytes: int
) -> None:
    """The consumer loop against a writer of drawn speeds: never idle while anything waits, a
    delivery waits only for the write in progress and for full batches ahead of it, order kept."""
    batcher = Batcher(max_count=max_count, max_bytes=max_bytes)
    times = list(itertools.accumulate(gap for gap, _ in arrivals))
    writes = itertools.cycle(durations)
    write_ends: float | None = None
    buffered: list[Delivery] = []
    written: list[Delivery] = []
    # Per delivery: its arrival, the end of the write in progress then (None: the writer was idle),
    # and the start of its own write.
    arrived_at: dict[int, float] = {}
    busy_until: dict[int, float | None] = {}
    started_at: dict[int, float] = {}
    left_behind: set[int] = set()
    index = 0
    while index < len(arrivals) or write_ends is not None:
        if write_ends is not None and (index == len(arrivals) or write_ends <= times[index]):
            now, write_ends = write_ends, None
            batcher.written()
        else:
            now = times[index]
            item = delivery(index, body_size=arrivals[index][1])
            arrived_at[index], busy_until[index] = now, write_ends
            buffered.append(item)
            batcher.add(item)
            index += 1
        # The consumer loop, woken by the delivery or by the end of the write.
        if batcher.due():
            batch = batcher.take()
            assert tags(batch) == tags(buffered[: len(batch)])
            del buffered[: len(batch)]
            assert len(batch) <= max_count
            if len(batch) > 1:
                assert sum(item.size for item in batch) <= max_bytes
            if buffered:
                # Whatever stays behind does so because this batch is full.
                assert (
                    len(batch) == max_count or sum(item.size for item in batch) + buffered[0].size > max_bytes
                )
                left_behind.update(tags(buffered))
            for item in batch:
                started_at[item.delivery_tag] = now
            written.extend(batch)
            write_ends = now + next(writes)
        assert len(batcher) == len(buffered)
        assert not (buffered and not batcher.writing), "the writer is idle while deliveries wait"
        assert batcher.writing == (write_ends is not None)
    assert tags(written) == list(range(len(arrivals)))
    for tag, arrived in arrived_at.items():
        ends = busy_until[tag]
        if ends is None:
            assert started_at[tag] == arrived, "an idle writer takes a delivery at once"
        elif tag not in left_behind:
            assert started_at[tag] == ends, "a delivery goes with the batch after the write in progress"
        else:
            assert started_at[tag] > ends


def test_a_full_batch_may_be_written_beside_the_write_in_progress() -> None:
    one = delivery(1, body_size=100).size
    batcher = Batcher(max_count=1000, max_bytes=2 * one)
    batcher.add(delivery(1, body_size=100))
    batcher.add(delivery(2, body_size=100))
    assert tags(batcher.take()) == [1, 2]
    batcher.add(delivery(3, body_size=100))
    assert not batcher.due(beside=True), "a batch not full waits for the write in progress"
    batcher.add(delivery(4, body_size=100))
    batcher.add(delivery(5, body_size=100))
    assert not batcher.due(), "beside only when the caller allows it"
    assert batcher.due(beside=True)
    assert tags(batcher.take(beside=True)) == [3, 4]
    assert not batcher.due(beside=True), "two writes at most"
    with pytest.raises(RuntimeError):
        batcher.take(beside=True)
    batcher.written()
    assert batcher.writing
    assert not batcher.due(), "one write still in progress"
    batcher.written()
    assert not batcher.writing
    assert tags(batcher.take()) == [5]


@given(
    ops=st.lists(
        st.one_of(st.integers(min_value=0, max_value=400), st.sampled_from(["take", "beside", "written"])),
        max_size=80,
    ),
    max_count=st.integers(min_value=1, max_value=8),
    max_bytes=st.integers(min_value=1, max_value=1_500),
)
def test_writes_beside_keep_order_limits_and_at_most_two_in_progress(
    ops: list[int | str], max_count: int, max_bytes: int
) -> None:
    """Batches taken beside a write come in delivery order, full by bytes, never a third at once."""
    batcher = Batcher(max_count=max_count, max_bytes=max_bytes)
    added: list[Delivery] = []
    taken: list[Delivery] = []
    in_progress = 0
    for op in ops:
        if isinstance(op, int):
            item = delivery(len(added), body_size=op)
            added.append(item)
            batcher.add(item)
        elif op == "written":
            if in_progress:
                batcher.written()
                in_progress -= 1
        else:
            beside = op == "beside"
            second = beside and in_progress == 1 and batcher.bytes >= max_bytes
            expected = bool(len(batcher)) and (in_progress == 0 or second)
            assert batcher.due(beside=beside) == expected
            if not expected:
                continue
            batch = batcher.take(beside=beside)
            assert len(batch) <= max_count
            if len(batch) > 1:
                assert sum(item.size for item in batch) <= max_bytes
            taken.extend(batch)
            in_progress += 1
        assert batcher.writing == (in_progress > 0)
        assert len(batcher) == len(added) - len(taken)
    assert tags(taken) == tags(added[: len(taken)])
