"""Header edits on the way (`--set-header`, `--set-header-json`, `--unset-header`): applied to the
archived property bytes after they are copied and before the replay tags.

Pure logic. The header table is decoded by archive.amqp_codec, which keeps each value's wire
type, and encoded again, so every entry not named keeps its exact bytes and place. A typed
value is read by the rules `show --json` writes them (`{"type": "int32", "value": 5}`).
"""

import base64
import binascii
import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from rabbit_archive.archive.amqp_codec import (
    FieldValue,
    Table,
    decode_properties,
    encode_properties,
    typed_entries,
)
from rabbit_archive.archive.errors import UsageError
from rabbit_archive.replay.tagging import is_tag

_INTS = {
    "int8": ("b", -(2**7), 2**7 - 1),
    "uint8": ("B", 0, 2**8 - 1),
    "int16": ("s", -(2**15), 2**15 - 1),
    "uint16": ("u", 0, 2**16 - 1),
    "int32": ("I", -(2**31), 2**31 - 1),
    "uint32": ("i", 0, 2**32 - 1),
    "int64": ("l", -(2**63), 2**63 - 1),
    "int64 (L)": ("L", -(2**63), 2**63 - 1),
    "timestamp": ("T", 0, 2**64 - 1),
}
_FLOATS = {"float32": "f", "float64": "d"}
_SPECIAL_FLOATS = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
TYPE_NAMES = frozenset(
    (*_INTS, *_FLOATS, "bool", "decimal", "longstr", "bytes", "array", "table", "void", "void (NUL)")
)


class EditError(ValueError):
    """A value that is not a typed or plain JSON header value."""


def _is_typed(data: Any) -> bool:
    return isinstance(data, dict) and set(data) == {"type", "value"} and data["type"] in TYPE_NAMES


def _timestamp(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.endswith("Z"):
        try:
            moment = datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        except ValueError:
            pass
        else:
            return int(moment.timestamp())
    raise EditError(f"a timestamp is 2026-11-27T10:00:00Z or whole seconds, not {value!r}")


def _decimal(value: Any) -> tuple[int, int]:
    if not isinstance(value, str):
        raise EditError(f'a decimal is a string like "12.34", not {value!r}')
    try:
        number = Decimal(value)
    except InvalidOperation:
        raise EditError(f"{value!r} is not a decimal number") from None
    sign, digits, exponent = number.as_tuple()
    if not isinstance(exponent, int) or not 0 <= -exponent <= 255:
        raise EditError(f"{value!r}: a decimal has 0 to 255 digits after the point")
    unscaled = int("".join(map(str, digits)) or "0") * (-1 if sign else 1)
    if not -(2**31) <= unscaled < 2**31:
        raise EditError(f"{value!r}: an AMQP decimal holds a 32-bit value")
    return -exponent, unscaled


def typed_value(data: Any) -> FieldValue:
    """The field value of `{"type", "value"}` (show --json's form) or of plain JSON.

    Plain JSON: a string is a longstr, an integer int64, a number float64, true/false bool,
    null void, an array an array and an object a table (each value read the same way).
    """
    if not _is_typed(data):
        return _plain(data)
    name, value = data["type"], data["value"]
    if name in _INTS:
        letter, low, high = _INTS[name]
        number = _timestamp(value) if letter == "T" else value
        if not isinstance(number, int) or isinstance(number, bool) or not low <= number <= high:
            raise EditError(f"{name} takes a whole number from {low} to {high}, not {value!r}")
        return letter, number
    if name in _FLOATS:
        if isinstance(value, str) and value in _SPECIAL_FLOATS:
            return _FLOATS[name], _SPECIAL_FLOATS[value]
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise EditError(f"{name} takes a number, not {value!r}")
        return _FLOATS[name], float(value)
    if name == "bool":
        if not isinstance(value, bool):
            raise EditError(f"bool takes true or false, not {value!r}")
        return "t", value
    if name == "decimal":
        return "D", _decimal(value)
    if name == "longstr":
        if not isinstance(value, str):
            raise EditError(f"longstr takes a string, not {value!r}")
        return "S", value.encode("utf-8", "surrogateescape")
    if name == "bytes":
        if not isinstance(value, str) or not value.startswith("base64:"):
            raise EditError(f'bytes take "base64:...", not {value!r}')
        try:
            return "x", base64.b64decode(value[len("base64:") :], validate=True)
        except binascii.Error:
            raise EditError(f"{value!r} is not base64") from None
    if name == "array":
        if not isinstance(value, list):
            raise EditError(f"array takes a list, not {value!r}")
        return "A", [typed_value(item) for item in value]
    if name == "table":
        return "F", _typed_table(value)
    if value is not None:
        raise EditError(f"void takes null, not {value!r}")
    return ("\x00" if name == "void (NUL)" else "V"), None


def _typed_table(value: Any) -> Table:
    if isinstance(value, dict):
        return [(key.encode("utf-8", "surrogateescape"), typed_value(item)) for key, item in value.items()]
    if not isinstance(value, list) or not all(isinstance(item, dict) and "key" in item for item in value):
        raise EditError(f'table takes [{{"key", "type", "value"}}, ...], not {value!r}')
    return [
        (
            str(item["key"]).encode("utf-8", "surrogateescape"),
            typed_value({"type": item.get("type"), "value": item.get("value")}),
        )
        for item in value
    ]


def _plain(data: Any) -> FieldValue:
    if data is None:
        return "V", None
    if isinstance(data, bool):
        return "t", data
    if isinstance(data, int):
        if not -(2**63) <= data < 2**63:
            raise EditError(f"{data} does not fit a 64-bit integer")
        return "l", data
    if isinstance(data, float):
        return "d", data
    if isinstance(data, str):
        return "S", data.encode("utf-8", "surrogateescape")
    if isinstance(data, list):
        return "A", [typed_value(item) for item in data]
    if isinstance(data, dict):
        return "F", [
            (key.encode("utf-8", "surrogateescape"), typed_value(item)) for key, item in data.items()
        ]
    raise EditError(f"cannot hold {data!r} in a header")


@dataclass(frozen=True)
class HeaderEdits:
    """Headers to set (in order, replacing any of the same name) and to remove."""

    set: tuple[tuple[bytes, FieldValue], ...] = ()
    unset: tuple[bytes, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.set or self.unset)

    def edit_table(self, table: Table) -> Table:
        """The table with the edits: a set key takes the place of its first entry, or comes last."""
        values = dict(self.set)
        gone = set(self.unset) | set(values)
        edited: Table = []
        for key, value in table:
            if key in values:
                edited.append((key, values.pop(key)))
            elif key not in gone:
                edited.append((key, value))
        edited.extend((key, value) for key, value in self.set if key in values)
        return edited

    def apply(self, properties_raw: bytes) -> bytes:
        """The property bytes with the edits; CodecError when they cannot be decoded."""
        if not self:
            return properties_raw
        props = decode_properties(properties_raw)
        if props.headers is None and not self.set:
            return properties_raw
        props.headers = self.edit_table(props.headers or [])
        return encode_properties(props)

    def to_json(self) -> dict[str, Any]:
        """The stored form (history `options`): typed entries as `show --json` writes them."""
        return {
            "set": typed_entries(list(self.set)),
            "unset": [key.decode("utf-8", "surrogateescape") for key in self.unset],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> "HeaderEdits":
        """The inverse of to_json."""
        if not data:
            return cls()
        return cls(
            set=tuple(_typed_table(data.get("set", []))),
            unset=tuple(key.encode("utf-8", "surrogateescape") for key in data.get("unset", [])),
        )


def _key(option: str, text: str) -> bytes:
    key = text.encode("utf-8", "surrogateescape")
    if not key or len(key) > 255:
        raise UsageError(f"{option}: a header name has 1 to 255 bytes, got {text!r}")
    if is_tag(key):
        raise UsageError(f"{option}: {text!r} is a replay tag; the replay sets it")
    return key


def build_edits(
    set_header: list[str] | None, set_header_json: list[str] | None, unset_header: list[str] | None
) -> HeaderEdits:
    """HeaderEdits from the command line; a bad one is a UsageError naming its option."""
    setting: list[tuple[bytes, FieldValue]] = []
    for option, texts in (("--set-header", set_header), ("--set-header-json", set_header_json)):
        for text in texts or ():
            name, equals, value = text.partition("=")
            if not equals:
                raise UsageError(f"{option}: expected KEY=VALUE, got {text!r}")
            key = _key(option, name)
            if option == "--set-header":
                setting.append((key, ("S", value.encode("utf-8", "surrogateescape"))))
                continue
            try:
                setting.append((key, typed_value(json.loads(value))))
            except json.JSONDecodeError as error:
                raise UsageError(f"{option}: {name}: not JSON ({error.msg})") from None
            except EditError as error:
                raise UsageError(f"{option}: {name}: {error}") from None
            except RecursionError:
                raise UsageError(f"{option}: {name}: nested too deeply") from None
    removing = tuple(_key("--unset-header", name) for name in unset_header or ())
    names = [key for key, _ in setting]
    for key in names:
        if names.count(key) > 1 or key in removing:
            raise UsageError(
                f"header {key.decode('utf-8', 'surrogateescape')!r} is edited twice: give it once"
            )
    return HeaderEdits(set=tuple(setting), unset=removing)
