"""Matching redelivered messages against the fingerprints pending per batch, in memory.

Each pending row holds one batch's fingerprints end to end (`FINGERPRINT_SIZE` bytes each).
A redelivery is rare, so matching is done here on the few rows of the vhost's earlier
sessions rather than by an index on every fingerprint, which every stored message would pay.
"""

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from rabbit_archive.archive.records import FINGERPRINT_SIZE

RowId = TypeVar("RowId")


def pack(fingerprints: Iterable[bytes]) -> bytes:
    """Fingerprints end to end, as a pending row holds them."""
    return b"".join(fingerprints)


def unpack(packed: bytes) -> list[bytes]:
    """The fingerprints of a pending row, in order."""
    return [packed[start : start + FINGERPRINT_SIZE] for start in range(0, len(packed), FINGERPRINT_SIZE)]


@dataclass
class Claim(Generic[RowId]):
    """What matching took: the fingerprints matched and what each row it touched keeps."""

    matched: list[bytes] = field(default_factory=list)
    # Only the rows that gave up a fingerprint, with what is left of them (b"" when nothing).
    kept: list[tuple[RowId, bytes]] = field(default_factory=list)


def claim(
    wanted: Sequence[bytes],
    rows: Iterable[tuple[RowId, bytes]],
    aliases: Mapping[bytes, bytes] | None = None,
) -> Claim[RowId]:
    """Match each wanted copy with one pending fingerprint, taking the rows in the order given.

    A multiset match: two redelivered copies of the same message take two pending
    fingerprints, one stored copy cancelling one redelivered copy. `aliases` maps another
    fingerprint of a wanted message (legacy_fingerprint, left pending by an earlier version)
    to the wanted one: a pending alias matches as the wanted fingerprint, and is reported
    matched as it (so it moves on in the current form).
    """
    left = Counter(wanted)
    aliases = aliases or {}
    result: Claim[RowId] = Claim()
    for row_id, packed in rows:
        if not left:
            break
        kept = []
        for pending in unpack(packed):
            digest = aliases.get(pending, pending)
            if left[digest]:
                left[digest] -= 1
                if not left[digest]:
                    del left[digest]
                result.matched.append(digest)
            else:
                kept.append(pending)
        if len(kept) * FINGERPRINT_SIZE != len(packed):
            result.kept.append((row_id, pack(kept)))
    return result
