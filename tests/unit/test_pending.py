"""Unit tests of matching redelivered messages against the fingerprints pending per batch."""

from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from rabbit_archive.archive.records import FINGERPRINT_SIZE
from rabbit_archive.capture.pending import claim, pack, unpack

# Few distinct fingerprints, so that repeats (the same message sent twice) are common.
fingerprints = st.sampled_from([bytes([n]) * FINGERPRINT_SIZE for n in range(4)])
pending_rows = st.lists(st.lists(fingerprints, max_size=6), max_size=5)


def walk_each_fingerprint(
    wanted: list[bytes], rows: list[list[bytes]]
) -> tuple[Counter[bytes], list[list[bytes]]]:
    """The rule with a row per fingerprint, oldest first: one pending copy per redelivered copy."""
    left = Counter(wanted)
    matched: Counter[bytes] = Counter()
    kept = []
    for row in rows:
        kept.append([])
        for digest in row:
            if left[digest] > matched[digest]:
                matched[digest] += 1
            else:
                kept[-1].append(digest)
    return matched, kept


@given(st.lists(fingerprints, max_size=8), pending_rows)
def test_matching_takes_what_a_row_per_fingerprint_would_oldest_first(
    wanted: list[bytes], rows: list[list[bytes]]
) -> None:
    taken = claim(wanted, ((index, pack(row)) for index, row in enumerate(rows)))
    matched, kept = walk_each_fingerprint(wanted, rows)
    assert Counter(taken.matched) == matched
    # One stored copy cancels one redelivered copy, never more.
    for digest, count in Counter(taken.matched).items():
        assert count <= wanted.count(digest)
    # The rows that gave something up say what they keep, in order; the others are untouched.
    changed = dict(taken.kept)
    for index, row in enumerate(rows):
        if kept[index] != row:
            assert unpack(changed[index]) == kept[index]
        else:
            assert index not in changed


# What an earlier version left pending for the same messages (another hash of them).
legacy_of = {bytes([n]) * FINGERPRINT_SIZE: bytes([0x80 + n]) * FINGERPRINT_SIZE for n in range(4)}
either_form = st.sampled_from([*legacy_of, *legacy_of.values()])


@given(st.lists(fingerprints, max_size=8), st.lists(st.lists(either_form, max_size=6), max_size=5))
def test_a_legacy_fingerprint_pending_matches_as_the_current_one_and_is_kept_as_it_was(
    wanted: list[bytes], rows: list[list[bytes]]
) -> None:
    current_of = {legacy: current for current, legacy in legacy_of.items()}
    taken = claim(wanted, ((index, pack(row)) for index, row in enumerate(rows)), current_of)
    # The same as if every pending fingerprint had been written in the current form.
    translated = [[current_of.get(digest, digest) for digest in row] for row in rows]
    matched, kept = walk_each_fingerprint(wanted, translated)
    assert Counter(taken.matched) == matched
    changed = dict(taken.kept)
    for index, row in enumerate(rows):
        if kept[index] != translated[index]:
            # What a row keeps stays in the form it was written in.
            left = unpack(changed[index])
            assert [current_of.get(digest, digest) for digest in left] == kept[index]
            assert Counter(left) <= Counter(row)
        else:
            assert index not in changed


def test_a_row_whose_every_fingerprint_is_matched_keeps_nothing() -> None:
    first, second = b"a" * FINGERPRINT_SIZE, b"b" * FINGERPRINT_SIZE
    taken = claim([first, first], [("old", pack([first])), ("newer", pack([second, first]))])
    assert taken.matched == [first, first]
    assert taken.kept == [("old", b""), ("newer", second)]


def test_a_fingerprint_no_row_holds_is_not_matched() -> None:
    taken = claim([b"x" * FINGERPRINT_SIZE], [(1, pack([b"y" * FINGERPRINT_SIZE]))])
    assert (taken.matched, taken.kept) == ([], [])


@given(st.lists(fingerprints, max_size=20))
def test_packed_fingerprints_unpack_to_the_same_list(digests: list[bytes]) -> None:
    assert unpack(pack(digests)) == digests
