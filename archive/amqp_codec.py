"""Exact AMQP 0-9-1 codec for field tables and basic properties: decoded values keep their wire type
so that encoding them again reproduces the original bytes, unlike pamqp or pika.

Representation:

* a field value is ``(type letter, python value)``; a table is an ordered list of
  ``(raw key bytes, field value)`` with duplicates kept as they were on the wire;
* ``t`` -> bool, except a non-canonical octet (not 0 or 1) which stays an ``int`` so it
  re-encodes unchanged; integer letters and ``T`` -> int; ``f``/``d`` -> float, except NaN
  which stays the raw 4/8 big-endian bytes (NaN payloads and the quiet bit do not survive a
  trip through a Python float); ``D`` -> ``(scale, signed int32 value)``; ``S``/``x`` ->
  bytes; ``F`` -> table; ``A`` -> list of field values; ``V`` -> None;
* the letter ``"\\x00"`` (void, value None) is accepted because pamqp accepts it and it has
  been seen in the wild; any other unknown letter is a :class:`CodecError`.
"""

from __future__ import annotations

import base64
import datetime
import math
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from operator import attrgetter
from struct import Struct
from struct import error as StructError
from typing import Any

__all__ = [
    "PROPERTY_NAMES",
    "CodecError",
    "FieldValue",
    "Properties",
    "Table",
    "decode_properties",
    "decode_property_values",
    "decode_table",
    "decode_table_view",
    "encode_properties",
    "encode_table",
    "strip_header",
    "table_json_view",
    "text_view",
    "to_json_view",
    "typed_entries",
]

FieldValue = tuple[str, Any]
Table = list[tuple[bytes, FieldValue]]
Buffer = bytes | bytearray | memoryview


class CodecError(ValueError):
    """Malformed, truncated or unencodable AMQP data."""


_U8 = Struct(">B")
_U16 = Struct(">H")
_U32 = Struct(">I")
_U64 = Struct(">Q")
_F32 = Struct(">f")
_F64 = Struct(">d")
_DECIMAL = Struct(">Bi")

# Fixed-width integer-valued types: letter code -> (letter, struct, size).
_DEC_INT: dict[int, tuple[str, Struct, int]] = {
    ord(letter): (letter, Struct(">" + fmt), Struct(fmt).size)
    for letter, fmt in (
        ("b", "b"),
        ("B", "B"),
        ("s", "h"),
        ("u", "H"),
        ("I", "i"),
        ("i", "I"),
        ("l", "q"),
        # pamqp and RabbitMQ treat L as signed; keeping the letter keeps the bytes.
        ("L", "q"),
        ("T", "Q"),
    )
}
# The type letter is packed together with the value to save a concatenation per value.
_ENC_FIXED: dict[str, Struct] = {letter: Struct(">B" + st.format[1:]) for letter, st, _ in _DEC_INT.values()}
_ENC_FIXED["t"] = Struct(">BB")
_ENC_FIXED["f"] = Struct(">Bf")
_ENC_FIXED["d"] = Struct(">Bd")
_ENC_FIXED["D"] = Struct(">BBi")
_ENC_LEN = Struct(">BI")

_SKIP_SIZE: dict[int, int] = {code: size for code, (_, _, size) in _DEC_INT.items()}
_SKIP_SIZE.update({ord("t"): 1, ord("f"): 4, ord("d"): 8, ord("D"): 5, ord("V"): 0, 0: 0})

_C_S, _C_X, _C_F, _C_A = ord("S"), ord("x"), ord("F"), ord("A")
_C_BOOL, _C_f, _C_d, _C_D, _C_V = ord("t"), ord("f"), ord("d"), ord("D"), ord("V")
_LEN1 = [bytes((i,)) for i in range(256)]
_MAX_U32 = 0xFFFFFFFF
_RAW_FLOAT_LETTERS = frozenset("fd")
_INT_LETTERS = frozenset("bBsuIilL")


def _truncated(what: str, pos: int) -> CodecError:
    return CodecError(f"truncated AMQP data: {what} at offset {pos} runs past its container")


# ---------------------------------------------------------------------------- decoding


def _decode_value(data: bytes, pos: int, end: int) -> tuple[FieldValue, int]:
    code = data[pos]
    pos += 1
    if code in (0x53, 0x78):  # S or x; strings are the common case
        if pos + 4 > end:
            raise _truncated("string length", pos)
        start = pos + 4
        nxt = start + _U32.unpack_from(data, pos)[0]
        if nxt > end:
            raise _truncated("string", pos)
        return ("S" if code == _C_S else "x", data[start:nxt]), nxt
    fixed = _DEC_INT.get(code)
    if fixed is not None:
        letter, st, size = fixed
        nxt = pos + size
        if nxt > end:
            raise _truncated(letter, pos)
        return (letter, st.unpack_from(data, pos)[0]), nxt
    if code in (0x46, 0x41):  # F or A
        if pos + 4 > end:
            raise _truncated("nested length", pos)
        start = pos + 4
        nxt = start + _U32.unpack_from(data, pos)[0]
        if nxt > end:
            raise _truncated("nested table/array", pos)
        if code == _C_F:
            return ("F", _decode_entries(data, start, nxt)), nxt
        return ("A", _decode_items(data, start, nxt)), nxt
    if code == _C_BOOL:
        if pos >= end:
            raise _truncated("t", pos)
        octet = data[pos]
        return ("t", octet == 1 if octet < 2 else octet), pos + 1
    if code in (0x66, 0x64):  # f or d
        size = 4 if code == _C_f else 8
        nxt = pos + size
        if nxt > end:
            raise _truncated(chr(code), pos)
        number = (_F32 if size == 4 else _F64).unpack_from(data, pos)[0]
        if number != number:  # NaN: keep the exact bit pattern
            return (chr(code), data[pos:nxt]), nxt
        return (chr(code), number), nxt
    if code == _C_D:
        nxt = pos + 5
        if nxt > end:
            raise _truncated("D", pos)
        return ("D", _DECIMAL.unpack_from(data, pos)), nxt
    if code == _C_V:
        return ("V", None), pos
    if code == 0:
        return ("\x00", None), pos
    raise CodecError(f"unknown AMQP field type {bytes((code,))!r} at offset {pos - 1}")


def _decode_entries(data: bytes, pos: int, end: int) -> Table:
    table: Table = []
    append = table.append
    while pos < end:
        kend = pos + 1 + data[pos]
        if kend >= end:  # the key and at least the type letter must fit
            raise _truncated("table entry", pos)
        key = data[pos + 1 : kend]
        code = data[kend]
        # Strings and integers, most headers, are decoded here as _decode_value would (same
        # values, same errors): a call per entry is a fifth of a small message's decoding.
        if code == 0x53:
            start = kend + 5
            if start > end:
                raise _truncated("string length", kend + 1)
            pos = start + _U32.unpack_from(data, kend + 1)[0]
            if pos > end:
                raise _truncated("string", kend + 1)
            append((key, ("S", data[start:pos])))
            continue
        fixed = _DEC_INT.get(code)
        if fixed is not None:
            letter, st, size = fixed
            pos = kend + 1 + size
            if pos > end:
                raise _truncated(letter, kend + 1)
            append((key, (letter, st.unpack_from(data, kend + 1)[0])))
            continue
        value, pos = _decode_value(data, kend, end)
        append((key, value))
    return table


def _decode_items(data: bytes, pos: int, end: int) -> list[FieldValue]:
    items: list[FieldValue] = []
    append = items.append
    while pos < end:
        value, pos = _decode_value(data, pos, end)
        append(value)
    return items


def _table_bounds(data: bytes, offset: int) -> tuple[int, int]:
    """Where the entries of the length-prefixed table at ``offset`` start and end."""
    if offset < 0 or offset + 4 > len(data):
        raise _truncated("table length", offset)
    start = offset + 4
    end = start + _U32.unpack_from(data, offset)[0]
    if end > len(data):
        raise _truncated("table", offset)
    return start, end


def decode_table(data: Buffer, offset: int = 0) -> tuple[Table, int]:
    """Decode the length-prefixed field table at ``offset``; return it and the offset after it."""
    if type(data) is not bytes:
        data = bytes(data)
    start, end = _table_bounds(data, offset)
    try:
        return _decode_entries(data, start, end), end
    except RecursionError:
        raise CodecError("AMQP field table nested too deeply") from None


def decode_table_view(
    data: bytes, offset: int, find: bytes
) -> tuple[tuple[dict[str, Any], bytes | None], int]:
    """((table_json_view of the table at ``offset``, its last bytes value under key ``find``), the
    offset after it), decoded at once, without the table itself.

    For a message's headers, whose view is all the archive row needs: strings and integers go
    straight to their view. Same values and same errors as ``decode_table`` then ``table_json_view``
    (tests/unit/test_amqp_codec.py compares them over generated tables).
    """
    pos, end = _table_bounds(data, offset)
    view: dict[str, Any] = {}
    found = None
    try:
        while pos < end:
            kend = pos + 1 + data[pos]
            if kend >= end:
                raise _truncated("table entry", pos)
            key = data[pos + 1 : kend]
            code = data[kend]
            # _decode_entries' strings and integers, each straight to its view.
            if code == 0x53:
                first = kend + 5
                if first > end:
                    raise _truncated("string length", kend + 1)
                pos = first + _U32.unpack_from(data, kend + 1)[0]
                if pos > end:
                    raise _truncated("string", kend + 1)
                text = data[first:pos]
                view[text_view(key)] = text_view(text)
                if key == find:
                    found = text
                continue
            fixed = _DEC_INT.get(code)
            if fixed is not None:
                letter, st, size = fixed
                pos = kend + 1 + size
                if pos > end:
                    raise _truncated(letter, kend + 1)
                number = st.unpack_from(data, kend + 1)[0]
                view[text_view(key)] = number if letter != "T" else to_json_view(("T", number))
                continue
            value, pos = _decode_value(data, kend, end)
            view[text_view(key)] = to_json_view(value)
            if key == find and type(value[1]) is bytes:
                found = value[1]
    except RecursionError:
        raise CodecError("AMQP field table nested too deeply") from None
    return (view, found), end


# ---------------------------------------------------------------------------- encoding


def _encode_value(parts: list[bytes], value: FieldValue) -> None:
    letter, val = value
    if letter == "S" or letter == "x":
        parts.append(_ENC_LEN.pack(ord(letter), len(val)))
        parts.append(val)
        return
    if letter == "F" or letter == "A":
        body = _encode_entries(val) if letter == "F" else _encode_items(val)
        parts.append(_ENC_LEN.pack(ord(letter), len(body)))
        parts.append(body)
        return
    fixed = _ENC_FIXED.get(letter)
    if fixed is not None:
        if type(val) is bytes:  # NaN kept as its raw bit pattern
            if letter not in _RAW_FLOAT_LETTERS or len(val) != fixed.size - 1:
                raise CodecError(f"raw bytes {val!r} are not a valid {letter!r} value")
            parts.append(_LEN1[ord(letter)])
            parts.append(val)
        elif letter == "D":
            parts.append(fixed.pack(0x44, *val))
        else:
            parts.append(fixed.pack(ord(letter), val))
        return
    if letter == "V" or letter == "\x00":
        parts.append(_LEN1[ord(letter)])
        return
    raise CodecError(f"unknown AMQP field type {letter!r}")


def _encode_entries(table: Table) -> bytes:
    parts: list[bytes] = []
    append = parts.append
    for key, value in table:
        append(_LEN1[len(key)])
        append(key)
        _encode_value(parts, value)
    return b"".join(parts)


def _encode_items(items: list[FieldValue]) -> bytes:
    parts: list[bytes] = []
    for value in items:
        _encode_value(parts, value)
    return b"".join(parts)


def encode_table(table: Table) -> bytes:
    """Encode a field table, including its uint32 length prefix."""
    try:
        body = _encode_entries(table)
        if len(body) > _MAX_U32:
            raise CodecError("AMQP field table longer than 4 GiB")
        return _U32.pack(len(body)) + body
    except CodecError:
        raise
    except RecursionError:
        raise CodecError("AMQP field table nested too deeply") from None
    except (StructError, TypeError, ValueError, IndexError, OverflowError) as exc:
        # e.g. an int out of range for its letter, a key longer than 255 bytes, a str value
        raise CodecError(f"cannot encode AMQP field table: {exc}") from exc


# ---------------------------------------------------------------------------- properties

PROPERTY_NAMES: tuple[str, ...] = (
    "content_type",
    "content_encoding",
    "headers",
    "delivery_mode",
    "priority",
    "correlation_id",
    "reply_to",
    "expiration",
    "message_id",
    "timestamp",
    "type",
    "user_id",
    "app_id",
    "cluster_id",
)

_SHORTSTR, _TABLE, _OCTET, _TIMESTAMP = 0, 1, 2, 3
_PROP_KINDS = (
    _SHORTSTR,
    _SHORTSTR,
    _TABLE,
    _OCTET,
    _OCTET,
    _SHORTSTR,
    _SHORTSTR,
    _SHORTSTR,
    _SHORTSTR,
    _TIMESTAMP,
    _SHORTSTR,
    _SHORTSTR,
    _SHORTSTR,
    _SHORTSTR,
)
# (position, flag mask, kind) in wire order: content_type is bit 15, cluster_id bit 2.
_PROP_SPEC = tuple((i, 1 << (15 - i), kind) for i, kind in enumerate(_PROP_KINDS))


class _Plan:
    """What a flag word says is present: (position, kind) of each property, and the positions."""

    __slots__ = ("present", "steps")

    def __init__(self, flags: int) -> None:
        self.steps = tuple((index, kind) for index, mask, kind in _PROP_SPEC if flags & mask)
        self.present = tuple(index for index, _ in self.steps)


# By flag word (at most 2**14 valid ones): most messages set three or four of the fourteen
# flags, and producers use few combinations, so decoding loops over those only.
_PLANS: dict[int, _Plan] = {}
_HEADERS_BIT = 1 << 13
_CONTENT_TYPE_BIT = 1 << 15
_CONTENT_ENCODING_BIT = 1 << 14


@dataclass(slots=True)
class Properties:
    """AMQP basic properties; shortstr fields are raw bytes, timestamp is in seconds."""

    content_type: bytes | None = None
    content_encoding: bytes | None = None
    headers: Table | None = None
    delivery_mode: int | None = None
    priority: int | None = None
    correlation_id: bytes | None = None
    reply_to: bytes | None = None
    expiration: bytes | None = None
    message_id: bytes | None = None
    timestamp: int | None = None
    type: bytes | None = None
    user_id: bytes | None = None
    app_id: bytes | None = None
    cluster_id: bytes | None = None


_get_properties = attrgetter(*PROPERTY_NAMES)


def _read_flags(raw: bytes) -> int:
    if len(raw) < 2:
        raise _truncated("property flags", 0)
    flags: int = _U16.unpack_from(raw, 0)[0]
    if flags & 1:
        raise CodecError("AMQP property flags continuation bit set; only one flag word is known")
    if flags & 2:
        raise CodecError("reserved AMQP property flag bit 1 set")
    return flags


def _skip_shortstr(raw: bytes, pos: int) -> int:
    if pos >= len(raw):
        raise _truncated("shortstr length", pos)
    nxt = pos + 1 + raw[pos]
    if nxt > len(raw):
        raise _truncated("shortstr", pos)
    return nxt


def decode_properties(raw: Buffer) -> Properties:
    """Decode the property flag word and property values of a content header."""
    return Properties(*decode_property_values(raw)[0])


def decode_property_values(
    raw: Buffer, headers: Callable[[bytes, int], tuple[Any, int]] = decode_table
) -> tuple[list[Any], tuple[int, ...]]:
    """The values decode_properties gives, in PROPERTY_NAMES order (None where absent), and the
    positions of those present, in that order: for callers that need no Properties object.

    ``headers`` decodes the header table (at an offset, giving what to keep and the offset after
    it): decode_table, or what a caller needs instead of the table, raising CodecError alike."""
    if type(raw) is not bytes:
        raw = bytes(raw)
    flags = _read_flags(raw)
    values: list[Any] = [None] * 14
    pos = 2
    size = len(raw)
    plan = _PLANS.get(flags)
    if plan is None:
        plan = _PLANS[flags] = _Plan(flags)
    for index, kind in plan.steps:
        if kind == _SHORTSTR:
            # _skip_shortstr inline: the call cost more than its two checks (py-spy: 4 % of a drain).
            if pos >= size:
                raise _truncated("shortstr length", pos)
            nxt = pos + 1 + raw[pos]
            if nxt > size:
                raise _truncated("shortstr", pos)
            values[index] = raw[pos + 1 : nxt]
        elif kind == _TABLE:
            values[index], nxt = headers(raw, pos)
        elif kind == _OCTET:
            if pos >= size:
                raise _truncated(PROPERTY_NAMES[index], pos)
            values[index] = raw[pos]
            nxt = pos + 1
        else:
            nxt = pos + 8
            if nxt > size:
                raise _truncated("timestamp", pos)
            values[index] = _U64.unpack_from(raw, pos)[0]
        pos = nxt
    if pos != size:
        raise CodecError(f"{size - pos} unexpected bytes after AMQP properties at offset {pos}")
    return values, plan.present


def encode_properties(props: Properties) -> bytes:
    """Encode properties as flag word plus values, the exact inverse of decode_properties."""
    flags = 0
    index = 0
    parts: list[bytes] = [b""]
    values = _get_properties(props)
    try:
        for index, mask, kind in _PROP_SPEC:
            value = values[index]
            if value is None:
                continue
            flags |= mask
            if kind == _SHORTSTR:
                parts.append(_LEN1[len(value)])
                parts.append(value)
            elif kind == _TABLE:
                parts.append(encode_table(value))
            elif kind == _OCTET:
                parts.append(_U8.pack(value))
            else:
                parts.append(_U64.pack(value))
        parts[0] = _U16.pack(flags)
        return b"".join(parts)
    except CodecError:
        raise
    except (StructError, TypeError, IndexError, OverflowError) as exc:
        raise CodecError(f"cannot encode {PROPERTY_NAMES[index]}: {exc}") from exc


def _skip_value(data: bytes, pos: int, end: int) -> int:
    code = data[pos]
    pos += 1
    size = _SKIP_SIZE.get(code)
    if size is None:
        if code not in (_C_S, _C_X, _C_F, _C_A):
            raise CodecError(f"unknown AMQP field type {bytes((code,))!r} at offset {pos - 1}")
        if pos + 4 > end:
            raise _truncated("length", pos)
        size = 4 + _U32.unpack_from(data, pos)[0]
    nxt = pos + size
    if nxt > end:
        raise _truncated(chr(code), pos)
    return nxt


def strip_header(raw_properties: bytes, key: bytes) -> bytes:
    """Return the raw properties without top-level header entries named ``key``."""
    # Nested tables are left alone. A headers table emptied by the removal is kept (flag
    # set, length 0) rather than dropped, so the only bytes that change are the entries
    # and the table length.
    if key not in raw_properties:
        return raw_properties
    raw = raw_properties
    flags = _read_flags(raw)
    if not flags & _HEADERS_BIT:
        return raw_properties
    pos = 2
    if flags & _CONTENT_TYPE_BIT:
        pos = _skip_shortstr(raw, pos)
    if flags & _CONTENT_ENCODING_BIT:
        pos = _skip_shortstr(raw, pos)
    table_at = pos
    if pos + 4 > len(raw):
        raise _truncated("headers length", pos)
    start = pos + 4
    end = start + _U32.unpack_from(raw, pos)[0]
    if end > len(raw):
        raise _truncated("headers", pos)
    kept: list[bytes] = []
    removed = False
    pos = start
    run_start = start  # start of the current run of kept entries
    while pos < end:
        kend = pos + 1 + raw[pos]
        if kend >= end:
            raise _truncated("table entry", pos)
        nxt = _skip_value(raw, kend, end)
        if raw[pos + 1 : kend] == key:
            kept.append(raw[run_start:pos])
            run_start = nxt
            removed = True
        pos = nxt
    if not removed:
        return raw_properties
    kept.append(raw[run_start:end])
    body = b"".join(kept)
    return b"".join((raw[:table_at], _U32.pack(len(body)), body, raw[end:]))


# ---------------------------------------------------------------------------- JSON views


def text_view(b: bytes) -> str:
    """Decode UTF-8 text; invalid bytes become ``\\xNN`` escapes and NUL becomes ``\\x00``."""
    # The escape is ambiguous with text that literally contains a backslash sequence; that
    # is acceptable because the view is only for querying and the raw bytes stay stored.
    try:
        s = b.decode()
    except UnicodeDecodeError:
        return b.decode(errors="backslashreplace").replace("\x00", "\\x00")
    if "\x00" in s:
        return s.replace("\x00", "\\x00")
    return s


_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)


def _float_view(number: float) -> float | str:
    if math.isfinite(number):
        return number
    if number != number:
        return "NaN"
    return "Infinity" if number > 0 else "-Infinity"


def _view(value: FieldValue) -> Any:
    letter, val = value
    if letter == "S":
        return text_view(val)
    if letter == "F":
        return _table_view(val)
    if letter == "A":
        return [_view(item) for item in val]
    if letter == "t":
        return bool(val)
    if letter in _INT_LETTERS:
        return int(val)
    if letter == "f" or letter == "d":
        return "NaN" if type(val) is bytes else _float_view(float(val))
    if letter == "T":
        try:
            return f"{_EPOCH + datetime.timedelta(seconds=val):%Y-%m-%dT%H:%M:%SZ}"
        except OverflowError:
            return int(val)
    if letter == "D":
        scale, number = val
        return format(Decimal(number).scaleb(-scale), "f")
    if letter == "x":
        return "base64:" + base64.b64encode(val).decode("ascii")
    if letter == "V" or letter == "\x00":
        return None
    return text_view(f"<unknown AMQP field type {letter!r}>".encode())


def _table_view(table: Table) -> dict[str, Any]:
    return {text_view(key): _view(value) for key, value in table}


def to_json_view(value: FieldValue) -> Any:
    """Return a JSON-safe view of a field value (no NUL, lone surrogates, NaN or Infinity)."""
    try:
        return _view(value)
    except Exception:  # the view must never fail; hand-built values may be malformed
        return "<unrepresentable AMQP value>"


def table_json_view(table: Table) -> dict[str, Any]:
    """Return a JSON-safe object for a table; for duplicate keys the last one wins."""
    view: dict[str, Any] = {}
    for entry in table:
        try:
            key = text_view(entry[0])
        except Exception:
            key = "<unrepresentable AMQP key>"
        view[key] = to_json_view(entry[1])
    return view


_TYPE_NAMES = {
    "t": "bool",
    "b": "int8",
    "B": "uint8",
    "s": "int16",
    "u": "uint16",
    "I": "int32",
    "i": "uint32",
    "l": "int64",
    "L": "int64 (L)",
    "f": "float32",
    "d": "float64",
    "D": "decimal",
    "S": "longstr",
    "x": "bytes",
    "A": "array",
    "T": "timestamp",
    "F": "table",
    "V": "void",
    "\x00": "void (NUL)",
}


def _typed_value(value: FieldValue) -> dict[str, Any]:
    letter = value[0]
    if letter == "F":
        shown: Any = typed_entries(value[1])
    elif letter == "A":
        shown = [_typed_value(item) for item in value[1]]
    else:
        shown = to_json_view(value)
    return {"type": _TYPE_NAMES.get(letter, repr(letter)), "value": shown}


def typed_entries(table: Table) -> list[dict[str, Any]]:
    """List each entry as {"key", "type", "value"}, nested tables and arrays in the same form."""
    return [{"key": text_view(key), **_typed_value(value)} for key, value in table]
