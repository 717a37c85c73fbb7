"""Unit tests for capture.batching: batches close by count, bytes or age and keep delivery order."""

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
    batcher = Batcher(max_count=3, max_bytes=10_000, max_age=1.0)
    assert len(batcher) == 0
    assert not batcher.full
    assert not batcher.due(now=1_000.0)
    assert batcher.wait_time(now=1_000.0) is None
    assert batcher.take() == []


def test_closes_by_count() -> None:
    batcher = Batcher(max_count=3, max_bytes=1_000_000, max_age=60.0)
    batcher.add(delivery(1), now=0.0)
    batcher.add(delivery(2), now=0.0)
    assert not batcher.full
    assert not batcher.due(now=0.0)
    batcher.add(delivery(3), now=0.0)
    assert batcher.full
    assert batcher.due(now=0.0)
    assert batcher.wait_time(now=0.0) == 0.0


def test_closes_by_bytes() -> None:
    one = delivery(1, body_size=100).size
    batcher = Batcher(max_count=1000, max_bytes=2 * one, max_age=60.0)
    batcher.add(delivery(1, body_size=100), now=0.0)
    assert not batcher.full
    batcher.add(delivery(2, body_size=100), now=0.0)
    assert batcher.full
    assert batcher.due(now=0.0)
    assert batcher.wait_time(now=0.0) == 0.0


def test_take_respects_max_bytes() -> None:
    one = delivery(1, body_size=100).size
    batcher = Batcher(max_count=1000, max_bytes=2 * one + one // 2, max_age=60.0)
    for tag in range(1, 6):
        batcher.add(delivery(tag, body_size=100), now=0.0)
    assert tags(batcher.take()) == [1, 2]
    assert tags(batcher.take()) == [3, 4]
    assert tags(batcher.take()) == [5]
    assert batcher.take() == []


def test_single_oversized_delivery_forms_its_own_batch() -> None:
    batcher = Batcher(max_count=1000, max_bytes=500, max_age=60.0)
    batcher.add(delivery(1, body_size=10), now=0.0)
    batcher.add(delivery(2, body_size=5_000), now=0.0)
    batcher.add(delivery(3, body_size=10), now=0.0)
    assert batcher.full
    assert tags(batcher.take()) == [1]
    assert tags(batcher.take()) == [2]
    assert tags(batcher.take()) == [3]
    assert len(batcher) == 0


def test_oversized_delivery_alone_is_due_at_once() -> None:
    batcher = Batcher(max_count=1000, max_bytes=500, max_age=60.0)
    batcher.add(delivery(1, body_size=5_000), now=0.0)
    assert batcher.full
    assert batcher.due(now=0.0)
    assert tags(batcher.take()) == [1]


def test_due_by_age_of_the_first_item() -> None:
    batcher = Batcher(max_count=100, max_bytes=1_000_000, max_age=2.0)
    batcher.add(delivery(1), now=10.0)
    batcher.add(delivery(2), now=11.5)
    assert not batcher.due(now=11.9)
    # Two seconds after the first delivery, though the second one is only half a second old.
    assert batcher.due(now=12.0)
    assert batcher.due(now=100.0)


def test_wait_time_shrinks_as_time_passes() -> None:
    batcher = Batcher(max_count=100, max_bytes=1_000_000, max_age=2.0)
    batcher.add(delivery(1), now=10.0)
    assert batcher.wait_time(now=10.0) == 2.0
    assert batcher.wait_time(now=10.5) == 1.5
    batcher.add(delivery(2), now=11.0)
    # A later delivery does not push the deadline back.
    assert batcher.wait_time(now=11.0) == 1.0
    assert batcher.wait_time(now=12.0) == 0.0
    assert batcher.wait_time(now=50.0) == 0.0


def test_age_restarts_with_the_first_delivery_after_emptying() -> None:
    batcher = Batcher(max_count=100, max_bytes=1_000_000, max_age=2.0)
    batcher.add(delivery(1), now=0.0)
    assert tags(batcher.take()) == [1]
    batcher.add(delivery(2), now=100.0)
    assert not batcher.due(now=101.0)
    assert batcher.wait_time(now=101.0) == 1.0
    assert batcher.due(now=102.0)


def test_take_returns_delivery_order_and_leaves_the_rest() -> None:
    batcher = Batcher(max_count=3, max_bytes=1_000_000, max_age=60.0)
    for tag in [7, 3, 9, 1, 5]:
        batcher.add(delivery(tag), now=0.0)
    assert tags(batcher.take()) == [7, 3, 9]
    assert len(batcher) == 2
    assert not batcher.full
    assert tags(batcher.take()) == [1, 5]
    assert len(batcher) == 0


def test_take_accounts_the_bytes_of_the_remainder() -> None:
    one = delivery(1, body_size=100).size
    batcher = Batcher(max_count=1000, max_bytes=3 * one, max_age=60.0)
    for tag in range(1, 5):
        batcher.add(delivery(tag, body_size=100), now=0.0)
    assert tags(batcher.take()) == [1, 2, 3]
    # One delivery left: the bytes of the three taken ones no longer count.
    assert not batcher.full
    batcher.add(delivery(5, body_size=100), now=1.0)
    assert not batcher.full
    batcher.add(delivery(6, body_size=100), now=1.0)
    assert batcher.full
    assert tags(batcher.take()) == [4, 5, 6]


def test_clear_drops_everything_and_says_how_many() -> None:
    one = delivery(1).size
    batcher = Batcher(max_count=1000, max_bytes=3 * one, max_age=1.0)
    for tag in range(1, 4):
        batcher.add(delivery(tag), now=0.0)
    assert batcher.full
    assert batcher.clear() == 3
    assert len(batcher) == 0
    assert not batcher.full
    assert batcher.wait_time(now=5.0) is None
    assert not batcher.due(now=5.0)
    assert batcher.clear() == 0
    # Bytes were reset too: one new delivery is not "full".
    batcher.add(delivery(4), now=10.0)
    assert not batcher.full
    assert batcher.wait_time(now=10.0) == 1.0


# An operation is either the size of a body to add, or None for a take().
operations = st.lists(st.one_of(st.integers(min_value=0, max_value=400), st.none()), max_size=60)


@given(
    ops=operations,
    max_count=st.integers(min_value=1, max_value=8),
    max_bytes=st.integers(min_value=1, max_value=1_500),
)
def test_batches_keep_order_and_limits(ops: list[int | None], max_count: int, max_bytes: int) -> None:
    batcher = Batcher(max_count=max_count, max_bytes=max_bytes, max_age=1.0)
    added: list[Delivery] = []
    taken: list[Delivery] = []
    for now, op in enumerate(ops):
        if op is None:
            pending = len(batcher)
            batch = batcher.take()
            assert len(batch) <= max_count
            if len(batch) > 1:
                assert sum(item.size for item in batch) <= max_bytes
            if pending:
                assert batch, "take() on a non-empty batcher must make progress"
            taken.extend(batch)
        else:
            item = delivery(len(added), body_size=op)
            added.append(item)
            batcher.add(item, now=float(now))
        remaining = added[len(taken) :]
        assert len(batcher) == len(remaining)
        expected_full = len(remaining) >= max_count or sum(item.size for item in remaining) >= max_bytes
        assert batcher.full == expected_full
    while len(batcher):
        taken.extend(batcher.take())
    assert tags(taken) == tags(added)
