"""`rabbit-replay export --output FILE`: a new private file, never through a symbolic link, never over
an existing file without --force, and nothing at all when the export fails midway."""

import os
import stat
import subprocess
from pathlib import Path

import pytest

from tests.acceptance import test_replay
from tests.acceptance.test_replay import (
    Archive,
    assert_one_line_error,
    json_lines,
    ok,
    publish,
    publish_sample,
)
from tests.support.daemon import command

pytestmark = pytest.mark.acceptance

# The fixture of test_replay.py: a daemon capturing the test vhost, with its exchanges and queues.
archive = test_replay.archive


def entries(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def export(archive: Archive, path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return archive.replay("export", "--output", str(path), *args)


def test_export_writes_a_new_private_file(archive: Archive, tmp_path: Path) -> None:
    publish_sample(archive)
    path = tmp_path / "slice.jsonl"
    result = export(archive, path, "--exchange", "orders")
    ok(result)
    expected = json_lines(ok(archive.replay("find", "--exchange", "orders", "--json")))
    assert len(expected) == 9
    assert [line["id"] for line in json_lines(path.read_text(encoding="utf-8"))[:-1]] == [
        item["id"] for item in expected
    ]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert f"exported 9 messages to {path}" in result.stderr
    assert entries(tmp_path) == ["slice.jsonl"]  # no temporary file left


def test_an_existing_file_is_replaced_only_with_force(archive: Archive, tmp_path: Path) -> None:
    publish_sample(archive)
    path = tmp_path / "slice.jsonl"
    path.write_text("precious\n")
    path.chmod(0o644)

    refused = export(archive, path)
    assert_one_line_error(refused, 2, str(path), "--force")
    assert path.read_text() == "precious\n"
    # Refused before any query: even without a database the answer is the same.
    no_database = subprocess.run(
        [command("rabbit-replay"), "export", "--output", str(path)],
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("RABBIT_ARCHIVE_")},
            **archive.env,
            "RABBIT_ARCHIVE_DATABASE_URL": "postgresql://root@127.0.0.1:1/none",
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert_one_line_error(no_database, 2, "--force")

    ok(export(archive, path, "--force"))
    assert len(json_lines(path.read_text(encoding="utf-8"))) == archive.rows() + 1  # + the end marker
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert entries(tmp_path) == ["slice.jsonl"]

    assert_one_line_error(archive.replay("export", "--force"), 2, "--output")


@pytest.mark.parametrize("force", [False, True])
def test_a_symbolic_link_at_the_path_is_refused(archive: Archive, tmp_path: Path, force: bool) -> None:
    publish_sample(archive)
    victim = tmp_path / "authorized_keys"
    victim.write_text("ssh-ed25519 AAAA... admin\n")
    link = tmp_path / "slice.jsonl"
    link.symlink_to(victim)
    dangling = tmp_path / "dangling.jsonl"
    dangling.symlink_to(tmp_path / "created-through-the-link")

    for path in (link, dangling):
        result = export(archive, path, *(["--force"] if force else []))
        assert_one_line_error(result, 2, str(path), "symbolic link")
        assert path.is_symlink()
    assert victim.read_text() == "ssh-ed25519 AAAA... admin\n"
    assert entries(tmp_path) == ["authorized_keys", "dangling.jsonl", "slice.jsonl"]


def export_limited(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """`rabbit-replay export ARGS` that may not grow a file beyond 1 MiB (writes past it fail: EFBIG)."""
    return subprocess.run(
        ["bash", "-c", 'ulimit -f 1024 && exec "$@"', "export", command("rabbit-replay"), "export", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_an_export_that_fails_midway_leaves_no_file(archive: Archive, tmp_path: Path) -> None:
    for n in range(20):
        publish(archive.channel, "audit", "", os.urandom(100_000), message_id=f"big-{n}")
    archive.wait_rows(20)
    path = tmp_path / "slice.jsonl"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RABBIT_ARCHIVE_")}, **archive.env}
    # 20 messages of 100 kB are 2.7 MB of JSON: the write fails after the first MiB.
    result = export_limited(env, "--output", str(path))
    assert_one_line_error(result, 1, str(path), "File too large", "no file was written")
    assert entries(tmp_path) == []

    # The same over an existing file with --force: the old one stays as it was.
    path.write_text("old\n")
    result = export_limited(env, "--output", str(path), "--force")
    assert_one_line_error(result, 1, "File too large")
    assert path.read_text() == "old\n"
    assert entries(tmp_path) == ["slice.jsonl"]


def test_an_export_whose_database_is_unreachable_leaves_no_file(archive: Archive, tmp_path: Path) -> None:
    path = tmp_path / "slice.jsonl"
    env = {**archive.env, "RABBIT_ARCHIVE_DATABASE_URL": "postgresql://root@127.0.0.1:1/none"}
    result = test_replay.replay_command(env, "export", "--output", str(path))
    assert_one_line_error(result, 1, "PostgreSQL")
    assert entries(tmp_path) == []
