"""Inputs the replay tool must not trust: filter values from argv, export files and their end marker."""

import hashlib
import io
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from rabbit_archive.archive.errors import UsageError
from rabbit_archive.replay.filters import Filters, build_filters, where_clause
from rabbit_archive.replay.records import (
    EXPORT_END,
    export_end_line,
    from_export_line,
    full_json,
    read_export_file,
)
from rabbit_archive.replay.selection import ArchivedMessage

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)

# What Python makes of the argv bytes b"caf\xe9" (Latin-1, not UTF-8): a surrogate escape.
NOT_UTF8 = b"caf\xe9".decode("utf-8", "surrogateescape")


# --- --body-contains ------------------------------------------------------------------------------


def test_body_contains_that_is_not_utf8_matches_the_very_bytes_given() -> None:
    filters = build_filters(body_contains=NOT_UTF8, now=NOW)
    clause, params = where_clause(filters)
    assert "position($1::bytea IN body) > 0" in clause
    assert params[0] == b"caf\xe9"


def test_body_contains_that_is_not_utf8_survives_the_history() -> None:
    filters = build_filters(body_contains=NOT_UTF8, now=NOW)
    stored = json.loads(json.dumps(filters.to_json()))
    # jsonb refuses lone surrogates: the stored form must be plain UTF-8.
    json.dumps(stored, ensure_ascii=False).encode("utf-8")
    assert "body_contains" not in stored
    again = Filters.from_json(stored)
    assert again == filters
    assert where_clause(again)[1] == [b"caf\xe9"]


def test_body_contains_utf8_is_stored_as_text() -> None:
    filters = build_filters(body_contains="naïve", now=NOW)
    assert filters.to_json()["body_contains"] == "naïve"
    assert where_clause(filters)[1] == ["naïve".encode()]


def test_an_empty_body_contains_is_refused() -> None:
    with pytest.raises(UsageError, match="--body-contains") as raised:
        build_filters(body_contains="", now=NOW)
    assert "every message" in str(raised.value)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(
    ("option", "kwargs"),
    [
        ("--exchange", {"exchanges": [NOT_UTF8]}),
        ("--routing-key", {"routing_key": NOT_UTF8}),
        ("--message-id", {"message_id": NOT_UTF8}),
        ("--correlation-id", {"correlation_id": NOT_UTF8}),
        ("--vhost", {"vhosts": [NOT_UTF8]}),
        ("--header", {"headers": [f"k={NOT_UTF8}"]}),
        ("--body-json", {"body_json": [f"a.b={NOT_UTF8}"]}),
    ],
)
def test_text_filters_that_are_not_utf8_are_a_usage_error(option: str, kwargs: dict[str, object]) -> None:
    with pytest.raises(UsageError, match=option) as raised:
        build_filters(now=NOW, **kwargs)  # type: ignore[arg-type]
    assert "UTF-8" in str(raised.value)
    str(raised.value).encode("utf-8")  # printable on any terminal


# --- export files ---------------------------------------------------------------------------------


def message(n: int, exchange: str = "orders") -> ArchivedMessage:
    body = f"body-{n}".encode()
    return ArchivedMessage(
        id=n,
        captured_at=NOW,
        vhost="/",
        exchange=exchange,
        routing_key=f"k.{n % 2}",
        exchange_raw=None,
        routing_key_raw=None,
        redelivered=False,
        properties_raw=b"\x00\x00",
        properties={},
        headers={},
        body=body,
        body_size=len(body),
        replay_id=None,
    )


def export_bytes(messages: list[ArchivedMessage]) -> bytes:
    """What `export` writes: a line per message, then the end marker."""
    lines = "".join(json.dumps(full_json(m), ensure_ascii=False) + "\n" for m in messages).encode()
    return lines + (export_end_line(len(messages), hashlib.sha256(lines).hexdigest()) + "\n").encode()


MESSAGES = [message(1), message(2), message(3, "audit")]


def test_an_export_file_reads_back_with_its_breakdown_and_identity(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    data = export_bytes(MESSAGES)
    path.write_bytes(data)
    copy = io.BytesIO()
    found = read_export_file(path, copy)
    assert (found.messages, found.bytes, found.size) == (3, 18, len(data))
    assert found.sha256 == hashlib.sha256(data).hexdigest()
    assert found.samples == MESSAGES
    assert [(g.exchange, g.routing_key, g.messages, g.bytes) for g in found.groups] == [
        ("audit", "k.1", 1, 6),
        ("orders", "k.0", 1, 6),
        ("orders", "k.1", 1, 6),
    ]
    # The copy the replay reads: the message lines, same numbering, no end marker.
    lines = copy.getvalue().decode().splitlines()
    assert [from_export_line(line, "x") for line in lines] == MESSAGES
    assert data.startswith(copy.getvalue())


def test_an_empty_export_is_the_end_marker_alone(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_bytes(export_bytes([]))
    assert read_export_file(path).messages == 0


def _lines(data: bytes) -> list[bytes]:
    return data.splitlines(keepends=True)


@pytest.mark.parametrize(
    ("name", "edit", "fragment"),
    [
        ("cut-at-a-line", lambda d: b"".join(_lines(d)[:2]), "no end marker"),
        ("no-marker", lambda d: b"".join(_lines(d)[:-1]), "no end marker"),
        ("empty-file", lambda d: b"", "no end marker"),
        ("line-lost", lambda d: b"".join(_lines(d)[1:]), "counts 3"),
        ("line-doubled", lambda d: _lines(d)[0] + d, "holds 4"),
        ("byte-changed", lambda d: d.replace(b"k.1", b"k.9", 1), "SHA-256"),
        ("crlf", lambda d: d.replace(b"\n", b"\r\n"), "SHA-256"),
        ("text-after", lambda d: d + b"\n", "after the end marker"),
        ("joined", lambda d: d + d, "after the end marker"),
        ("not-utf8", lambda d: b"\xff\n" + d, "not UTF-8"),
    ],
)
def test_a_file_that_is_not_a_whole_export_is_refused_in_one_line(
    tmp_path: Path, name: str, edit: object, fragment: str
) -> None:
    path = tmp_path / f"{name}.jsonl"
    path.write_bytes(edit(export_bytes(MESSAGES)))  # type: ignore[operator]
    with pytest.raises(UsageError) as raised:
        read_export_file(path)
    text = str(raised.value)
    assert fragment in text
    assert str(path) in text
    assert "\n" not in text


def test_an_end_marker_line_is_never_taken_for_a_message() -> None:
    marker = export_end_line(0, hashlib.sha256(b"").hexdigest())
    assert json.loads(marker)[EXPORT_END] is True
    with pytest.raises(UsageError, match="missing"):
        from_export_line(marker, "f:1")
