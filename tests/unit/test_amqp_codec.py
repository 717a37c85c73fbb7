"""Unit tests for the exact AMQP field-table and basic-properties codec."""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import math
import struct
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pamqp.commands
import pamqp.decode
import pamqp.encode
import pika.data
import pika.spec
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from rabbit_archive.archive.amqp_codec import (
    PROPERTY_NAMES,
    CodecError,
    FieldValue,
    Properties,
    Table,
    decode_properties,
    decode_table,
    decode_table_view,
    encode_properties,
    encode_table,
    strip_header,
    table_json_view,
    text_view,
    to_json_view,
    typed_entries,
)

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
UTC = datetime.UTC
U32 = struct.Struct(">I")


# ---------------------------------------------------------------------------- strategies

# Bit patterns worth hitting on purpose: signed zero, infinities, quiet/signalling NaNs with
# payloads and either sign, subnormals.
F32_SPECIAL = [
    0x00000000,
    0x80000000,
    0x7F800000,
    0xFF800000,
    0x7FC00000,
    0xFFC00001,
    0x7F800001,
    0x7FBFFFFF,
    0x00000001,
    0x807FFFFF,
]
F64_SPECIAL = [
    0,
    1 << 63,
    0x7FF0000000000000,
    0xFFF0000000000000,
    0x7FF8000000000000,
    0x7FF0000000000001,
    0xFFF8DEADBEEF0001,
    0x0000000000000001,
]


def _float_value(letter: str, raw: bytes) -> FieldValue:
    number = struct.unpack(">f" if letter == "f" else ">d", raw)[0]
    return (letter, raw if math.isnan(number) else number)


def _float_strategy(letter: str) -> st.SearchStrategy[FieldValue]:
    size = 4 if letter == "f" else 8
    special = F32_SPECIAL if letter == "f" else F64_SPECIAL
    bits = st.one_of(st.sampled_from(special), st.integers(0, 2 ** (8 * size) - 1))
    return bits.map(lambda n: _float_value(letter, n.to_bytes(size, "big")))


def _letter(letter: str, values: st.SearchStrategy[Any]) -> st.SearchStrategy[FieldValue]:
    return st.tuples(st.just(letter), values)


def _int(bits: int, signed: bool) -> st.SearchStrategy[int]:
    if signed:
        return st.integers(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return st.integers(0, 2**bits - 1)


def scalar_values(
    *,
    floats: bool = True,
    max_timestamp: int = 2**64 - 1,
    noncanonical_bool: bool = True,
) -> st.SearchStrategy[FieldValue]:
    bools: st.SearchStrategy[Any] = st.booleans()
    if noncanonical_bool:
        bools = st.one_of(st.booleans(), st.integers(2, 255))
    options = [
        _letter("t", bools),
        _letter("b", _int(8, True)),
        _letter("B", _int(8, False)),
        _letter("s", _int(16, True)),
        _letter("u", _int(16, False)),
        _letter("I", _int(32, True)),
        _letter("i", _int(32, False)),
        _letter("l", _int(64, True)),
        _letter("L", _int(64, True)),
        _letter("D", st.tuples(_int(8, False), _int(32, True))),
        _letter("S", st.binary(max_size=40)),
        _letter("x", st.binary(max_size=40)),
        _letter("T", st.integers(0, max_timestamp)),
        st.just(("V", None)),
    ]
    if floats:
        options += [_float_strategy("f"), _float_strategy("d")]
    return st.one_of(options)


def field_values(
    keys: st.SearchStrategy[bytes] | None = None, **scalar_options: Any
) -> st.SearchStrategy[FieldValue]:
    keys = keys if keys is not None else st.binary(max_size=255)

    def extend(children: st.SearchStrategy[FieldValue]) -> st.SearchStrategy[FieldValue]:
        return st.one_of(
            _letter("A", st.lists(children, max_size=4)),
            _letter("F", st.lists(st.tuples(keys, children), max_size=4)),
        )

    return st.recursive(scalar_values(**scalar_options), extend, max_leaves=12)


def tables(keys: st.SearchStrategy[bytes] | None = None, **options: Any) -> st.SearchStrategy[Table]:
    keys = keys if keys is not None else st.binary(max_size=255)
    return st.lists(st.tuples(keys, field_values(keys, **options)), max_size=6)


utf8_keys = st.text(max_size=12).map(str.encode)
shortstrs = st.none() | st.binary(max_size=255)
properties = st.builds(
    Properties,
    content_type=shortstrs,
    content_encoding=shortstrs,
    headers=st.none() | tables(),
    delivery_mode=st.none() | _int(8, False),
    priority=st.none() | _int(8, False),
    correlation_id=shortstrs,
    reply_to=shortstrs,
    expiration=shortstrs,
    message_id=shortstrs,
    timestamp=st.none() | _int(64, False),
    type=shortstrs,
    user_id=shortstrs,
    app_id=shortstrs,
    cluster_id=shortstrs,
)


def _entry(key: bytes, encoded_value: bytes) -> bytes:
    return bytes((len(key),)) + key + encoded_value


def _table_bytes(*entries: bytes) -> bytes:
    body = b"".join(entries)
    return U32.pack(len(body)) + body


# Raw wire payloads of every fixed-size type, so every bit pattern is exercised
# (non-canonical booleans, NaN payloads, ...).
FIXED_SIZES = {
    "t": 1,
    "b": 1,
    "B": 1,
    "s": 2,
    "u": 2,
    "I": 4,
    "i": 4,
    "l": 8,
    "L": 8,
    "f": 4,
    "d": 8,
    "D": 5,
    "T": 8,
}
raw_values = st.one_of(
    st.sampled_from(sorted(FIXED_SIZES)).flatmap(
        lambda letter: st.binary(min_size=FIXED_SIZES[letter], max_size=FIXED_SIZES[letter]).map(
            lambda payload: letter.encode() + payload
        )
    ),
    st.tuples(st.sampled_from([b"S", b"x"]), st.binary(max_size=20)).map(
        lambda lv: lv[0] + U32.pack(len(lv[1])) + lv[1]
    ),
    st.sampled_from([b"V", b"\x00"]),
)
raw_tables = st.lists(st.tuples(st.binary(max_size=255), raw_values), max_size=8).map(
    lambda entries: _table_bytes(*(_entry(k, v) for k, v in entries))
)


# ---------------------------------------------------------------------------- round trips


@SETTINGS
@given(tables())
def test_table_round_trip(table: Table) -> None:
    raw = encode_table(table)
    decoded, end = decode_table(raw)
    assert end == len(raw)
    assert decoded == table
    assert encode_table(decoded) == raw


@SETTINGS
@given(raw_tables, st.binary(max_size=8), st.binary(max_size=8))
def test_raw_bytes_round_trip_at_offset(raw: bytes, before: bytes, after: bytes) -> None:
    decoded, end = decode_table(before + raw + after, len(before))
    assert end == len(before) + len(raw)
    assert encode_table(decoded) == raw
    assert decode_table(memoryview(raw))[0] == decoded


@SETTINGS
@given(properties)
def test_properties_round_trip(props: Properties) -> None:
    raw = encode_properties(props)
    decoded = decode_properties(raw)
    assert decoded == props
    assert encode_properties(decoded) == raw


def test_float_bit_patterns_survive() -> None:
    for n in F32_SPECIAL:
        raw = _table_bytes(_entry(b"f", b"f" + n.to_bytes(4, "big")))
        assert encode_table(decode_table(raw)[0]) == raw
    for n in F64_SPECIAL:
        raw = _table_bytes(_entry(b"d", b"d" + n.to_bytes(8, "big")))
        assert encode_table(decode_table(raw)[0]) == raw
    nan = _table_bytes(_entry(b"n", b"f\x7f\x80\x00\x01"))
    assert decode_table(nan)[0] == [(b"n", ("f", b"\x7f\x80\x00\x01"))]


def test_noncanonical_bool_and_nul_void() -> None:
    raw = _table_bytes(
        _entry(b"a", b"t\x00"),
        _entry(b"b", b"t\x01"),
        _entry(b"c", b"t\x07"),
        _entry(b"d", b"\x00"),
        _entry(b"e", b"V"),
    )
    table, _ = decode_table(raw)
    assert table == [
        (b"a", ("t", False)),
        (b"b", ("t", True)),
        (b"c", ("t", 7)),
        (b"d", ("\x00", None)),
        (b"e", ("V", None)),
    ]
    assert type(table[0][1][1]) is bool
    assert encode_table(table) == raw
    assert table_json_view(table) == {"a": False, "b": True, "c": True, "d": None, "e": None}


def test_empty_table() -> None:
    assert decode_table(b"\x00\x00\x00\x00") == ([], 4)
    assert encode_table([]) == b"\x00\x00\x00\x00"
    assert decode_properties(b"\x00\x00") == Properties()
    assert encode_properties(Properties()) == b"\x00\x00"


def test_thousand_entries_with_duplicates() -> None:
    table: Table = [(b"k%d" % (i % 700), ("I", i - 500)) for i in range(1000)]
    raw = encode_table(table)
    assert decode_table(raw) == (table, len(raw))
    assert len(table_json_view(table)) == 700


def test_nested_fifty_deep() -> None:
    value: FieldValue = ("S", b"leaf")
    for depth in range(50):
        value = ("F", [(b"d", value)]) if depth % 2 else ("A", [value, ("V", None)])
    table: Table = [(b"root", value)]
    raw = encode_table(table)
    assert decode_table(raw) == (table, len(raw))
    json.dumps(table_json_view(table), allow_nan=False)
    json.dumps(typed_entries(table), allow_nan=False)


def test_absurd_nesting_is_a_codec_error() -> None:
    depth = 3000
    raw = b"\x00\x00\x00\x00"
    for _ in range(depth):
        raw = _table_bytes(_entry(b"k", b"F" + raw))
    with pytest.raises(CodecError, match="deep"):
        decode_table(raw)
    table: Table = []
    for _ in range(depth):
        table = [(b"k", ("F", table))]
    with pytest.raises(CodecError, match="deep"):
        encode_table(table)
    json.dumps(table_json_view(table), allow_nan=False)  # degrades, never fails


# ---------------------------------------------------------------------------- pamqp and pika


def _decimal(value: tuple[int, int]) -> Decimal:
    scale, number = value
    return Decimal(number) * (Decimal(10) ** -scale)


def _str_or_bytes(raw: bytes) -> str | bytes:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return raw


def _floatish(value: Any) -> float:
    if isinstance(value, bytes):
        return float(struct.unpack(">f" if len(value) == 4 else ">d", value)[0])
    return float(value)


def as_pamqp(value: FieldValue) -> Any:
    letter, val = value
    if letter == "F":
        return {key.decode(): as_pamqp(item) for key, item in val}
    if letter == "A":
        return [as_pamqp(item) for item in val]
    if letter == "t":
        return bool(val)
    if letter in ("f", "d"):
        return _floatish(val)
    if letter == "D":
        return _decimal(val)
    if letter == "S":
        return _str_or_bytes(val)
    if letter == "T":  # pamqp reads anything past 2106 as milliseconds
        return datetime.datetime.fromtimestamp(val if val <= 0xFFFFFFFF else val / 1000.0, UTC)
    return val


def as_pika(value: FieldValue) -> Any:
    letter, val = value
    if letter == "F":
        return {_str_or_bytes(key): as_pika(item) for key, item in val}
    if letter == "A":
        return [as_pika(item) for item in val]
    if letter == "t":
        return bool(val)
    if letter == "D":
        return _decimal(val)
    if letter == "S":
        return _str_or_bytes(val)
    if letter == "T":
        return datetime.datetime.fromtimestamp(val, UTC)
    return val


def same(a: Any, b: Any) -> bool:
    """Equality that also checks bool-ness and treats NaN as equal to NaN."""
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, float) and isinstance(b, float) and (a == b or (math.isnan(a) and math.isnan(b)))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(same, a, b))
    return bool(a == b) and isinstance(a, bool) == isinstance(b, bool)


@SETTINGS
@given(tables(utf8_keys, max_timestamp=2**40))
def test_agrees_with_pamqp_decoder(table: Table) -> None:
    raw = encode_table(table)
    consumed, theirs = pamqp.decode.field_table(raw)
    assert consumed == len(raw)
    assert same(as_pamqp(("F", table)), theirs)


# pika decodes f and d through int() (a pika bug), so floats are left out here.
@SETTINGS
@given(tables(floats=False, max_timestamp=253402300799))
def test_agrees_with_pika_decoder(table: Table) -> None:
    raw = encode_table(table)
    theirs, offset = pika.data.decode_table(raw, 0)
    assert offset == len(raw)
    assert same(as_pika(("F", table)), theirs)


def _native(*, pamqp_style: bool) -> st.SearchStrategy[Any]:
    moments = st.datetimes(
        min_value=datetime.datetime(1970, 1, 2),
        max_value=datetime.datetime(2200, 1, 1),
        timezones=st.just(UTC),
    )
    decimals = st.builds(
        lambda number, scale: Decimal(number).scaleb(-scale), _int(32, True), st.integers(0, 20)
    )
    scalars: list[st.SearchStrategy[Any]] = [
        st.none(),
        st.booleans(),
        _int(64, True),
        st.text(max_size=20),
        moments,
    ]
    if pamqp_style:
        scalars += [
            st.floats(width=32),
            st.binary(max_size=20).map(lambda b: bytearray(b)),
            decimals,
        ]
    else:  # pika normalizes decimals, so only ones with a small mantissa survive its encoder
        scalars += [st.binary(max_size=20), st.builds(Decimal, _int(16, True))]
    return st.recursive(
        st.one_of(scalars),
        lambda children: (
            st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
        ),
        max_leaves=12,
    )


@SETTINGS
@given(st.dictionaries(st.text(max_size=10), _native(pamqp_style=True), max_size=6))
def test_pamqp_encoded_bytes_round_trip(value: dict[str, Any]) -> None:
    raw = pamqp.encode.field_table(value)
    assert encode_table(decode_table(raw)[0]) == raw


@SETTINGS
@given(st.dictionaries(st.text(max_size=10), _native(pamqp_style=False), max_size=6))
def test_pika_encoded_bytes_round_trip(value: dict[str, Any]) -> None:
    pieces: list[bytes] = []
    pika.data.encode_table(pieces, value)
    raw = b"".join(pieces)
    assert encode_table(decode_table(raw)[0]) == raw


def test_pamqp_properties_agree() -> None:
    moment = datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
    theirs = pamqp.commands.Basic.Properties(
        content_type="application/json",
        content_encoding="gzip",
        headers={"x-delivery-count": 3, "b": [1, "two"], "c": {"d": None}},
        delivery_mode=2,
        priority=7,
        correlation_id="corr",
        reply_to="amq.rabbitmq.reply-to",
        expiration="60000",
        message_id="m-1",
        timestamp=moment,
        message_type="kind",
        user_id="guest",
        app_id="app",  # pamqp refuses to set cluster_id
    )
    raw = theirs.marshal()
    ours = decode_properties(raw)
    assert ours.content_type == b"application/json"
    assert ours.delivery_mode == 2
    assert ours.priority == 7
    assert ours.timestamp == int(moment.timestamp())
    assert ours.type == b"kind"
    assert ours.cluster_id is None
    assert ours.headers is not None
    assert same(as_pamqp(("F", ours.headers)), theirs.headers)
    assert encode_properties(ours) == raw
    back = pamqp.commands.Basic.Properties()
    back.unmarshal(struct.unpack(">H", raw[:2])[0], encode_properties(ours)[2:])
    assert back == theirs


def test_pika_properties_agree() -> None:
    theirs = pika.spec.BasicProperties(
        content_type="text/plain",
        headers={"x": b"\xff\x00", "n": 2**40},
        delivery_mode=1,
        message_id="id",
        timestamp=1700000000,
        app_id="a",
    )
    raw = b"".join(theirs.encode())
    ours = decode_properties(raw)
    assert ours.headers == [(b"x", ("x", b"\xff\x00")), (b"n", ("l", 2**40))]
    assert (ours.message_id, ours.timestamp, ours.app_id) == (b"id", 1700000000, b"a")
    assert encode_properties(ours) == raw


def test_property_names_match_wire_order() -> None:
    assert tuple(Properties.__slots__) == PROPERTY_NAMES
    assert len(PROPERTY_NAMES) == 14
    samples: dict[str, Any] = {"headers": [], "delivery_mode": 1, "priority": 1, "timestamp": 1}
    for bit, name in zip(range(15, 1, -1), PROPERTY_NAMES, strict=True):
        raw = encode_properties(Properties(**{name: samples.get(name, b"v")}))
        assert struct.unpack_from(">H", raw)[0] == 1 << bit


# ---------------------------------------------------------------------------- strip_header

KEY = b"x-delivery-count"
DC: tuple[bytes, FieldValue] = (KEY, ("l", 2))


@pytest.mark.parametrize("position", ["first", "middle", "last", "only", "twice"])
def test_strip_header_positions(position: str) -> None:
    others: Table = [(b"a", ("S", b"x-delivery-count")), (b"b", ("F", [DC]))]
    layouts: dict[str, Table] = {
        "first": [DC, *others],
        "middle": [others[0], DC, others[1]],
        "last": [*others, DC],
        "only": [DC],
        "twice": [DC, others[0], DC, others[1]],
    }
    props = Properties(
        content_type=b"text/plain",
        content_encoding=b"utf-8",
        headers=layouts[position],
        delivery_mode=2,
        message_id=b"m",
        timestamp=12345,
        cluster_id=b"c",
    )
    expected = Properties(
        content_type=b"text/plain",
        content_encoding=b"utf-8",
        headers=[] if position == "only" else others,
        delivery_mode=2,
        message_id=b"m",
        timestamp=12345,
        cluster_id=b"c",
    )
    stripped = strip_header(encode_properties(props), KEY)
    assert stripped == encode_properties(expected)
    assert decode_properties(stripped).headers == expected.headers  # nested entry kept


def test_strip_header_noop_returns_same_object() -> None:
    without_key = encode_properties(Properties(headers=[(b"a", ("b", 1))], message_id=b"m"))
    assert strip_header(without_key, KEY) is without_key
    no_headers = encode_properties(Properties(message_id=KEY, app_id=b"a"))
    assert strip_header(no_headers, KEY) is no_headers
    only_in_values = encode_properties(Properties(headers=[(b"a", ("S", KEY))]))
    assert strip_header(only_in_values, KEY) is only_in_values


@SETTINGS
@given(properties, st.data())
def test_strip_header_matches_filtering(props: Properties, data: st.DataObject) -> None:
    if props.headers is not None:
        for _ in range(data.draw(st.integers(0, 2))):
            props.headers.insert(data.draw(st.integers(0, len(props.headers))), DC)
    raw = encode_properties(props)
    if props.headers is not None:
        props.headers = [entry for entry in props.headers if entry[0] != KEY]
    assert strip_header(raw, KEY) == encode_properties(props)


# ---------------------------------------------------------------------------- views


def _assert_json_safe(view: Any) -> None:
    dumped = json.dumps(view, allow_nan=False)
    assert "\\u0000" not in dumped
    dumped.encode("utf-8")  # a lone surrogate would fail here


def test_text_view() -> None:
    assert text_view(b"plain") == "plain"
    assert text_view("żółw".encode()) == "żółw"
    assert text_view(b"a\\x00b") == "a\\x00b"  # literal backslash text is left alone
    assert text_view(b"a\x00b") == "a\\x00b"
    assert text_view(b"\xff\x00") == "\\xff\\x00"
    assert text_view(b"\xed\xa0\x80") == "\\xed\\xa0\\x80"  # encoded lone surrogate


def test_json_view_values() -> None:
    table: Table = [
        (b"nul\x00key", ("S", b"v\x00")),
        (b"\xffkey", ("S", b"\xfe")),
        (b"bytes", ("x", b"\x00\xff")),
        (b"nan", ("f", b"\x7f\xc0\x00\x01")),
        (b"inf", ("d", math.inf)),
        (b"ninf", ("f", -math.inf)),
        (b"zero", ("d", -0.0)),
        (b"huge", ("l", -(2**63))),
        (b"uhuge", ("T", 2**64 - 1)),
        (b"ts", ("T", 1704164645)),
        (b"dec", ("D", (2, 1234))),
        (b"negdec", ("D", (3, -5))),
        (b"tiny", ("D", (10, 1))),
        (b"arr", ("A", [("t", True), ("V", None), ("F", [(b"k", ("u", 1))])])),
        (b"dup", ("b", 1)),
        (b"dup", ("b", 2)),
    ]
    view = table_json_view(table)
    assert view == {
        "nul\\x00key": "v\\x00",
        "\\xffkey": "\\xfe",
        "bytes": "base64:AP8=",
        "nan": "NaN",
        "inf": "Infinity",
        "ninf": "-Infinity",
        "zero": -0.0,
        "huge": -(2**63),
        "uhuge": 2**64 - 1,
        "ts": "2024-01-02T03:04:05Z",
        "dec": "12.34",
        "negdec": "-0.005",
        "tiny": "0.0000000001",
        "arr": [True, None, {"k": 1}],
        "dup": 2,
    }
    _assert_json_safe(view)
    assert to_json_view(("S", "not bytes")) == "<unrepresentable AMQP value>"


def test_typed_entries() -> None:
    table: Table = [(b"k", ("L", 5)), (b"n", ("F", [(b"a", ("A", [("s", -1)]))]))]
    assert typed_entries(table) == [
        {"key": "k", "type": "int64 (L)", "value": 5},
        {
            "key": "n",
            "type": "table",
            "value": [
                {"key": "a", "type": "array", "value": [{"type": "int16", "value": -1}]},
            ],
        },
    ]


@SETTINGS
@given(tables())
def test_views_are_always_json_safe(table: Table) -> None:
    _assert_json_safe(table_json_view(table))
    _assert_json_safe(typed_entries(table))


# ---------------------------------------------------------------------------- bad input


@SETTINGS
@given(tables().filter(bool))
def test_every_truncation_is_a_codec_error(table: Table) -> None:
    raw = encode_table(table)
    for cut in range(len(raw)):
        with pytest.raises(CodecError):
            decode_table(raw[:cut])


def _never_crashes(call: Callable[[], object]) -> None:
    with contextlib.suppress(CodecError):
        call()


@SETTINGS
@given(st.binary(max_size=64), raw_tables, st.integers(0, 200), st.binary(min_size=1, max_size=3))
def test_garbage_only_raises_codec_error(garbage: bytes, raw: bytes, at: int, noise: bytes) -> None:
    corrupted = raw[:at] + noise + raw[at + len(noise) :]
    for blob in (garbage, corrupted, b"\x20\x00" + corrupted, b"\xa0\x00\x00\x00" + garbage):
        _never_crashes(functools.partial(decode_table, blob))
        _never_crashes(functools.partial(decode_properties, blob))
        _never_crashes(functools.partial(strip_header, blob + KEY, KEY))


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (_table_bytes(_entry(b"k", b"Z")), "unknown AMQP field type"),
        (_table_bytes(_entry(b"k", b"U\x00\x01")), "unknown AMQP field type"),
        (_table_bytes(_entry(b"k", b"I\x00")), "truncated"),
        (_table_bytes(_entry(b"k", b"S\x00\x00\x00\x09abc")), "truncated"),
        (_table_bytes(b"\x05ab"), "truncated"),
        (b"\x00\x00", "truncated"),
        (b"\x00\x00\x00\x10" + b"\x00" * 4, "truncated"),
    ],
)
def test_bad_tables(raw: bytes, message: str) -> None:
    with pytest.raises(CodecError, match=message):
        decode_table(raw)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "truncated"),
        (b"\x00\x01", "continuation"),
        (b"\x00\x02", "reserved"),
        (b"\x80\x00\x05ab", "truncated"),
        (b"\x00\x40\x00\x00\x00", "truncated"),
        (b"\x00\x00\x00", "unexpected bytes"),
        (b"\x20\x00\x00\x00\x00\x01", "truncated"),
    ],
)
def test_bad_properties(raw: bytes, message: str) -> None:
    with pytest.raises(CodecError, match=message):
        decode_properties(raw)


@pytest.mark.parametrize(
    "table",
    [
        [(b"k", ("b", 300))],
        [(b"k", ("i", -1))],
        [(b"k", ("S", "text"))],
        [(b"k" * 256, ("V", None))],
        [(b"k", ("Q", 1))],
        [(b"k", ("f", b"\x00"))],
        [(b"k", ("I", b"\x00\x00\x00\x00"))],
        [(b"k", ("D", (256, 1)))],
        [(b"k", ("A", [("T", -1)]))],
    ],
)
def test_unencodable_tables(table: Table) -> None:
    with pytest.raises(CodecError):
        encode_table(table)


@pytest.mark.parametrize(
    "props",
    [
        Properties(message_id=b"m" * 256),
        Properties(priority=256),
        Properties(timestamp=-1),
        Properties(headers=[(b"k", ("b", 300))]),
    ],
)
def test_unencodable_properties(props: Properties) -> None:
    with pytest.raises(CodecError):
        encode_properties(props)


def _outcome(call: Callable[[], Any]) -> tuple[str, Any]:
    try:
        return "value", call()
    except CodecError as error:
        return "error", str(error)


NAN_BITS = b"\x7f\xf8" + bytes(6)  # a double NaN, kept as its bytes


def _table_then_view(raw: bytes, offset: int, find: bytes) -> tuple[tuple[dict[str, Any], bytes | None], int]:
    """decode_table_view's reference: the table, its view, its last bytes value under `find`."""
    table, end = decode_table(raw, offset)
    found = None
    for key, (_letter, value) in table:
        if key == find and isinstance(value, bytes):
            found = value
    return (table_json_view(table), found), end


@SETTINGS
@given(tables(st.one_of(st.just(KEY), st.binary(max_size=12))), st.binary(max_size=4))
@example(table=[(KEY, ("S", b"first")), (b"k", ("T", 0)), (KEY, ("x", b"last"))], before=b"")
@example(
    table=[(KEY, ("x", b"first")), (KEY, ("l", 1)), (KEY, ("d", b"\x7f\xf8" + bytes(6)))], before=b"\x00"
)
def test_a_table_view_decoded_at_once_is_the_table_then_its_view(table: Table, before: bytes) -> None:
    raw = before + encode_table(table)
    at_once = decode_table_view(raw, len(before), KEY)
    assert at_once == _table_then_view(raw, len(before), KEY)
    assert list(at_once[0][0]) == list(table_json_view(table))  # the same keys in the same order


@SETTINGS
@given(st.binary(max_size=64), raw_tables, st.integers(0, 200), st.binary(min_size=1, max_size=3))
def test_a_table_view_decoded_at_once_fails_as_the_table_does(
    garbage: bytes, raw: bytes, at: int, noise: bytes
) -> None:
    corrupted = raw[:at] + noise + raw[at + len(noise) :]
    for blob in (garbage, corrupted, raw):
        assert _outcome(lambda blob=blob: decode_table_view(blob, 0, KEY)) == _outcome(
            lambda blob=blob: _table_then_view(blob, 0, KEY)
        )
