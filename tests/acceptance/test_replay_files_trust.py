"""`run --from-file` trusts no file: end marker, count and digest; resume only with the very same file;
targets checked first; filter values that are not UTF-8 or empty."""

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from tests.acceptance import test_replay, test_replay_files
from tests.acceptance.test_replay import (
    Archive,
    assert_one_line_error,
    json_lines,
    ok,
    publish,
    publish_sample,
    replay_command,
)
from tests.acceptance.test_replay_files import depth, drain
from tests.support.daemon import command, wait_for
from tests.support.services import Services

pytestmark = pytest.mark.acceptance

archive = test_replay.archive
other_vhost = test_replay_files.other_vhost
END = "rabbit_archive_export_end"


def export(archive: Archive, path: Path, *filters: str) -> list[bytes]:
    """Export to path; its lines as bytes (newlines kept), the end marker last."""
    ok(archive.replay("export", *filters, "--output", str(path)))
    return path.read_bytes().splitlines(keepends=True)


def with_end(lines: list[bytes]) -> bytes:
    """Message lines and a matching end marker: a file someone edited and 'fixed' up."""
    body = b"".join(lines)
    end = {END: True, "count": len(lines), "sha256": hashlib.sha256(body).hexdigest()}
    return body + json.dumps(end).encode() + b"\n"


def refused(archive: Archive, path: Path, *fragments: str, env: dict[str, str] | None = None) -> None:
    """`run --from-file path` is exit 2 with one line naming the fragments; nothing published or recorded."""
    args = ("run", "--from-file", str(path), "--to-queue", "target", "--yes")
    result = replay_command(env or archive.env, *args)
    assert_one_line_error(result, 2, *fragments)
    assert result.stdout == ""  # not even a replay id


def nothing_happened(archive: Archive) -> None:
    time.sleep(0.3)
    assert depth(archive.channel, "target") == 0
    assert json_lines(ok(archive.replay("history", "--json"))) == []


# --- item 9: the end marker ---------------------------------------------------------------------


def test_export_ends_with_a_marker_that_counts_and_digests_the_lines(
    archive: Archive, tmp_path: Path
) -> None:
    publish_sample(archive)
    lines = export(archive, tmp_path / "all.jsonl", "--exchange", "audit")
    end = json.loads(lines[-1])
    assert end["count"] == 4 == len(lines) - 1
    assert end["sha256"] == hashlib.sha256(b"".join(lines[:-1])).hexdigest()
    # Standard output carries the same bytes.
    result = subprocess.run(
        [command("rabbit-replay"), "export", "--exchange", "audit"],
        env={**{k: v for k, v in os.environ.items() if not k.startswith("RABBIT_ARCHIVE_")}, **archive.env},
        capture_output=True,
        check=True,
        timeout=60,
    )
    assert result.stdout == b"".join(lines)
    # An empty selection is still a complete file: the end marker alone.
    empty = export(archive, tmp_path / "empty.jsonl", "--exchange", "nothing-here")
    assert len(empty) == 1
    assert json.loads(empty[0])["count"] == 0


def test_a_file_cut_short_changed_or_joined_is_refused_before_anything_is_published(
    archive: Archive, tmp_path: Path
) -> None:
    publish_sample(archive)
    lines = export(archive, tmp_path / "good.jsonl", "--exchange", "audit")
    messages, end = lines[:-1], lines[-1]

    # Cut at a line boundary: every line is a valid message, only the end is missing.
    for keep in (4, 2):
        cut = tmp_path / f"cut-{keep}.jsonl"
        cut.write_bytes(b"".join(messages[:keep]))
        refused(archive, cut, str(cut), "end marker", "export it again")

    # A line lost (or added) in the middle, end marker kept.
    lost = tmp_path / "lost.jsonl"
    lost.write_bytes(b"".join([messages[0], *messages[2:], end]))
    refused(archive, lost, f"{lost}:4", "counts 4", "holds 3")

    # One value changed, still valid JSON, end marker kept.
    data = json.loads(messages[1])
    data["routing_key"] = "elsewhere"
    changed = tmp_path / "changed.jsonl"
    changed.write_bytes(b"".join([messages[0], json.dumps(data).encode() + b"\n", *messages[2:], end]))
    refused(archive, changed, f"{changed}:5", "SHA-256")

    # Two exports joined: text after the first end marker.
    joined = tmp_path / "joined.jsonl"
    joined.write_bytes(b"".join(lines) * 2)
    refused(archive, joined, f"{joined}:6", "end marker")

    # A marker that is not the export's own (count and digest of nothing).
    forged = tmp_path / "forged.jsonl"
    forged.write_bytes(b"".join(messages) + json.dumps({END: True, "count": 4}).encode() + b"\n")
    refused(archive, forged, "SHA-256")

    nothing_happened(archive)
    ok(archive.replay("run", "--from-file", str(tmp_path / "good.jsonl"), "--to-queue", "target", "--yes"))
    assert [p.message_id for p, _ in drain(archive.channel, "target", 4)] == [f"a-{n}" for n in range(4)]


def test_dry_run_of_a_file_shows_its_breakdown(archive: Archive, tmp_path: Path) -> None:
    publish_sample(archive)
    path = tmp_path / "audit.jsonl"
    export(archive, path, "--exchange", "audit")
    stdout = ok(archive.replay("run", "--from-file", str(path), "--dry-run"))
    assert "would replay 4 messages (12 bytes)" in stdout
    assert "audit" in stdout
    assert "dry run: nothing was published" in stdout


# --- item 8: targets checked before anything is published ---------------------------------------


def test_from_file_to_the_original_exchanges_checks_they_exist_first(
    archive: Archive, other_vhost: tuple[str, Any], services: Services, tmp_path: Path
) -> None:
    other_name, other_channel = other_vhost
    publish_sample(archive)
    path = tmp_path / "mixed.jsonl"
    export(archive, path, "--routing-key", "eu.#")  # only 'orders'
    other_env = {
        **archive.env,
        "RABBIT_ARCHIVE_AMQP_URL": services.amqp_url.rstrip("/") + "/" + quote(other_name, safe=""),
    }
    # 'orders' does not exist in the other vhost.
    result = replay_command(other_env, "run", "--from-file", str(path), "--yes")
    assert_one_line_error(result, 2, "'orders'", "does not exist", repr(other_name))
    assert result.stdout == ""
    assert json_lines(ok(replay_command(other_env, "history", "--json"))) == []
    result = replay_command(other_env, "run", "--from-file", str(path), "--to-exchange", "nowhere", "--yes")
    assert_one_line_error(result, 2, "'nowhere'", "does not exist")

    # Declared there: the same file goes through.
    other_channel.exchange_declare("orders", "topic", durable=True)
    other_channel.queue_declare("orders-copy", durable=True)
    other_channel.queue_bind("orders-copy", "orders", "#")
    stdout = ok(replay_command(other_env, "run", "--from-file", str(path), "--yes"))
    assert "returned 0" in stdout
    assert depth(other_channel, "orders-copy") == 5  # eu.created, eu.paid, eu, eu..x and "plain"


# --- item 7: resume only with the very same file -------------------------------------------------


def interrupted_file_replay(archive: Archive, path: Path) -> str:
    """Start a slow `run --from-file`, stop it with SIGINT after a few messages; its replay id."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RABBIT_ARCHIVE_")}
    args = ["run", "--from-file", str(path), "--to-queue", "target", "--rate", "20", "--yes"]
    with subprocess.Popen(
        [command("rabbit-replay"), *args],
        env={**clean, **archive.env},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        try:
            wait_for(lambda: depth(archive.channel, "target") >= 5, 30, what="replay under way")
            process.send_signal(signal.SIGINT)
            stdout, _ = process.communicate(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
    replay_id = stdout.splitlines()[0]
    [record] = json_lines(ok(archive.replay("history", "--json")))
    assert (record["replay_id"], record["status"]) == (replay_id, "interrupted")
    return replay_id


def test_resume_refuses_a_file_that_changed_and_continues_with_the_same_one(
    archive: Archive, tmp_path: Path
) -> None:
    for n in range(60):
        publish(archive.channel, "audit", "", b"x", message_id=f"r-{n}")
    archive.wait_rows(60)
    path = tmp_path / "slice.jsonl"
    original = b"".join(export(archive, path, "--exchange", "audit"))
    replay_id = interrupted_file_replay(archive, path)
    [record] = json_lines(ok(archive.replay("history", "--json")))
    assert record["filters"]["sha256"] == hashlib.sha256(original).hexdigest()
    assert record["filters"]["size"] == len(original)
    sent = depth(archive.channel, "target")
    assert 5 <= sent < 60

    # Edited and given a matching end marker: a valid export, but not the one being replayed.
    lines = original.splitlines(keepends=True)[:-1]
    lines[-1] = lines[-1].replace(b'"r-59"', b'"r-XX"')
    path.write_bytes(with_end(lines))
    result = archive.replay("resume", replay_id, "--yes")
    assert_one_line_error(result, 2, str(path), "changed since replay", replay_id)

    # Cut short: refused for that, before the comparison.
    path.write_bytes(original[: original.rindex(b"\n", 0, -1) + 1])
    assert_one_line_error(archive.replay("resume", replay_id, "--yes"), 2, "end marker")
    path.unlink()
    assert_one_line_error(archive.replay("resume", replay_id, "--yes"), 2, str(path))
    time.sleep(0.3)
    assert depth(archive.channel, "target") == sent  # nothing more was published

    path.write_bytes(original)
    assert ok(archive.replay("resume", replay_id, "--yes")).splitlines()[0] == replay_id
    ids = {p.message_id for p, _ in archive.consume_all("target", 60)}
    assert ids == {f"r-{n}" for n in range(60)}
    [record] = json_lines(ok(archive.replay("history", "--json")))
    assert record["status"] == "completed"


# --- item 11: filter values ----------------------------------------------------------------------


def test_body_contains_with_bytes_that_are_not_utf8_matches_those_bytes(archive: Archive) -> None:
    publish(archive.channel, "audit", "", b"caf\xe9 au lait", message_id="latin-1")
    publish(archive.channel, "audit", "", "café".encode(), message_id="utf-8")
    archive.wait_rows(2)
    latin = b"caf\xe9".decode("utf-8", "surrogateescape")  # argv bytes b"caf\xe9"
    found = json_lines(ok(archive.replay("find", "--body-contains", latin, "--json")))
    assert [item["properties"]["message_id"] for item in found] == ["latin-1"]
    assert ok(archive.replay("find", "--body-contains", "café", "--count")).strip() == "1"

    stdout = ok(archive.replay("run", "--body-contains", latin, "--to-queue", "target", "--yes"))
    assert "selected 1, published 1, confirmed 1" in stdout
    assert [p.message_id for p, _ in drain(archive.channel, "target", 1)] == ["latin-1"]
    [record] = json_lines(ok(archive.replay("history", "--json")))
    assert record["filters"]["body_contains_base64"] == "Y2Fm6Q=="

    result = archive.replay("find", "--exchange", latin)
    assert_one_line_error(result, 2, "--exchange", "UTF-8")


def test_empty_body_contains_is_not_a_filter(archive: Archive) -> None:
    publish_sample(archive)
    result = archive.replay("run", "--body-contains", "", "--to-queue", "target", "--yes")
    assert_one_line_error(result, 2, "--body-contains", "every message")
    assert_one_line_error(archive.replay("find", "--body-contains", "", "--count"), 2, "--body-contains")
    nothing_happened(archive)


def test_history_table_has_a_nacked_column(archive: Archive) -> None:
    publish_sample(archive)
    ok(archive.replay("run", "--exchange", "audit", "--to-queue", "target", "--yes"))
    header = ok(archive.replay("history")).splitlines()[1]
    assert "nacked" in header
