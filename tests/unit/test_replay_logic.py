"""Pure replay logic: tagging keeps every original byte, pacing, confirms, destinations, export lines."""

import asyncio
import base64
import dataclasses
import json
import struct
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rabbit_archive.archive import frames
from rabbit_archive.archive.amqp_codec import (
    PROPERTY_NAMES,
    CodecError,
    FieldValue,
    Properties,
    Table,
    decode_properties,
    encode_properties,
    encode_table,
)
from rabbit_archive.archive.errors import BrokerUnavailable, UsageError
from rabbit_archive.replay.history import Target
from rabbit_archive.replay.publisher import Nacked
from rabbit_archive.replay.records import from_export_line as read_line
from rabbit_archive.replay.records import full_json, summary_json
from rabbit_archive.replay.runner import ConfirmWindow, Counts, Pacer, destination
from rabbit_archive.replay.selection import ArchivedMessage
from rabbit_archive.replay.tagging import (
    ORIGINAL_CAPTURED_AT,
    ORIGINAL_EXCHANGE,
    ORIGINAL_ROUTING_KEY,
    REPLAY_ARCHIVE_ID,
    REPLAY_ID,
    REPLAY_OF,
    REPLAY_REASON,
    REPLAYED_AT,
    Tag,
    is_tag,
    tagged_properties,
)

# ---------------------------------------------------------------------------- tagging

BIG_ARCHIVE_ID = 2**40 + 12_345
REPLAY = "5f0c4c1e-6a43-4c52-9a35-0b3d1c3f2a10"
REPLAYED_AT_S = 1_760_000_000
CAPTURED_AT_S = 1_750_000_000
RAW_EXCHANGE = b"orders.\xff\xfe"
RAW_KEY = b"eu.\xc3(\x00.created"

# Every field type, each integer at the edge of its width, and what pamqp cannot represent.
ORIGINAL_HEADERS: Table = [
    (b"int8", ("b", -128)),
    (b"uint8", ("B", 255)),
    (b"int16", ("s", -32768)),
    (b"uint16", ("u", 65535)),
    (b"int32", ("I", -(2**31))),
    (b"uint32", ("i", 2**32 - 1)),
    (b"int64", ("l", -(2**63))),
    (b"int64-L", ("L", 2**63 - 1)),
    (b"small-long", ("l", 1)),
    (b"float", ("f", 1.5)),
    (b"neg-zero", ("f", -0.0)),
    (b"nan-payload", ("f", b"\x7f\xc0\x00\x01")),
    (b"double", ("d", 0.1)),
    (b"decimal", ("D", (2, -12345))),
    (b"timestamp", ("T", 1_700_000_000)),
    (b"bytes", ("x", b"\x00\x01\xfe\xff")),
    (b"bad-utf8", ("S", b"caf\xe9 \xff\xfe and a NUL \x00 end")),
    (b"empty", ("S", b"")),
    (
        b"nested",
        (
            "F",
            [
                (b"inner", ("I", 5)),
                (b"deeper", ("F", [(b"k", ("u", 1)), (b"raw", ("x", b"\xff"))])),
                (b"list", ("A", [("b", -1), ("S", b"\xff")])),
            ],
        ),
    ),
    (b"array", ("A", [("b", 1), ("S", b"s"), ("A", [("d", 2.5), ("V", None)]), ("F", []), ("T", 0)])),
    (b"void", ("V", None)),
    (b"true", ("t", True)),
    (b"false", ("t", False)),
    (b"odd-bool", ("t", 7)),
    (b"dup", ("S", b"first")),
    (b"dup", ("I", 2)),
    (b"key-\xff", ("B", 1)),
    (b"", ("S", b"empty key")),
]

ORIGINAL = Properties(
    content_type=b"application/json",
    content_encoding=b"gzip",
    headers=ORIGINAL_HEADERS,
    delivery_mode=2,
    priority=7,
    correlation_id=b"corr-\xff\x00",
    reply_to=b"amq.rabbitmq.reply-to",
    expiration=b"60000",
    message_id=b"msg-1",
    timestamp=1_700_000_001,
    type=b"order.placed",
    user_id=b"guest",
    app_id=b"shop",
    cluster_id=b"c1",
)
OTHER_PROPERTIES = [name for name in PROPERTY_NAMES if name != "headers"]


def tag(raw: bytes, replay: Tag | None = None, **overrides: Any) -> bytes:
    arguments: dict[str, Any] = {
        "archive_id": BIG_ARCHIVE_ID,
        "replayed_at": REPLAYED_AT_S,
        "original_exchange": RAW_EXCHANGE,
        "original_routing_key": RAW_KEY,
        "captured_at": CAPTURED_AT_S,
    }
    arguments.update(overrides)
    return tagged_properties(raw, replay or Tag(REPLAY), **arguments)


def added_headers(tagged: Properties, original: Table | None) -> dict[bytes, FieldValue]:
    """The entries after the original ones, as a dict (asserting no key repeats)."""
    added = (tagged.headers or [])[len(original or []) :]
    assert len({key for key, _ in added}) == len(added)
    return dict(added)


def test_every_original_header_keeps_its_bytes_type_and_place() -> None:
    tagged_raw = tag(encode_properties(ORIGINAL))
    tagged = decode_properties(tagged_raw)
    assert tagged.headers is not None
    assert tagged.headers[: len(ORIGINAL_HEADERS)] == ORIGINAL_HEADERS
    # Byte for byte: the original table body is a prefix of the new table body.
    original_body = encode_table(ORIGINAL_HEADERS)[4:]
    assert encode_table(tagged.headers)[4:].startswith(original_body)
    assert original_body in tagged_raw
    # The types in particular: a 64-bit 1 stays 'l', not the smallest width.
    assert dict(tagged.headers[: len(ORIGINAL_HEADERS)])[b"small-long"] == ("l", 1)


def test_every_other_property_is_unchanged() -> None:
    tagged = decode_properties(tag(encode_properties(ORIGINAL)))
    for name in OTHER_PROPERTIES:
        assert getattr(tagged, name) == getattr(ORIGINAL, name), name
    # Nothing else changed: putting the original headers back gives the original bytes.
    assert encode_properties(dataclasses.replace(tagged, headers=ORIGINAL_HEADERS)) == encode_properties(
        ORIGINAL
    )


def test_the_replay_headers_are_appended_with_their_amqp_types() -> None:
    tagged = decode_properties(tag(encode_properties(ORIGINAL), Tag(REPLAY, "fix for INC-42 ü")))
    assert added_headers(tagged, ORIGINAL_HEADERS) == {
        REPLAY_ID: ("S", REPLAY.encode()),
        REPLAY_ARCHIVE_ID: ("l", BIG_ARCHIVE_ID),
        REPLAYED_AT: ("T", REPLAYED_AT_S),
        ORIGINAL_EXCHANGE: ("S", RAW_EXCHANGE),
        ORIGINAL_ROUTING_KEY: ("S", RAW_KEY),
        ORIGINAL_CAPTURED_AT: ("T", CAPTURED_AT_S),
        REPLAY_REASON: ("S", "fix for INC-42 ü".encode()),
    }
    assert [key for key, _ in (tagged.headers or [])[len(ORIGINAL_HEADERS) :]] == [
        REPLAY_ID,
        REPLAY_ARCHIVE_ID,
        REPLAYED_AT,
        ORIGINAL_EXCHANGE,
        ORIGINAL_ROUTING_KEY,
        ORIGINAL_CAPTURED_AT,
        REPLAY_REASON,
    ]
    assert tagged.message_id == ORIGINAL.message_id
    assert all(is_tag(key) for key in added_headers(tagged, ORIGINAL_HEADERS))


def test_the_archive_id_is_a_64_bit_long_on_the_wire() -> None:
    tagged_raw = tag(encode_properties(ORIGINAL))
    entry = bytes([len(REPLAY_ARCHIVE_ID)]) + REPLAY_ARCHIVE_ID + b"l" + struct.pack(">q", BIG_ARCHIVE_ID)
    assert entry in tagged_raw
    top = 2**63 - 1
    retagged = decode_properties(tag(tagged_raw, archive_id=top))
    assert [value for key, value in retagged.headers or [] if key == REPLAY_ARCHIVE_ID] == [("l", top)]


@pytest.mark.parametrize(
    "overrides", [{"captured_at": -1}, {"replayed_at": 2**64}, {"archive_id": 2**63}], ids=str
)
def test_a_number_that_does_not_fit_its_tag_is_a_codec_error(overrides: dict[str, int]) -> None:
    """What an edited export line can hold: reported as a message that cannot go on the wire
    (the replay skips it and says why), never an unexpected exception."""
    with pytest.raises(CodecError):
        tag(encode_properties(ORIGINAL), **overrides)


def test_timestamps_are_amqp_timestamps_on_the_wire() -> None:
    tagged_raw = tag(encode_properties(ORIGINAL))
    for key, seconds in ((REPLAYED_AT, REPLAYED_AT_S), (ORIGINAL_CAPTURED_AT, CAPTURED_AT_S)):
        assert bytes([len(key)]) + key + b"T" + struct.pack(">Q", seconds) in tagged_raw


@pytest.mark.parametrize("reason", [None, ""])
def test_no_reason_header_without_a_reason(reason: str | None) -> None:
    tagged = decode_properties(tag(encode_properties(ORIGINAL), Tag(REPLAY, reason)))
    added = added_headers(tagged, ORIGINAL_HEADERS)
    assert REPLAY_REASON not in added
    assert set(added) == {
        REPLAY_ID,
        REPLAY_ARCHIVE_ID,
        REPLAYED_AT,
        ORIGINAL_EXCHANGE,
        ORIGINAL_ROUTING_KEY,
        ORIGINAL_CAPTURED_AT,
    }


def test_a_new_message_id_replaces_it_and_points_back_to_the_original() -> None:
    tagged = decode_properties(tag(encode_properties(ORIGINAL), new_message_id="new-ü-1"))
    assert tagged.message_id == "new-ü-1".encode()
    assert added_headers(tagged, ORIGINAL_HEADERS)[REPLAY_OF] == ("S", b"msg-1")
    assert tagged.headers is not None
    assert tagged.headers[: len(ORIGINAL_HEADERS)] == ORIGINAL_HEADERS
    for name in OTHER_PROPERTIES:
        if name != "message_id":
            assert getattr(tagged, name) == getattr(ORIGINAL, name), name


def test_a_new_message_id_without_an_original_one_adds_no_replay_of() -> None:
    original = dataclasses.replace(ORIGINAL, message_id=None)
    tagged = decode_properties(tag(encode_properties(original), new_message_id="new-1"))
    assert tagged.message_id == b"new-1"
    assert REPLAY_OF not in added_headers(tagged, ORIGINAL_HEADERS)


def test_an_empty_original_message_id_is_still_pointed_back_to() -> None:
    original = dataclasses.replace(ORIGINAL, message_id=b"")
    tagged = decode_properties(tag(encode_properties(original), new_message_id="new-1"))
    assert added_headers(tagged, ORIGINAL_HEADERS)[REPLAY_OF] == ("S", b"")


@pytest.mark.parametrize("headers", [None, []], ids=["no-table", "empty-table"])
def test_a_message_without_headers_gets_a_table(headers: Table | None) -> None:
    original = Properties(content_type=b"text/plain", headers=headers, delivery_mode=1)
    tagged = decode_properties(tag(encode_properties(original)))
    assert tagged.content_type == b"text/plain"
    assert tagged.delivery_mode == 1
    assert tagged.message_id is None
    assert added_headers(tagged, None)[REPLAY_ARCHIVE_ID] == ("l", BIG_ARCHIVE_ID)
    assert len(tagged.headers or []) == 6


def test_a_message_with_only_flags_gets_a_table() -> None:
    tagged = decode_properties(tag(b"\x00\x00"))
    assert dataclasses.replace(tagged, headers=None) == Properties()
    assert len(tagged.headers or []) == 6


def test_a_replay_of_a_replay_carries_one_set_of_tags() -> None:
    first_raw = tag(encode_properties(ORIGINAL), Tag("replay-1", "first"), new_message_id="new-1")
    second_raw = tag(
        first_raw,
        Tag("replay-2", "second"),
        archive_id=99,
        replayed_at=REPLAYED_AT_S + 60,
        original_exchange=b"replays",
        original_routing_key=b"rk2",
        captured_at=CAPTURED_AT_S + 30,
    )
    second = decode_properties(second_raw)
    assert second.headers is not None
    keys = Counter(key for key, _ in second.headers)
    assert all(keys[key] == 1 for key in keys if is_tag(key)), keys
    assert second.headers[: len(ORIGINAL_HEADERS)] == ORIGINAL_HEADERS
    headers = dict(second.headers[len(ORIGINAL_HEADERS) :])
    assert headers[REPLAY_ID] == ("S", b"replay-2")
    assert headers[REPLAY_ARCHIVE_ID] == ("l", 99)
    assert headers[REPLAYED_AT] == ("T", REPLAYED_AT_S + 60)
    # Where and when it was first published and captured, not where the first replay sent it.
    assert headers[ORIGINAL_EXCHANGE] == ("S", RAW_EXCHANGE)
    assert headers[ORIGINAL_ROUTING_KEY] == ("S", RAW_KEY)
    assert headers[ORIGINAL_CAPTURED_AT] == ("T", CAPTURED_AT_S)
    assert headers[REPLAY_REASON] == ("S", b"second")
    # No new id this time: the message keeps the first replay's id and its pointer back.
    assert second.message_id == b"new-1"
    assert headers[REPLAY_OF] == ("S", b"msg-1")


def test_a_new_id_on_a_replay_of_a_replay_points_back_one_step() -> None:
    first_raw = tag(encode_properties(ORIGINAL), Tag("replay-1"), new_message_id="new-1")
    second = decode_properties(tag(first_raw, Tag("replay-2"), new_message_id="new-2"))
    assert second.message_id == b"new-2"
    headers = second.headers or []
    assert [value for key, value in headers if key == REPLAY_OF] == [("S", b"new-1")]


def test_a_replay_without_reason_drops_the_reason_of_an_earlier_replay() -> None:
    first_raw = tag(encode_properties(ORIGINAL), Tag("replay-1", "first"))
    second = decode_properties(tag(first_raw, Tag("replay-2")))
    assert REPLAY_REASON not in dict(second.headers or [])


def test_a_header_the_producer_named_like_a_tag_is_replaced_not_duplicated() -> None:
    original = Properties(headers=[(b"a", ("b", 1)), (REPLAY_ID, ("I", 3)), (b"z", ("b", 2))])
    tagged = decode_properties(tag(encode_properties(original)))
    assert tagged.headers is not None
    assert tagged.headers[:2] == [(b"a", ("b", 1)), (b"z", ("b", 2))]
    assert [value for key, value in tagged.headers if key == REPLAY_ID] == [("S", REPLAY.encode())]


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x00",
        b"\x00\x01",  # continuation flag
        b"\x00\x02",  # reserved flag
        b"\x20\x00\x00\x00\x00\x10",  # header table longer than the data
        b"\x20\x00\x00\x00\x00\x03\x01kZ",  # unknown field type
        b"\x00\x00trailing",
        b"\x80\x00\x05ab",  # truncated content type
    ],
)
def test_undecodable_property_bytes_raise_codec_error(raw: bytes) -> None:
    with pytest.raises(CodecError):
        tag(raw)


# Field values in the codec's own representation; floats that survive a round trip.
_leaf_values = st.one_of(
    st.integers(-(2**7), 2**7 - 1).map(lambda v: ("b", v)),
    st.integers(0, 2**8 - 1).map(lambda v: ("B", v)),
    st.integers(-(2**15), 2**15 - 1).map(lambda v: ("s", v)),
    st.integers(0, 2**16 - 1).map(lambda v: ("u", v)),
    st.integers(-(2**31), 2**31 - 1).map(lambda v: ("I", v)),
    st.integers(0, 2**32 - 1).map(lambda v: ("i", v)),
    st.integers(-(2**63), 2**63 - 1).map(lambda v: ("l", v)),
    st.integers(-(2**63), 2**63 - 1).map(lambda v: ("L", v)),
    st.integers(0, 2**64 - 1).map(lambda v: ("T", v)),
    st.floats(width=32, allow_nan=False).map(lambda v: ("f", v)),
    st.floats(allow_nan=False).map(lambda v: ("d", v)),
    st.tuples(st.integers(0, 255), st.integers(-(2**31), 2**31 - 1)).map(lambda v: ("D", v)),
    st.binary(max_size=24).map(lambda v: ("S", v)),
    st.binary(max_size=24).map(lambda v: ("x", v)),
    st.booleans().map(lambda v: ("t", v)),
    st.just(("V", None)),
)
_keys = st.binary(max_size=12).filter(lambda key: not is_tag(key))
_values = st.recursive(
    _leaf_values,
    lambda inner: st.one_of(
        st.lists(st.tuples(_keys, inner), max_size=4).map(lambda table: ("F", table)),
        st.lists(inner, max_size=4).map(lambda items: ("A", items)),
    ),
    max_leaves=12,
)
_tables = st.lists(st.tuples(_keys, _values), max_size=10)
_short = st.one_of(st.none(), st.binary(max_size=16))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    headers=st.one_of(st.none(), _tables),
    message_id=_short,
    correlation_id=_short,
    timestamp=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
    priority=st.one_of(st.none(), st.integers(0, 255)),
    archive_id=st.integers(1, 2**63 - 1),
    exchange=st.binary(max_size=40),
    new_id=st.one_of(st.none(), st.text(max_size=20)),
)
def test_random_headers_survive_tagging(
    headers: Table | None,
    message_id: bytes | None,
    correlation_id: bytes | None,
    timestamp: int | None,
    priority: int | None,
    archive_id: int,
    exchange: bytes,
    new_id: str | None,
) -> None:
    original = Properties(
        headers=headers,
        message_id=message_id,
        correlation_id=correlation_id,
        timestamp=timestamp,
        priority=priority,
    )
    tagged = decode_properties(
        tag(
            encode_properties(original),
            archive_id=archive_id,
            original_exchange=exchange,
            new_message_id=new_id,
        )
    )
    kept = headers or []
    assert tagged.headers is not None
    assert encode_table(tagged.headers)[4:].startswith(encode_table(kept)[4:])
    added = added_headers(tagged, kept)
    assert added[REPLAY_ARCHIVE_ID] == ("l", archive_id)
    assert added[ORIGINAL_EXCHANGE] == ("S", exchange)
    assert (tagged.correlation_id, tagged.timestamp, tagged.priority) == (correlation_id, timestamp, priority)
    if new_id is None:
        assert tagged.message_id == message_id
        assert REPLAY_OF not in added
    else:
        assert tagged.message_id == new_id.encode()
        assert added.get(REPLAY_OF) == (None if message_id is None else ("S", message_id))


# ---------------------------------------------------------------------------- pacing


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_pacer_spaces_messages_at_the_rate_when_each_wait_is_slept() -> None:
    clock = FakeClock()
    start = clock.now
    pacer = Pacer(500, clock)
    for n in range(1500):
        delay = pacer.delay()
        assert delay >= 0
        clock.now += delay  # the caller sleeps, then publishes
        assert clock.now == pytest.approx(start + n / 500, abs=1e-9)


def test_pacer_reserves_slots_ahead_when_the_clock_does_not_move() -> None:
    clock = FakeClock()
    pacer = Pacer(500, clock)
    delays = [pacer.delay() for _ in range(100)]
    assert delays == pytest.approx([n / 500 for n in range(100)], abs=1e-9)


def test_pacer_with_time_spent_publishing_only_waits_for_the_rest() -> None:
    clock = FakeClock()
    start = clock.now
    pacer = Pacer(500, clock)
    for n in range(200):
        clock.now += pacer.delay()
        assert clock.now == pytest.approx(start + n / 500, abs=1e-9)
        clock.now += 0.0005  # publishing takes a quarter of the interval


@pytest.mark.parametrize("rate", [None, 0, 0.0])
def test_pacer_without_a_rate_never_waits(rate: float | None) -> None:
    clock = FakeClock()
    pacer = Pacer(rate, clock)
    assert [pacer.delay() for _ in range(1000)] == [0.0] * 1000
    clock.now += 100
    assert pacer.delay() == 0.0


def _send_times(pacer: Pacer, clock: FakeClock, count: int) -> list[float]:
    """When a caller that sleeps each delay publishes its next `count` messages."""
    times = []
    for _ in range(count):
        clock.now += pacer.delay()
        times.append(clock.now)
    return times


@pytest.mark.parametrize("pause", [0.01, 1.0, 3600.0])
def test_pacer_does_not_burst_after_a_pause(pause: float) -> None:
    clock = FakeClock()
    pacer = Pacer(500, clock)
    for _ in range(50):
        clock.now += pacer.delay()
    clock.now += pause
    resumed = clock.now
    # The slot of the first publish after the pause is at most one interval behind now.
    delays = [pacer.delay() for _ in range(20)]
    assert delays[:2] == [0.0, 0.0]
    assert delays[2:] == pytest.approx([n / 500 for n in range(1, 19)], abs=1e-9)
    times = [resumed + delay for delay in delays] + _send_times(pacer, clock, 2000)
    # At most one message more than the rate in any second: 501 messages span a full second.
    assert all(times[n + 501] - times[n] >= 1.0 - 1e-6 for n in range(len(times) - 501))


def test_pacer_after_a_slow_stretch_does_not_catch_up() -> None:
    clock = FakeClock()
    pacer = Pacer(500, clock)
    for _ in range(100):  # the broker is slow: each publish takes 10 intervals
        assert pacer.delay() == 0.0
        clock.now += 0.02
    delays = [pacer.delay() for _ in range(10)]
    assert delays.count(0.0) <= 2
    assert delays[-1] == pytest.approx(8 / 500, abs=1e-9)


# ---------------------------------------------------------------------------- the confirm window


class Publishes:
    """Publish tasks that end when the test says so."""

    def __init__(self) -> None:
        self.tasks: list[asyncio.Task[None]] = []

    def start(self) -> tuple["asyncio.Task[None]", Callable[[BaseException | None], None]]:
        loop = asyncio.get_running_loop()
        outcome: asyncio.Future[BaseException | None] = loop.create_future()

        async def publish() -> None:
            error = await outcome
            if error is not None:
                raise error

        task = asyncio.create_task(publish())
        self.tasks.append(task)

        def finish(error: BaseException | None = None) -> None:
            outcome.set_result(error)

        return task, finish

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


@pytest.fixture
async def publishes() -> AsyncIterator[Publishes]:
    tracker = Publishes()
    try:
        yield tracker
    finally:
        await tracker.close()


async def settled(*tasks: "asyncio.Task[None]") -> None:
    """Let the given tasks finish."""
    await asyncio.wait(tasks, timeout=5)
    assert all(task.done() for task in tasks)


async def test_the_cursor_moves_only_over_the_confirmed_head(publishes: Publishes) -> None:
    counts = Counts()
    window = ConfirmWindow(10, counts)
    started = [publishes.start() for _ in range(4)]
    for position, (task, _) in enumerate(started, start=11):
        window.add(position, task)
    # Confirms arrive out of order: 13, 12 and 14 before 11.
    for index in (2, 1, 3):
        started[index][1](None)
    await settled(*(started[index][0] for index in (1, 2, 3)))
    window.settle()
    assert (window.cursor, len(window), counts.confirmed) == (10, 4, 0)
    started[0][1](None)
    await settled(started[0][0])
    window.settle()
    assert (window.cursor, len(window), counts.confirmed) == (14, 0, 4)
    assert (counts.nacked, counts.skipped, counts.published) == (0, 0, 0)


async def test_the_cursor_stops_at_the_first_unconfirmed_publish(publishes: Publishes) -> None:
    counts = Counts()
    window = ConfirmWindow(0, counts)
    started = [publishes.start() for _ in range(3)]
    for position, (task, _) in enumerate(started, start=1):
        window.add(position, task)
    started[0][1](None)
    started[2][1](None)
    await settled(started[0][0], started[2][0])
    window.settle()
    assert (window.cursor, len(window), counts.confirmed) == (1, 2, 1)


async def test_a_nack_is_counted_and_settles(publishes: Publishes) -> None:
    counts = Counts()
    window = ConfirmWindow(0, counts)
    nacked, refuse = publishes.start()
    confirmed, confirm = publishes.start()
    window.add(1, nacked)
    window.add(2, confirmed)
    refuse(Nacked("basic.nack"))
    confirm(None)
    await settled(nacked, confirmed)
    window.settle()
    assert (window.cursor, len(window), counts.nacked, counts.confirmed) == (2, 0, 1, 1)


@pytest.mark.parametrize("error", [ConnectionError("connection reset"), OSError("broken pipe")])
async def test_a_lost_broker_stops_the_cursor_before_the_failed_publish(
    publishes: Publishes, error: BaseException
) -> None:
    counts = Counts()
    window = ConfirmWindow(0, counts)
    started = [publishes.start() for _ in range(3)]
    for position, (task, _) in enumerate(started, start=1):
        window.add(position, task)
    started[0][1](None)
    started[1][1](error)
    started[2][1](None)
    await settled(*(task for task, _ in started))
    with pytest.raises(BrokerUnavailable, match=str(error)):
        window.settle()
    assert (window.cursor, len(window), counts.confirmed) == (1, 2, 1)
    # It stays unsettled: asking again fails the same way.
    with pytest.raises(BrokerUnavailable):
        window.settle()
    assert window.cursor == 1


async def test_a_cancelled_publish_is_not_confirmed(publishes: Publishes) -> None:
    counts = Counts()
    window = ConfirmWindow(0, counts)
    task, _ = publishes.start()
    window.add(1, task)
    task.cancel()
    await asyncio.wait([task])
    with pytest.raises(BrokerUnavailable):
        window.settle()
    assert (window.cursor, counts.confirmed) == (0, 0)


async def test_skipped_messages_settle_without_being_confirmed(publishes: Publishes) -> None:
    counts = Counts()
    window = ConfirmWindow(0, counts)
    window.add(1, None)
    task, confirm = publishes.start()
    window.add(2, task)
    window.add(3, None)
    window.settle()
    assert (window.cursor, len(window), counts.confirmed) == (1, 2, 0)
    confirm(None)
    await settled(task)
    window.settle()
    assert (window.cursor, len(window), counts.confirmed, counts.skipped) == (3, 0, 1, 0)


async def wait_briefly(coroutine: Coroutine[Any, Any, None]) -> "asyncio.Task[None]":
    task = asyncio.create_task(coroutine)
    for _ in range(20):
        await asyncio.sleep(0)
    return task


async def test_wait_for_room_waits_for_the_head(publishes: Publishes) -> None:
    counts = Counts()
    window = ConfirmWindow(0, counts)
    (head, confirm_head), (second, confirm_second) = publishes.start(), publishes.start()
    window.add(1, head)
    window.add(2, second)
    waiting = await wait_briefly(window.wait_for_room(2))
    assert not waiting.done()
    confirm_second(None)
    await settled(second)
    for _ in range(20):
        await asyncio.sleep(0)
    assert not waiting.done()
    confirm_head(None)
    await asyncio.wait_for(waiting, 5)
    assert len(window) < 2
    assert (window.cursor, counts.confirmed) == (2, 2)


async def test_wait_for_room_also_bounds_the_body_bytes_in_flight(publishes: Publishes) -> None:
    counts = Counts()
    window = ConfirmWindow(0, counts)
    (head, confirm_head), (second, _) = publishes.start(), publishes.start()
    window.add(1, head, 60)
    window.add(2, second, 50)
    assert window.bytes_in_flight == 110
    waiting = await wait_briefly(window.wait_for_room(500, max_bytes=100))
    assert not waiting.done()  # two messages are far below 500, but 110 bytes are over 100
    confirm_head(None)
    await asyncio.wait_for(waiting, 5)
    assert (window.bytes_in_flight, len(window)) == (50, 1)
    window.abandon()
    assert window.bytes_in_flight == 0


async def test_wait_for_room_returns_at_once_when_there_is_room(publishes: Publishes) -> None:
    window = ConfirmWindow(0, Counts())
    task, _ = publishes.start()
    window.add(1, task)
    await asyncio.wait_for(window.wait_for_room(2), 1)
    assert len(window) == 1


async def test_wait_for_room_settles_a_skipped_head(publishes: Publishes) -> None:
    window = ConfirmWindow(0, Counts())
    window.add(1, None)
    task, _ = publishes.start()
    window.add(2, task)
    await asyncio.wait_for(window.wait_for_room(2), 1)
    assert (len(window), window.cursor) == (1, 1)


async def test_wait_for_room_reports_a_lost_broker(publishes: Publishes) -> None:
    window = ConfirmWindow(0, Counts())
    task, fail = publishes.start()
    window.add(1, task)
    waiting = await wait_briefly(window.wait_for_room(1))
    fail(ConnectionError("gone"))
    with pytest.raises(BrokerUnavailable):
        await asyncio.wait_for(waiting, 5)
    assert window.cursor == 0


async def test_drain_waits_for_everything_in_flight(publishes: Publishes) -> None:
    counts = Counts()
    window = ConfirmWindow(0, counts)
    started = [publishes.start() for _ in range(3)]
    for position, (task, _) in enumerate(started, start=1):
        window.add(position, task)
    window.add(4, None)
    draining = await wait_briefly(window.drain(5))
    for _, finish in reversed(started):
        finish(None)
    await asyncio.wait_for(draining, 5)
    assert (window.cursor, len(window), counts.confirmed) == (4, 0, 3)


async def test_drain_gives_up_after_the_grace_period(publishes: Publishes) -> None:
    counts = Counts()
    window = ConfirmWindow(0, counts)
    (first, confirm_first), (stuck, _) = publishes.start(), publishes.start()
    window.add(1, first)
    window.add(2, stuck)
    confirm_first(None)
    await asyncio.wait_for(window.drain(0.05), 5)
    assert (window.cursor, len(window), counts.confirmed) == (1, 1, 1)
    assert not stuck.done()  # left pending, not cancelled


async def test_drain_of_an_empty_window_returns(publishes: Publishes) -> None:
    window = ConfirmWindow(7, Counts())
    await asyncio.wait_for(window.drain(5), 1)
    assert (window.cursor, len(window)) == (7, 0)


async def test_abandon_cancels_what_is_in_flight(publishes: Publishes) -> None:
    counts = Counts()
    window = ConfirmWindow(3, counts)
    (done, confirm), (pending, _) = publishes.start(), publishes.start()
    window.add(4, done)
    window.add(5, pending)
    window.add(6, None)
    confirm(None)
    await settled(done)
    window.abandon()
    await asyncio.wait([pending], timeout=5)
    assert pending.cancelled()
    assert not done.cancelled()
    assert (len(window), window.cursor, counts.confirmed) == (0, 3, 0)
    window.settle()
    assert window.cursor == 3


# ---------------------------------------------------------------------------- destination

CAPTURED = datetime(2024, 5, 1, 12, 30, 45, 123456, tzinfo=UTC)


def archived(**overrides: Any) -> ArchivedMessage:
    fields: dict[str, Any] = {
        "id": 42,
        "captured_at": CAPTURED,
        "vhost": "/",
        "exchange": "orders",
        "routing_key": "orders.created",
        "exchange_raw": None,
        "routing_key_raw": None,
        "redelivered": False,
        "properties_raw": encode_properties(ORIGINAL),
        "properties": {"message_id": "msg-1", "delivery_mode": 2},
        "headers": {"int8": -128},
        "body": b'{"order": 1}',
        "body_size": 12,
        "replay_id": None,
    }
    fields.update(overrides)
    return ArchivedMessage(**fields)


def test_destination_to_a_queue_goes_through_the_default_exchange() -> None:
    assert destination(Target(queue="retry"), archived()) == ("", "retry")


def test_destination_to_an_exchange_keeps_the_original_key() -> None:
    assert destination(Target(exchange="replays"), archived()) == ("replays", "orders.created")


def test_destination_by_default_is_the_original_exchange_and_key() -> None:
    assert destination(Target(), archived()) == ("orders", "orders.created")


def test_destination_of_a_default_exchange_message() -> None:
    assert destination(Target(), archived(exchange="", routing_key="q")) == ("", "q")


def test_destination_keeps_raw_names_that_are_not_utf8() -> None:
    message = archived(
        exchange="orders.\\xff\\xfe",
        routing_key="eu.\\xc3(\\x00.created",
        exchange_raw=RAW_EXCHANGE,
        routing_key_raw=RAW_KEY,
    )
    exchange, key = destination(Target(), message)
    assert exchange.encode("utf-8", "surrogateescape") == RAW_EXCHANGE
    assert key.encode("utf-8", "surrogateescape") == RAW_KEY
    to_exchange, key = destination(Target(exchange="replays"), message)
    assert to_exchange == "replays"
    assert key.encode("utf-8", "surrogateescape") == RAW_KEY
    assert destination(Target(queue="retry"), message) == ("", "retry")


def test_destination_decodes_valid_utf8_raw_names() -> None:
    message = archived(exchange="café", routing_key="clé", exchange_raw="café".encode(), routing_key_raw=None)
    assert destination(Target(), message) == ("café", "clé")


# ---------------------------------------------------------------------------- export lines

WHERE = "exports/orders.jsonl:17"


def export_line(message: ArchivedMessage) -> str:
    return json.dumps(full_json(message), allow_nan=False)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"exchange_raw": RAW_EXCHANGE, "routing_key_raw": RAW_KEY, "exchange": "orders.\\xff\\xfe"},
        {"replay_id": REPLAY, "redelivered": True, "vhost": "shop/eu"},
        {"body": bytes(range(256)) * 3, "body_size": 768},
        {"body": b"", "body_size": 0, "properties_raw": b"\x00\x00", "properties": {}},
        {"captured_at": datetime(2024, 5, 1, 14, 30, tzinfo=timezone(timedelta(hours=2)))},
    ],
)
def test_an_export_line_reads_back_as_the_same_message(overrides: dict[str, Any]) -> None:
    message = archived(**overrides)
    again = read_line(export_line(message), WHERE)
    assert again == message
    assert again.properties_raw == message.properties_raw
    assert again.body == message.body
    assert (again.exchange_bytes, again.routing_key_bytes) == (
        message.exchange_bytes,
        message.routing_key_bytes,
    )


def test_the_export_object_extends_the_summary() -> None:
    message = archived(exchange_raw=RAW_EXCHANGE)
    full = full_json(message)
    assert {key: full[key] for key in summary_json(message)} == summary_json(message)
    assert base64.b64decode(full["properties_raw_base64"]) == message.properties_raw
    assert base64.b64decode(full["exchange_raw_base64"]) == RAW_EXCHANGE
    assert "routing_key_raw_base64" not in full
    typed = {entry["key"]: entry for entry in full["headers_typed"]}
    assert typed["int64"]["type"] == "int64"
    assert typed["nan-payload"] == {"key": "nan-payload", "type": "float32", "value": "NaN"}


@settings(max_examples=60, deadline=None)
@given(
    body=st.binary(max_size=300),
    exchange_raw=st.one_of(st.none(), st.binary(min_size=1, max_size=40)),
    routing_key_raw=st.one_of(st.none(), st.binary(min_size=1, max_size=40)),
    headers=st.one_of(st.none(), _tables),
    archive_id=st.integers(1, 2**63 - 1),
)
def test_random_messages_survive_an_export_line(
    body: bytes,
    exchange_raw: bytes | None,
    routing_key_raw: bytes | None,
    headers: Table | None,
    archive_id: int,
) -> None:
    message = archived(
        id=archive_id,
        body=body,
        body_size=len(body),
        exchange_raw=exchange_raw,
        routing_key_raw=routing_key_raw,
        properties_raw=encode_properties(Properties(headers=headers, message_id=b"m")),
    )
    assert read_line(export_line(message), WHERE) == message


def _valid_object() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(export_line(archived()))
    return data


def _without(key: str) -> str:
    data = _valid_object()
    del data[key]
    return json.dumps(data)


def _with(**changes: Any) -> str:
    return json.dumps({**_valid_object(), **changes})


@pytest.mark.parametrize(
    "line",
    [
        pytest.param("not json at all", id="not-json"),
        pytest.param("{", id="truncated-json"),
        pytest.param("[1, 2]", id="array"),
        pytest.param("null", id="null"),
        pytest.param('"a string"', id="string"),
        *(
            pytest.param(_without(key), id=f"missing-{key}")
            for key in (
                "id",
                "captured_at",
                "exchange",
                "routing_key",
                "properties_raw_base64",
                "body_base64",
            )
        ),
        pytest.param(_with(body_base64="not base64!"), id="bad-body-base64"),
        pytest.param(_with(body_base64="QUJ"), id="bad-body-padding"),
        pytest.param(_with(properties_raw_base64="%%%"), id="bad-properties-base64"),
        pytest.param(_with(exchange_raw_base64="@@"), id="bad-exchange-raw-base64"),
        pytest.param(_with(routing_key_raw_base64="#"), id="bad-routing-key-raw-base64"),
        pytest.param(_with(properties_raw_base64=base64.b64encode(b"\x00\x01").decode()), id="continuation"),
        pytest.param(
            _with(properties_raw_base64=base64.b64encode(b"\x20\x00\x00\x00\x00\x09").decode()),
            id="truncated-headers",
        ),
        pytest.param(_with(properties_raw_base64=""), id="empty-properties"),
        pytest.param(_with(properties_raw_base64=5), id="properties-not-a-string"),
        pytest.param(_with(id="forty-two"), id="bad-id"),
        pytest.param(_with(id=None), id="null-id"),
        pytest.param(_with(captured_at="yesterday"), id="bad-captured-at"),
        pytest.param(_with(captured_at=1714566645), id="numeric-captured-at"),
    ],
)
def test_a_bad_export_line_is_a_usage_error_naming_the_line(line: str) -> None:
    with pytest.raises(UsageError) as raised:
        read_line(line, WHERE)
    text = str(raised.value)
    assert text.startswith(f"{WHERE}: ")
    assert "rabbit-replay export" in text
    assert "\n" not in text


def test_a_deeply_nested_export_line_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match=WHERE):
        read_line("[" * 100_000, WHERE)


# ---------------------------------------------------------------------------- raw content headers


@pytest.mark.parametrize("raw", [b"\x00\x00", encode_properties(ORIGINAL)])
def test_a_published_content_header_carries_the_raw_properties(raw: bytes) -> None:
    parts = frames.publish_frames(5, 131072, "x", "k", raw, b"abc")
    content_header = b"".join(parts[1:4])
    assert content_header == struct.pack(">BHIHHQ", 2, 5, 12 + len(raw), 60, 0, 3) + raw + b"\xce"
