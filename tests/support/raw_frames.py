"""Publishing what pika and aio-pika cannot: exact property bytes, and names that are not UTF-8.

Written independently of the product's own content-header code, so that tests of that code
do not lean on it.
"""

import contextlib
from collections.abc import Iterator

from pamqp import common, encode


class WireProperties:
    """Property bytes handed to aiormq exactly as built (pamqp's header frame calls marshal())."""

    def __init__(self, raw: bytes, message_id: str) -> None:
        self.raw = raw
        self.message_id = message_id  # aiormq's confirm bookkeeping only

    def marshal(self) -> bytes:
        return self.raw


def _short_string_as_bytes(value: str) -> bytes:
    raw = value.encode("utf-8", "surrogateescape")
    return bytes(common.Struct.byte.pack(len(raw))) + raw


@contextlib.contextmanager
def any_bytes_in_short_strings() -> Iterator[None]:
    """Let pamqp send routing keys that are not UTF-8 (surrogate-escaped str), as a raw client can."""
    original = encode.METHODS["shortstr"]
    encode.METHODS["shortstr"] = _short_string_as_bytes
    try:
        yield
    finally:
        encode.METHODS["shortstr"] = original
