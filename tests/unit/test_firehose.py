"""firehose.original_message on trace property bytes built by hand, as RabbitMQ 3.10 builds them.

The broker (measured, tests/acceptance/test_firehose_properties.py) writes each integer property
into the trace's `properties` table as a signed 32-bit field (`I`) holding the value's low 32 bits.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rabbit_archive.archive.amqp_codec import (
    FieldValue,
    Properties,
    Table,
    decode_properties,
    encode_properties,
)
from rabbit_archive.capture.firehose import LOST_HEADER, TRACE_EXCHANGE, Traced, original_message

FULL = Properties(
    content_type=b"application/json",
    content_encoding=b"gzip",
    headers=[(b"n", ("b", -1)), (b"big", ("l", 2**40)), (b"when", ("T", 2**40))],
    delivery_mode=2,
    priority=9,
    correlation_id=b"c-\xff",
    reply_to=b"replies",
    expiration=b"60000",
    message_id=b"m-1",
    type=b"order.created",
    user_id=b"guest",
    app_id=b"shop",
    cluster_id=b"c1",
)


def broker_integer(value: int) -> FieldValue:
    """What RabbitMQ 3.10 writes for an integer property: `I`, the low 32 bits, signed."""
    low = value & 0xFFFFFFFF
    return ("I", low - (1 << 32) if low >= 1 << 31 else low)


def broker_table(props: Properties) -> Table:
    """The trace's `properties` table for these properties, as the broker builds it (reversed)."""
    table: Table = []
    for name in Properties.__slots__:
        value = getattr(props, name)
        if value is None:
            continue
        if isinstance(value, int):
            table.append((name.encode(), broker_integer(value)))
        elif name == "headers":
            table.append((b"headers", ("F", value)))
        else:
            table.append((name.encode(), ("S", value)))
    return table[::-1]


def trace_raw(table: Table, exchange: bytes = b"orders", keys: tuple[bytes, ...] = (b"eu.new",)) -> bytes:
    """The trace copy's own property bytes: only a header table, as the broker publishes it."""
    return encode_properties(
        Properties(
            headers=[
                (b"exchange_name", ("S", exchange)),
                (b"routing_keys", ("A", [("S", key) for key in keys])),
                (b"properties", ("F", table)),
                (b"node", ("S", b"rabbit@localhost")),
                (b"vhost", ("S", b"/")),
                (b"connection", ("S", b"127.0.0.1:40000 -> 127.0.0.1:5672")),
                (b"channel", ("I", 1)),
                (b"user", ("S", b"guest")),
                (b"routed_queues", ("A", [("S", b"q")])),
            ]
        )
    )


def assert_flagged(result: Traced | None, raw: bytes, lost: str, exchange: bytes = b"orders") -> None:
    """The trace copy itself, with LOST_HEADER appended to its headers and nothing else changed."""
    assert result is not None
    assert result.lost == lost
    assert (result.exchange, result.routing_key) == (TRACE_EXCHANGE.encode(), b"publish." + exchange)
    stored = decode_properties(result.properties_raw)
    assert stored.headers is not None
    assert stored.headers[-1] == (LOST_HEADER, ("S", lost.encode()))
    stored.headers = stored.headers[:-1]
    assert encode_properties(stored) == raw


def test_every_property_comes_back_exactly_when_no_timestamp_is_set() -> None:
    result = original_message(trace_raw(broker_table(FULL)))
    assert result == Traced(b"orders", b"eu.new", encode_properties(FULL), None)


@pytest.mark.parametrize("delivery_mode", [1, 2])
def test_delivery_mode_is_exact(delivery_mode: int) -> None:
    props = Properties(delivery_mode=delivery_mode)
    result = original_message(trace_raw(broker_table(props)))
    assert result is not None
    assert result.lost is None
    assert decode_properties(result.properties_raw).delivery_mode == delivery_mode


@pytest.mark.parametrize("priority", [0, 1, 9, 127, 128, 255])
def test_priority_is_exact_over_the_whole_octet(priority: int) -> None:
    result = original_message(trace_raw(broker_table(Properties(priority=priority))))
    assert result is not None
    assert result.lost is None
    assert decode_properties(result.properties_raw).priority == priority


@pytest.mark.parametrize(
    "timestamp",
    [
        pytest.param(0, id="zero"),
        pytest.param(1, id="small"),
        pytest.param(1_700_000_000, id="ordinary"),
        pytest.param(2**31 - 1, id="2038-01-19"),
        pytest.param(2**31, id="negative-as-signed-32"),
        pytest.param(4_102_444_800, id="post-2038"),
        pytest.param(2**32 - 1, id="largest-32-bit"),
        pytest.param(2**32 + 5, id="wraps-to-5"),
        pytest.param(1_700_000_000_000, id="milliseconds-negative-low-bits"),
        pytest.param(396 * 2**32 + 5, id="milliseconds-positive-low-bits"),  # 2023-11-24: reads 5
        pytest.param(2**63, id="wraps-to-0"),
        pytest.param(2**64 - 1, id="largest"),
    ],
)
def test_a_32_bit_timestamp_is_never_taken_the_trace_copy_is_stored_flagged(timestamp: int) -> None:
    # The 32-bit reading of 2**32 + 5 is 5, of 2**63 is 0: any reading also stands for other
    # timestamps, so even an ordinary-looking one is not provably the original.
    raw = trace_raw(broker_table(Properties(timestamp=timestamp, message_id=b"m")))
    assert_flagged(original_message(raw), raw, "timestamp")


@pytest.mark.parametrize("timestamp", [0, 1_700_000_000, 4_102_444_800, 1_700_000_000_000, 2**64 - 1])
def test_a_timestamp_in_an_unsigned_64_bit_field_is_exact(timestamp: int) -> None:
    # Not what 3.10 does, but a broker that wrote the whole value would be read exactly.
    result = original_message(trace_raw([(b"timestamp", ("T", timestamp))]))
    assert result is not None
    assert result.lost is None
    assert decode_properties(result.properties_raw).timestamp == timestamp


def test_a_signed_64_bit_timestamp_is_exact_unless_negative() -> None:
    exact = original_message(trace_raw([(b"timestamp", ("l", 2**63 - 1))]))
    assert exact is not None
    assert decode_properties(exact.properties_raw).timestamp == 2**63 - 1
    raw = trace_raw([(b"timestamp", ("l", -1))])
    assert_flagged(original_message(raw), raw, "timestamp")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        (b"priority", ("I", -1)),
        (b"priority", ("I", 256)),
        (b"delivery_mode", ("I", -(2**31))),
        (b"priority", ("S", b"9")),
        (b"priority", ("t", True)),
        (b"message_id", ("I", 5)),
        (b"message_id", ("S", b"x" * 256)),
        (b"headers", ("S", b"not a table")),
        (b"x-unknown", ("S", b"?")),
    ],
)
def test_any_other_value_the_properties_cannot_hold_is_flagged(name: bytes, value: FieldValue) -> None:
    raw = trace_raw([(name, value), (b"app_id", ("S", b"a"))])
    assert_flagged(original_message(raw), raw, name.decode())


def test_several_lost_properties_are_named_once_each() -> None:
    raw = trace_raw([(b"timestamp", ("I", -1)), (b"priority", ("I", 300)), (b"timestamp", ("I", 2))])
    assert_flagged(original_message(raw), raw, "timestamp,priority")


def test_the_default_exchange_and_no_routing_key() -> None:
    exact = original_message(trace_raw(broker_table(Properties(priority=1)), exchange=b"", keys=()))
    assert exact is not None
    assert exact[:2] == (b"", b"")
    raw = trace_raw(broker_table(Properties(timestamp=4_102_444_800)), exchange=b"")
    assert_flagged(original_message(raw), raw, "timestamp", exchange=b"")


@pytest.mark.parametrize(
    "raw",
    [
        encode_properties(Properties(message_id=b"plain")),
        encode_properties(Properties(headers=[(b"exchange_name", ("S", b"x"))])),
        b"\x00",
    ],
)
def test_what_is_not_a_trace_copy_is_left_alone(raw: bytes) -> None:
    assert original_message(raw) is None


@given(
    timestamp=st.none() | st.integers(0, 2**64 - 1),
    priority=st.none() | st.integers(0, 255),
    delivery_mode=st.none() | st.sampled_from([1, 2]),
    message_id=st.none() | st.binary(max_size=255),
)
def test_what_is_stored_is_the_exact_message_or_the_flagged_trace_copy(
    timestamp: int | None, priority: int | None, delivery_mode: int | None, message_id: bytes | None
) -> None:
    props = Properties(
        timestamp=timestamp, priority=priority, delivery_mode=delivery_mode, message_id=message_id
    )
    raw = trace_raw(broker_table(props))
    result = original_message(raw)
    if timestamp is None:
        assert result == Traced(b"orders", b"eu.new", encode_properties(props), None)
    else:
        assert_flagged(result, raw, "timestamp")
