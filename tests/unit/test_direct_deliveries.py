"""The bulk frame reader (archive.content_header.RawFrames) against any split of the broker's bytes.

Deliveries to a direct consumer must reach its function exactly, in order, whatever the reads
cut (mid-prefix, mid-body, between a delivery's frames) and whatever frames come between a
delivery's own (AMQP allows other channels' frames there); every other frame must reach aiormq
as pamqp decodes it, in order; a stream that ends or breaks mid-frame is a connection error.
"""

import asyncio
import itertools
import logging
import struct
from dataclasses import dataclass
from typing import Any

import aiormq.exceptions
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pamqp import commands, frame, heartbeat

from rabbit_archive.archive import content_header

CONSUMER = "rabbit-archive"
CHANNEL = 1
FRAME_MAX = 4096  # small, so that bodies span several frames


def _shortstr(raw: bytes) -> bytes:
    return bytes((len(raw),)) + raw


def _frame(frame_type: int, channel: int, payload: bytes) -> bytes:
    return struct.pack(">BHI", frame_type, channel, len(payload)) + payload + b"\xce"


@dataclass(frozen=True)
class Delivery:
    channel: int
    consumer_tag: bytes
    delivery_tag: int
    redelivered: bool
    exchange: bytes
    routing_key: bytes
    properties: bytes
    body: bytes

    def method(self) -> bytes:
        payload = (
            struct.pack(">HH", 60, 60)
            + _shortstr(self.consumer_tag)
            + struct.pack(">QB", self.delivery_tag, int(self.redelivered))
            + _shortstr(self.exchange)
            + _shortstr(self.routing_key)
        )
        return _frame(1, self.channel, payload)

    def content(self) -> list[bytes]:
        header = _frame(2, self.channel, struct.pack(">HHQ", 60, 0, len(self.body)) + self.properties)
        step = FRAME_MAX - 8
        bodies = [_frame(3, self.channel, self.body[at : at + step]) for at in range(0, len(self.body), step)]
        return [header, *bodies]

    def as_called(self) -> tuple[Any, ...]:
        return (
            self.delivery_tag,
            self.redelivered,
            self.exchange.decode("utf-8", "surrogateescape"),
            self.routing_key.decode("utf-8", "surrogateescape"),
            self.properties,
            self.body,
        )


# Frames that aiormq handles: a heartbeat, a reply on the consumer's channel, one on another channel.
OTHER_FRAMES = (
    (0, heartbeat.Heartbeat()),
    (CHANNEL, commands.Basic.QosOk()),
    (2, commands.Basic.Ack(delivery_tag=7, multiple=True)),
)

names = st.binary(max_size=255)
deliveries = st.builds(
    Delivery,
    channel=st.just(CHANNEL),
    consumer_tag=st.sampled_from([CONSUMER.encode(), b"someone-else"]),
    delivery_tag=st.integers(1, 2**64 - 1),
    redelivered=st.booleans(),
    exchange=names,
    routing_key=names,
    properties=st.binary(max_size=300).map(lambda raw: b"\x00\x00" + raw),
    body=st.one_of(st.binary(max_size=64), st.binary(min_size=FRAME_MAX, max_size=3 * FRAME_MAX)),
)
items = st.lists(st.one_of(deliveries, st.sampled_from(range(len(OTHER_FRAMES)))), max_size=12)


class ChunkedReader:
    """A StreamReader's read(n) and at_eof() over bytes that arrive in the given pieces."""

    def __init__(self, pieces: list[bytes]) -> None:
        self._pieces = [piece for piece in pieces if piece]
        self.reads = 0

    async def read(self, limit: int) -> bytes:
        self.reads += 1
        await asyncio.sleep(0)
        if not self._pieces:
            return b""
        piece = self._pieces.pop(0)
        if len(piece) > limit:
            self._pieces.insert(0, piece[limit:])
            piece = piece[:limit]
        return piece

    def at_eof(self) -> bool:
        return not self._pieces


class Receiver:
    def __init__(self, reader: ChunkedReader) -> None:
        self.reader = reader
        self.lock = asyncio.Lock()


def wire(sequence: list[Any], interleave: bool) -> tuple[bytes, list[Delivery], list[Any]]:
    """The bytes of the sequence, the direct deliveries and what aiormq must get, in order.

    With `interleave`, a frame of channel 2 comes between each delivery's method and header.
    """
    data = b""
    direct: list[Delivery] = []
    passed: list[Any] = []
    for item in sequence:
        if isinstance(item, int):
            channel, other = OTHER_FRAMES[item]
            data += frame.marshal(other, channel)
            passed.append((channel, type(other)))
            continue
        data += item.method()
        if interleave:
            data += frame.marshal(commands.Basic.Ack(delivery_tag=9), 2)
        data += b"".join(item.content())
        if item.consumer_tag == CONSUMER.encode():
            direct.append(item)
            if interleave:
                passed.append((2, commands.Basic.Ack))
        else:
            passed.append((CHANNEL, commands.Basic.Deliver))
            if interleave:
                passed.append((2, commands.Basic.Ack))
            passed.append((CHANNEL, "header"))
            passed.extend((CHANNEL, "body") for _ in item.content()[1:])
    return data, direct, passed


def cut(data: bytes, points: list[int]) -> list[bytes]:
    edges = sorted({0, len(data), *(point % (len(data) + 1) for point in points)})
    return [data[start:end] for start, end in itertools.pairwise(edges)]


def kind(received: tuple[int, int, Any]) -> tuple[int, Any]:
    _size, channel, decoded = received
    if isinstance(decoded, content_header.RawContentHeader):
        return channel, "header"
    if type(decoded).__name__ == "ContentBody":
        return channel, "body"
    return channel, type(decoded)


async def read_all(frames: content_header.RawFrames) -> list[tuple[int, Any]]:
    received = []
    while True:
        try:
            received.append(kind(await frames.get_frame()))
        except StopAsyncIteration:
            return received


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sequence=items, points=st.lists(st.integers(0, 10**6), max_size=30), interleave=st.booleans())
def test_every_split_of_the_stream_delivers_the_same_messages_in_order(
    sequence: list[Any], points: list[int], interleave: bool
) -> None:
    data, direct, passed = wire(sequence, interleave)
    called: list[tuple[Any, ...]] = []
    read_notes: list[int] = []
    frames = content_header.RawFrames(
        Receiver(ChunkedReader(cut(data, points))), lambda: read_notes.append(1)
    )
    frames.deliver_directly(CHANNEL, CONSUMER, lambda *fields: called.append(fields))
    received = asyncio.run(read_all(frames))
    assert called == [delivery.as_called() for delivery in direct]
    assert received == passed
    # aiormq is told frames were read whenever deliveries it never sees were.
    assert bool(read_notes) == bool(direct)


def test_many_deliveries_come_from_one_read() -> None:
    sequence = [
        Delivery(CHANNEL, CONSUMER.encode(), tag, False, b"x", b"k", b"\x00\x00", b"b" * 512)
        for tag in range(1, 201)
    ]
    data, _, _ = wire(list(sequence), interleave=False)
    reader = ChunkedReader([data])
    called: list[tuple[Any, ...]] = []
    frames = content_header.RawFrames(Receiver(reader))
    frames.deliver_directly(CHANNEL, CONSUMER, lambda *fields: called.append(fields))
    assert asyncio.run(read_all(frames)) == []
    assert [fields[0] for fields in called] == list(range(1, 201))
    assert reader.reads == 1


def test_a_failing_callback_is_logged_and_reading_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    sequence = [
        Delivery(CHANNEL, CONSUMER.encode(), tag, False, b"x", b"k", b"\x00\x00", b"body")
        for tag in (1, 2, 3)
    ]
    data, _, _ = wire(list(sequence), interleave=False)
    called: list[int] = []

    def on_delivery(delivery_tag: int, *_fields: Any) -> None:
        if delivery_tag == 2:
            raise ValueError("a bug in the callback")
        called.append(delivery_tag)

    frames = content_header.RawFrames(Receiver(ChunkedReader([data])))
    frames.deliver_directly(CHANNEL, CONSUMER, on_delivery)
    with caplog.at_level(logging.ERROR):
        asyncio.run(read_all(frames))
    assert called == [1, 3]
    assert [record.getMessage() for record in caplog.records] == ["consumer_callback_failed"]


def test_a_stopped_consumer_goes_back_to_aiormq() -> None:
    delivery = Delivery(CHANNEL, CONSUMER.encode(), 1, False, b"x", b"k", b"\x00\x00", b"body")
    data, _, _ = wire([delivery], interleave=False)
    frames = content_header.RawFrames(Receiver(ChunkedReader([data])))
    frames.deliver_directly(CHANNEL, CONSUMER, lambda *_: pytest.fail("the consumer was stopped"))
    frames.stop_delivering(CHANNEL, CONSUMER)
    assert asyncio.run(read_all(frames)) == [
        (CHANNEL, commands.Basic.Deliver),
        (CHANNEL, "header"),
        (CHANNEL, "body"),
    ]


@given(points=st.lists(st.integers(0, 10**6), max_size=5), lost=st.integers(1, 200))
def test_a_stream_that_ends_mid_frame_is_a_connection_error(points: list[int], lost: int) -> None:
    delivery = Delivery(CHANNEL, CONSUMER.encode(), 1, False, b"x", b"k", b"\x00\x00", b"b" * 100)
    data, _, _ = wire([delivery], interleave=False)
    frames = content_header.RawFrames(Receiver(ChunkedReader(cut(data[: -min(lost, len(data) - 1)], points))))
    frames.deliver_directly(CHANNEL, CONSUMER, lambda *_: pytest.fail("an incomplete delivery was called"))
    with pytest.raises(aiormq.exceptions.AMQPConnectionError, match="unexpectedly closed"):
        asyncio.run(read_all(frames))


@pytest.mark.parametrize(
    ("wrong", "message"),
    [
        (lambda data: data[:-1] + b"\x00", "frame-end"),
        # A method frame where the delivery's header should be.
        (
            lambda data: data[: data.index(b"\xce") + 1] + frame.marshal(commands.Basic.QosOk(), CHANNEL),
            "type 1",
        ),
        # A header frame too short for its class, weight and body size.
        (lambda data: data[: data.index(b"\xce") + 1] + _frame(2, CHANNEL, b"\x00\x3c\x00\x00"), "type 2"),
    ],
)
def test_malformed_frames_are_frame_errors(wrong: Any, message: str) -> None:
    delivery = Delivery(CHANNEL, CONSUMER.encode(), 1, False, b"x", b"k", b"\x00\x00", b"body")
    data, _, _ = wire([delivery], interleave=False)
    frames = content_header.RawFrames(Receiver(ChunkedReader([wrong(data)])))
    frames.deliver_directly(CHANNEL, CONSUMER, lambda *_: None)
    with pytest.raises(aiormq.exceptions.InvalidFrameError, match=message):
        asyncio.run(read_all(frames))
