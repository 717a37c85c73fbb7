"""The inbox key over the input space: what aio-pika decodes agrees with the rule written for any language.

Messages are built as the broker sends them (typed property bytes from the project's codec),
decoded by pamqp as aio-pika decodes them, and tagged by the replay tool's own code. The expected
key is computed by `reference_form` below, a second implementation of README's rule that reads the
AMQP wire types, as a consumer in another language would.
"""

import datetime
import hashlib
import json
import math
import re
import struct
import uuid
from pathlib import Path
from typing import Any

import aio_pika
import aiormq.abc
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from pamqp import commands, header

from rabbit_archive.archive.amqp_codec import FieldValue, Properties, Table, encode_properties
from rabbit_archive.inbox import canonical_form, message_key
from rabbit_archive.inbox.key import BROKER_HEADERS, CONTENT_PROPERTIES, REPLAY_HEADERS, is_stripped
from rabbit_archive.replay.tagging import Tag, is_tag, tagged_properties

README = Path(__file__).resolve().parents[2] / "README.md"
SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
MAX_SECONDS = 0xFFFFFFFF
# pamqp reads a timestamp above 2^32 - 1 as milliseconds; past year 9999 it cannot decode it at all.
MAX_MILLISECONDS = 253_402_300_799_999


# ---------------------------------------------------------------------------- messages as received


def received(
    props: Properties, body: bytes, exchange: str = "orders", routing_key: str = "eu.created"
) -> aio_pika.IncomingMessage:
    """The aio-pika message a consumer gets for these property bytes (decoded by pamqp, as aiormq does)."""
    return receive_raw(encode_properties(props), body, exchange, routing_key)


def receive_raw(raw: bytes, body: bytes, exchange: str, routing_key: str) -> aio_pika.IncomingMessage:
    content = header.ContentHeader(0, len(body), commands.Basic.Properties())
    content.unmarshal(struct.pack(">HHQ", 60, 0, len(body)) + raw)
    deliver = commands.Basic.Deliver("ctag", 1, False, "", "")
    message = aio_pika.IncomingMessage(
        aiormq.abc.DeliveredMessage(delivery=deliver, header=content, body=body, channel=None)  # type: ignore[arg-type]
    )
    # Any name the broker accepts (pamqp's own validation is narrower).
    message.exchange, message.routing_key = exchange, routing_key
    return message


def replayed(
    props: Properties,
    body: bytes,
    exchange: str,
    routing_key: str,
    *,
    to_queue: str | None = None,
    reason: str | None = None,
    new_message_id: str | None = None,
) -> aio_pika.IncomingMessage:
    """The copy `rabbit-replay run` sends: the replay tool's tagging, then received like any message."""
    tagged = tagged_properties(
        encode_properties(props),
        Tag(str(uuid.uuid4()), reason),
        archive_id=2**40 + 7,
        replayed_at=1_760_000_000,
        original_exchange=exchange.encode(),
        original_routing_key=routing_key.encode(),
        captured_at=1_750_000_000,
        new_message_id=new_message_id,
    )
    if to_queue is not None:  # through the default exchange, straight into the queue
        return receive_raw(tagged, body, "", to_queue)
    return receive_raw(tagged, body, exchange, routing_key)


# ---------------------------------------------------------------------------- the rule, from wire types


def milliseconds(seconds_or_ms: int) -> str:
    return str(seconds_or_ms * 1000 if seconds_or_ms <= MAX_SECONDS else seconds_or_ms)


def reference_value(value: FieldValue) -> list[Any]:
    letter, data = value
    if letter in "bBsuIilL":
        return ["int", str(data)]
    if letter == "t":
        return ["bool", "true" if data else "false"]
    if letter in "fd":
        number = data if isinstance(data, float) else math.nan
        return ["float", "7ff8000000000000" if math.isnan(number) else struct.pack(">d", number).hex()]
    if letter in "Sx":
        return ["bytes", data.hex()]
    if letter == "D":
        scale, unscaled = data
        return ["decimal", str(scale), str(unscaled)]
    if letter == "T":
        return ["timestamp", milliseconds(data)]
    if letter in ("V", "\x00"):
        return ["void"]
    if letter == "F":
        return ["table", reference_entries(data)]
    if letter == "A":
        return ["array", [reference_value(item) for item in data]]
    raise AssertionError(letter)


def reference_entries(table: Table) -> list[list[Any]]:
    last = dict(table)  # a key given twice: the last value counts, as decoders keep it
    return [[key.hex(), reference_value(last[key])] for key in sorted(last)]


def reference_form(props: Properties, body: bytes, exchange: bytes, routing_key: bytes) -> bytes:
    """README's rule, computed from the wire types."""
    headers = dict(props.headers or [])
    tagged_exchange = headers.get(b"x-original-exchange")
    if tagged_exchange is not None and tagged_exchange[0] in "Sx":
        exchange = tagged_exchange[1]
    tagged_key = headers.get(b"x-original-routing-key")
    if tagged_key is not None and tagged_key[0] in "Sx":
        routing_key = tagged_key[1]
    properties = []
    for name in CONTENT_PROPERTIES:
        value = getattr(props, name)
        if value is None or value == b"":
            continue
        properties.append([name, milliseconds(value) if name == "timestamp" else value.hex()])
    kept = [(key, value) for key, value in props.headers or [] if not is_stripped(key.decode())]
    form = [
        "rabbit-archive.inbox/1",
        exchange.hex(),
        routing_key.hex(),
        properties,
        reference_entries(kept),
        hashlib.sha256(body).hexdigest(),
    ]
    return json.dumps(form, separators=(",", ":")).encode()


def reference_key(props: Properties, body: bytes, exchange: str, routing_key: str) -> str:
    message_id = props.message_id
    if message_id and b"\x00" not in message_id:
        return message_id.decode()
    digest = hashlib.sha256(reference_form(props, body, exchange.encode(), routing_key.encode()))
    return "sha256:" + digest.hexdigest()


# ---------------------------------------------------------------------------- strategies

# pamqp decodes keys and property strings as UTF-8 (and fails the whole frame otherwise).
utf8 = st.text(max_size=20).map(str.encode)
header_names = st.one_of(
    utf8, st.sampled_from([b"tenant", b"x-retry", b"x-death-note", b"x-first-deaths", b"X-Death"])
)


def _int(bits: int, signed: bool) -> st.SearchStrategy[int]:
    if signed:
        return st.integers(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return st.integers(0, 2**bits - 1)


def _float(letter: str) -> st.SearchStrategy[FieldValue]:
    size = 4 if letter == "f" else 8
    special = [0, 1 << (8 * size - 1), 0x7FC00000 if size == 4 else 0x7FF8000000000000, 1]

    def value(bits: int) -> FieldValue:
        raw = bits.to_bytes(size, "big")
        number = struct.unpack(">f" if size == 4 else ">d", raw)[0]
        return (letter, raw if math.isnan(number) else number)

    return st.one_of(st.sampled_from(special), st.integers(0, 2 ** (8 * size) - 1)).map(value)


INTEGER_TYPES = [
    ("b", 8, True), ("B", 8, False), ("s", 16, True), ("u", 16, False),
    ("I", 32, True), ("i", 32, False), ("l", 64, True), ("L", 64, True),
]  # fmt: skip
timestamps = st.one_of(st.integers(0, MAX_SECONDS), st.integers(MAX_SECONDS + 1, MAX_MILLISECONDS))
scalars = st.one_of(
    st.tuples(st.just("t"), st.one_of(st.booleans(), st.integers(2, 255))),
    *(st.tuples(st.just(letter), _int(bits, signed)) for letter, bits, signed in INTEGER_TYPES),
    _float("f"),
    _float("d"),
    st.tuples(st.just("D"), st.tuples(_int(8, False), _int(32, True))),
    st.tuples(st.sampled_from("Sx"), st.binary(max_size=30)),
    st.tuples(st.just("T"), timestamps),
    st.just(("V", None)),
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.tuples(st.just("A"), st.lists(children, max_size=4)),
        st.tuples(st.just("F"), st.lists(st.tuples(header_names, children), max_size=4)),
    ),
    max_leaves=10,
)
tables = st.lists(st.tuples(header_names, values), max_size=6)
shortstrs = st.one_of(st.none(), st.just(b""), utf8)
# A message_id with a NUL cannot be a PostgreSQL text key: it counts as unset.
message_ids = st.one_of(st.none(), st.just(b""), st.just(b"a\x00b"), utf8)
properties = st.builds(
    Properties,
    content_type=shortstrs,
    content_encoding=shortstrs,
    headers=st.none() | tables,
    delivery_mode=st.sampled_from([None, 1, 2]),  # aio-pika refuses any other value
    priority=st.none() | _int(8, False),
    correlation_id=shortstrs,
    reply_to=shortstrs,
    expiration=st.none() | st.integers(0, 10**9).map(lambda n: str(n).encode()),
    message_id=message_ids,
    timestamp=st.none() | timestamps,
    type=shortstrs,
    user_id=shortstrs,
    app_id=shortstrs,
    cluster_id=shortstrs,
)
without_id = properties.map(lambda props: _with(props, message_id=None))
names = st.text(max_size=30)
bodies = st.binary(max_size=200)


def _with(props: Properties, **changes: Any) -> Properties:
    values = {name: getattr(props, name) for name in Properties.__dataclass_fields__}
    return Properties(**{**values, **changes})


# ---------------------------------------------------------------------------- the key follows the rule


@SETTINGS
@given(properties, bodies, names, names)
@example(Properties(headers=[(b"t", ("T", 1_700_000_000_000))]), b"", "orders", "k")
@example(Properties(headers=[(b"d", ("D", (2, -150))), (b"n", ("f", b"\x7f\xc0\x00\x01"))]), b"", "", "")
@example(Properties(message_id=b"a\x00b", headers=[(b"k", ("V", None)), (b"k", ("I", 3))]), b"x", "e", "")
def test_the_key_of_a_received_message_follows_the_rule_for_its_wire_types(
    props: Properties, body: bytes, exchange: str, routing_key: str
) -> None:
    message = received(props, body, exchange, routing_key)
    assert message_key(message) == reference_key(props, body, exchange, routing_key)


@SETTINGS
@given(without_id, bodies, names, names)
def test_the_canonical_form_is_ascii_json_without_whitespace(
    props: Properties, body: bytes, exchange: str, routing_key: str
) -> None:
    form = canonical_form(received(props, body, exchange, routing_key))
    assert form == reference_form(props, body, exchange.encode(), routing_key.encode())
    assert form.isascii()
    assert not re.search(rb"\s", form)
    # Another JSON writer gives the same bytes: every leaf is a string of [a-z0-9./:-].
    assert json.dumps(json.loads(form), separators=(",", ":")).encode() == form


# ---------------------------------------------------------------------------- originals and replays


@SETTINGS
@given(properties, bodies, names, names, st.none() | st.text(max_size=20), names)
@example(Properties(), b"", "", "", None, "q")  # the default exchange itself
def test_an_original_and_its_replays_share_the_key(
    props: Properties, body: bytes, exchange: str, routing_key: str, reason: str | None, queue: str
) -> None:
    original = message_key(received(props, body, exchange, routing_key))
    assert message_key(replayed(props, body, exchange, routing_key, reason=reason)) == original
    to_queue = replayed(props, body, exchange, routing_key, reason=reason, to_queue=queue)
    assert message_key(to_queue) == original


@SETTINGS
@given(properties, bodies, names, names)
def test_a_replay_of_a_replay_to_its_exchange_shares_the_key(
    props: Properties, body: bytes, exchange: str, routing_key: str
) -> None:
    first = encode_properties(props)
    for _ in range(2):  # the second replay replaces the first one's tags
        first = tagged_properties(
            first,
            Tag(str(uuid.uuid4()), "again"),
            archive_id=1,
            replayed_at=1,
            original_exchange=exchange.encode(),
            original_routing_key=routing_key.encode(),
            captured_at=1,
        )
    again = receive_raw(first, body, exchange, routing_key)
    assert message_key(again) == message_key(received(props, body, exchange, routing_key))


@SETTINGS
@given(properties, bodies, names, names)
def test_a_new_message_id_replay_gets_a_new_key(
    props: Properties, body: bytes, exchange: str, routing_key: str
) -> None:
    fresh = str(uuid.uuid4())
    copy = replayed(props, body, exchange, routing_key, new_message_id=fresh)
    assert message_key(copy) == fresh != message_key(received(props, body, exchange, routing_key))


def test_the_stripped_headers_are_exactly_the_replay_tags_and_the_brokers() -> None:
    added = replayed(
        Properties(message_id=b"m"), b"", "orders", "k", reason="why", new_message_id="n", to_queue="q"
    )
    assert set(added.headers) == REPLAY_HEADERS  # every tag the replay tool adds, and no other
    assert all(is_tag(name.encode()) for name in REPLAY_HEADERS)
    for name in (*BROKER_HEADERS, "x-first-death-queue", "x-first-death-reason", "x-last-death-exchange"):
        assert is_stripped(name)
    for name in ("X-Death", "x-deaths", "x-first-deaths", "x-replay", "tenant", "x-delivery-counter"):
        assert not is_stripped(name)


DEATH: Table = [
    (b"x-death", ("A", [("F", [(b"count", ("l", 1)), (b"queue", ("S", b"work")),
                              (b"reason", ("S", b"rejected")), (b"time", ("T", 1_700_000_000))])])),
    (b"x-first-death-exchange", ("S", b"orders")),
    (b"x-first-death-queue", ("S", b"work")),
    (b"x-first-death-reason", ("S", b"rejected")),
    (b"x-last-death-queue", ("S", b"work")),
    (b"x-delivery-count", ("l", 3)),
]  # fmt: skip


@SETTINGS
@given(without_id, bodies, names, names, st.permutations(DEATH))
def test_what_the_broker_adds_on_redelivery_and_dead_lettering_leaves_the_key_alone(
    props: Properties, body: bytes, exchange: str, routing_key: str, added: Table
) -> None:
    redelivered = _with(props, headers=[*(props.headers or []), *added])
    before = message_key(received(props, body, exchange, routing_key))
    assert message_key(received(redelivered, body, exchange, routing_key)) == before


# ---------------------------------------------------------------------------- any change changes it

PROPERTY_STRINGS = [name for name in CONTENT_PROPERTIES if name not in ("timestamp", "message_id")]


@st.composite
def changed(draw: st.DrawFn) -> tuple[Properties, bytes, str, str, Properties, bytes, str, str]:
    """A message without message_id and the same message with one thing changed in what it says."""
    props, body = draw(without_id), draw(bodies)
    exchange, routing_key = draw(names), draw(names)
    new = (props, body, exchange, routing_key)
    what = draw(st.sampled_from(["body", "exchange", "routing_key", "property", "timestamp", "header"]))
    if what == "body":
        new = (props, draw(bodies.filter(lambda b: b != body)), exchange, routing_key)
    elif what == "exchange":
        new = (props, body, draw(names.filter(lambda n: n != exchange)), routing_key)
    elif what == "routing_key":
        new = (props, body, exchange, draw(names.filter(lambda n: n != routing_key)))
    elif what == "property":
        name = draw(st.sampled_from(PROPERTY_STRINGS))
        old = getattr(props, name) or b""
        value = draw(st.one_of(st.just(b""), utf8).filter(lambda v: v != old))
        new = (_with(props, **{name: value}), body, exchange, routing_key)
    elif what == "timestamp":
        old_ts = props.timestamp
        value_ts = draw(st.one_of(st.none(), st.integers(0, MAX_SECONDS)).filter(lambda v: v != old_ts))
        new = (_with(props, timestamp=value_ts), body, exchange, routing_key)
    else:
        table = list(props.headers or [])
        kept = {key for key, _ in table if not is_stripped(key.decode())}
        change = draw(st.sampled_from(["add", "remove", "replace"]) if kept else st.just("add"))
        if change == "add":
            key = draw(header_names.filter(lambda k: k not in kept and not is_stripped(k.decode())))
            table.append((key, draw(values)))
        else:
            key = draw(st.sampled_from(sorted(kept)))
            table = [entry for entry in table if entry[0] != key]
            if change == "replace":
                table.append((key, draw(values)))
        new = (_with(props, headers=table), body, exchange, routing_key)
    return (props, body, exchange, routing_key, *new)


@SETTINGS
@given(changed())
def test_any_change_to_what_a_message_says_changes_its_key(
    pair: tuple[Properties, bytes, str, str, Properties, bytes, str, str],
) -> None:
    props, body, exchange, routing_key, new_props, new_body, new_exchange, new_routing_key = pair
    before = reference_form(props, body, exchange.encode(), routing_key.encode())
    after = reference_form(new_props, new_body, new_exchange.encode(), new_routing_key.encode())
    # A replaced header value can be the same value in another width or kind (see below).
    assume(before != after)
    old = message_key(received(props, body, exchange, routing_key))
    assert message_key(received(new_props, new_body, new_exchange, new_routing_key)) != old


def test_integer_width_float_width_and_string_kind_are_not_part_of_the_key() -> None:
    """What pamqp, under aio-pika, cannot tell apart; the rule leaves it out for every language."""
    same: list[list[FieldValue]] = [
        [("b", 1), ("s", 1), ("I", 1), ("l", 1), ("L", 1), ("B", 1), ("u", 1), ("i", 1)],
        [("f", 1.5), ("d", 1.5)],
        [("S", b"abc"), ("x", b"abc")],
        [("T", 1_700_000_000), ("T", 1_700_000_000_000)],  # pamqp reads the larger as milliseconds
    ]
    for group in same:
        keys = {message_key(received(Properties(headers=[(b"h", value)]), b"")) for value in group}
        assert len(keys) == 1, group
    differ: list[FieldValue] = [
        ("I", 1),
        ("t", True),
        ("d", 1.0),
        ("S", b"1"),
        ("T", 1),
        ("D", (0, 1)),
        ("A", [("I", 1)]),
    ]
    keys = {message_key(received(Properties(headers=[(b"h", value)]), b"")) for value in differ}
    assert len(keys) == len(differ)


def test_delivery_instructions_are_not_part_of_the_key() -> None:
    """delivery_mode, priority and expiration: the broker drops expiration when it dead-letters."""
    plain = message_key(received(Properties(), b"body"))
    instructed = Properties(delivery_mode=2, priority=9, expiration=b"60000")
    assert message_key(received(instructed, b"body")) == plain


def test_a_usable_message_id_is_the_key_as_it_is() -> None:
    assert message_key(received(Properties(message_id=b"order-17 \xc3\xa9"), b"")) == "order-17 é"
    for unusable in (b"", b"a\x00"):
        key = message_key(received(Properties(message_id=unusable), b""))
        assert re.fullmatch("sha256:[0-9a-f]{64}", key)
    # A message_id holding a NUL is part of the digest, so two such messages stay apart.
    first = message_key(received(Properties(message_id=b"a\x00"), b""))
    assert first != message_key(received(Properties(message_id=b"b\x00"), b""))


def test_values_no_client_decodes_to_are_refused() -> None:
    message = received(Properties(), b"")
    message.headers = {"odd": object()}  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="object"):
        message_key(message)


# ---------------------------------------------------------------------------- README's worked example


def readme_example() -> tuple[dict[str, Any], str, str]:
    """The message, canonical form and key README shows, from its "Handling replays" section."""
    section = README.read_text().split("## Handling replays in your consumers", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(\w*)\n(.*?)```", section, re.DOTALL)
    [spec] = [json.loads(text) for kind, text in blocks if kind == "json" and '"exchange"' in text]
    [form] = [text.strip() for kind, text in blocks if kind == "text" and text.startswith('["rabbit')]
    [key] = re.findall(r"sha256:[0-9a-f]{64}", section)
    return spec, form, key


def test_readme_worked_example_is_what_the_code_computes() -> None:
    spec, form, key = readme_example()
    headers: Table = [
        (name.encode(), (letter, value.encode() if letter == "S" else value))
        for name, (letter, value) in spec["headers"].items()
    ]
    props = Properties(
        content_type=spec["content_type"].encode(), timestamp=spec["timestamp"], headers=headers
    )
    message = received(props, spec["body"].encode(), spec["exchange"], spec["routing_key"])
    assert canonical_form(message).decode() == form
    assert message_key(message) == key
    to_queue = replayed(props, spec["body"].encode(), spec["exchange"], spec["routing_key"], to_queue="q")
    assert message_key(to_queue) == key


def test_a_naive_timestamp_counts_as_utc() -> None:
    moment = datetime.datetime(2024, 1, 2, 3, 4, 5)
    message = received(Properties(), b"")
    message.headers = {"at": moment}
    aware = received(Properties(), b"")
    aware.headers = {"at": moment.replace(tzinfo=datetime.UTC)}
    assert message_key(message) == message_key(aware)
