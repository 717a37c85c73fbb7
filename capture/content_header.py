"""Keeps each content header's raw property bytes, which the AMQP client would decode lossily.

pamqp (under aiormq) turns the header table into Python values, losing the AMQP field
types (integer widths, float vs double, byte arrays). The archive stores the bytes as the
broker sent them instead, so the capture process replaces the header-frame decoder with
one that keeps them and leaves decoding to archive.amqp_codec.
"""

import struct

from pamqp import header

_HEADER_PREFIX = struct.Struct(">HHQ")
_original_unmarshal = header.ContentHeader.unmarshal
_installed = False


def _unmarshal_keeping_raw(self: header.ContentHeader, data: bytes) -> None:
    self.class_id, self.weight, self.body_size = _HEADER_PREFIX.unpack_from(data, 0)
    # properties stays empty: nothing in the capture path reads pamqp's lossy decoding,
    # and skipping it also means a property pamqp cannot decode never breaks the connection.
    self.raw_properties = bytes(data[12:])  # type: ignore[attr-defined]


def install() -> None:
    """Make every content header received in this process carry `raw_properties`."""
    global _installed
    if not _installed:
        header.ContentHeader.unmarshal = _unmarshal_keeping_raw  # type: ignore[method-assign]
        _installed = True


def uninstall() -> None:
    """Restore pamqp's own decoder (for tests that share a process with other clients)."""
    global _installed
    header.ContentHeader.unmarshal = _original_unmarshal  # type: ignore[method-assign]
    _installed = False


def raw_properties(content_header: header.ContentHeader) -> bytes:
    """The property bytes kept by the installed decoder."""
    raw: bytes = content_header.raw_properties  # type: ignore[attr-defined]
    return raw
