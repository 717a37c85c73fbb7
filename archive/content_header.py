"""Raw AMQP content headers for aiormq: property bytes kept exactly when received and sent exactly.

pamqp (under aiormq) turns the header table into Python values, losing the AMQP field
types (integer widths, float vs double, byte arrays). The archive stores the bytes as the
broker sent them instead, so the capture process replaces the header-frame decoder with
one that keeps them and leaves decoding to archive.amqp_codec.
"""

import struct

from pamqp import common, decode, encode, header

_HEADER_PREFIX = struct.Struct(">HHQ")
_original_unmarshal = header.ContentHeader.unmarshal
_original_short_str = decode.METHODS["shortstr"]
_original_encode_short_str = encode.METHODS["shortstr"]
_installed = False


def _short_str_keeping_bytes(value: bytes) -> tuple[int, str]:
    # pamqp decodes short strings (exchange, routing key) as strict UTF-8, so one producer
    # sending invalid UTF-8 would break the connection on every redelivery and stall
    # capture. surrogateescape keeps such bytes recoverable (archive.records.name_columns).
    try:
        length = common.Struct.byte.unpack(value[0:1])[0]
    except struct.error as error:
        raise ValueError("Could not unpack short string value") from error
    return length + 1, value[1 : length + 1].decode("utf-8", "surrogateescape")


def _unmarshal_keeping_raw(self: header.ContentHeader, data: bytes) -> None:
    self.class_id, self.weight, self.body_size = _HEADER_PREFIX.unpack_from(data, 0)
    # properties stays empty: nothing in the capture path reads pamqp's lossy decoding,
    # and skipping it also means a property pamqp cannot decode never breaks the connection.
    self.raw_properties = bytes(data[12:])  # type: ignore[attr-defined]


def _encode_short_str_keeping_bytes(value: str) -> bytes:
    # The inverse of _short_str_keeping_bytes: a name read with surrogate escapes (a routing
    # key that is not UTF-8) goes back on the wire as the same bytes; valid text is unchanged.
    if not isinstance(value, str):
        raise TypeError(f"str required, received {type(value)}")
    raw = value.encode("utf-8", "surrogateescape")
    if len(raw) > 255:
        raise TypeError("string exceeds maximum length of 255 bytes")
    return bytes(common.Struct.byte.pack(len(raw))) + raw


def install() -> None:
    """Make every content header received in this process carry `raw_properties`, and let
    short strings (exchange names, routing keys) carry any bytes both ways."""
    global _installed
    if not _installed:
        header.ContentHeader.unmarshal = _unmarshal_keeping_raw  # type: ignore[method-assign]
        decode.METHODS["shortstr"] = _short_str_keeping_bytes
        encode.METHODS["shortstr"] = _encode_short_str_keeping_bytes
        _installed = True


def uninstall() -> None:
    """Restore pamqp's own decoder (for tests that share a process with other clients)."""
    global _installed
    header.ContentHeader.unmarshal = _original_unmarshal  # type: ignore[method-assign]
    decode.METHODS["shortstr"] = _original_short_str
    encode.METHODS["shortstr"] = _original_encode_short_str
    _installed = False


def raw_properties(content_header: header.ContentHeader) -> bytes:
    """The property bytes kept by the installed decoder."""
    raw: bytes = content_header.raw_properties  # type: ignore[attr-defined]
    return raw


class RawProperties:
    """Basic properties that go on the wire as the given bytes (pamqp calls marshal()).

    `message_id` is only aiormq's bookkeeping key for publisher confirms (it invents one
    when a message has none); the message's own message id, if any, is inside `raw`.
    """

    __slots__ = ("_raw", "message_id")

    def __init__(self, raw: bytes, bookkeeping_id: str) -> None:
        self._raw = raw
        self.message_id = bookkeeping_id

    def marshal(self) -> bytes:
        """The property flags and values, exactly as given."""
        return self._raw
