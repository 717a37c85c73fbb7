"""Unit tests for replay.operations.export_file: the `export --output` file appears whole, private,
never through a symbolic link, never over an existing file without --force, or not at all."""

import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from rabbit_archive.archive.errors import ArchiveError, UsageError
from rabbit_archive.replay.operations import ExportFailed, export_file


def entries(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def export_then(path: Path, text: str, then: Callable[[], object], *, force: bool = False) -> None:
    """Write text to the export file, then run `then` (which fails, or changes the directory)."""
    with export_file(path, force=force) as target:
        target.write(text)
        then()


def fail_with(error: BaseException) -> Callable[[], object]:
    def fail() -> object:
        raise error

    return fail


def test_the_file_appears_only_at_the_end_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "slice.jsonl"
    old_umask = os.umask(0)  # even a permissive umask gives a private file
    try:
        with export_file(path) as target:
            target.write('{"id": 1}\n')
            assert not path.exists()
            [part] = entries(tmp_path)
            assert part.startswith(".slice.jsonl.")
            assert part.endswith(".part")
            assert stat.S_IMODE(os.stat(tmp_path / part).st_mode) == 0o600
    finally:
        os.umask(old_umask)
    assert path.read_text() == '{"id": 1}\n'
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert entries(tmp_path) == ["slice.jsonl"]


@pytest.mark.parametrize("error", [RuntimeError("query failed"), KeyboardInterrupt(), SystemExit(1)])
def test_a_failure_midway_leaves_no_file(tmp_path: Path, error: BaseException) -> None:
    path = tmp_path / "slice.jsonl"
    with pytest.raises(type(error)):
        export_then(path, "x" * 100_000, fail_with(error))
    assert entries(tmp_path) == []


def test_a_failed_write_is_one_error_and_leaves_no_file(tmp_path: Path) -> None:
    path = tmp_path / "slice.jsonl"
    with pytest.raises(ExportFailed) as caught:
        export_then(path, "partial\n", fail_with(OSError(28, "No space left on device")))
    assert "No space left on device" in str(caught.value)
    assert caught.value.exit_code == 1
    assert entries(tmp_path) == []


def test_an_existing_file_is_kept_without_force(tmp_path: Path) -> None:
    path = tmp_path / "slice.jsonl"
    path.write_text("precious\n")
    with pytest.raises(UsageError, match="--force"), export_file(path):
        pytest.fail("the block must not run")
    assert path.read_text() == "precious\n"
    assert entries(tmp_path) == ["slice.jsonl"]


def test_an_existing_file_is_replaced_with_force_and_kept_when_that_fails(tmp_path: Path) -> None:
    path = tmp_path / "slice.jsonl"
    path.write_text("old\n")
    os.chmod(path, 0o644)
    with pytest.raises(RuntimeError):
        export_then(path, "half", fail_with(RuntimeError("lost the database")), force=True)
    assert path.read_text() == "old\n"
    with export_file(path, force=True) as target:
        target.write("new\n")
    assert path.read_text() == "new\n"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert entries(tmp_path) == ["slice.jsonl"]


def test_a_file_that_appears_during_the_export_is_not_clobbered(tmp_path: Path) -> None:
    path = tmp_path / "slice.jsonl"
    with pytest.raises(UsageError, match="--force"):
        export_then(path, "mine\n", lambda: path.write_text("someone else's\n"))
    assert path.read_text() == "someone else's\n"
    assert entries(tmp_path) == ["slice.jsonl"]


@pytest.mark.parametrize("force", [False, True])
@pytest.mark.parametrize("dangling", [False, True])
def test_a_symbolic_link_is_refused_never_followed(tmp_path: Path, force: bool, dangling: bool) -> None:
    victim = tmp_path / "victim"
    if not dangling:
        victim.write_text("untouched\n")
    link = tmp_path / "slice.jsonl"
    link.symlink_to(victim)
    with pytest.raises(UsageError, match="symbolic link"), export_file(link, force=force):
        pytest.fail("the block must not run")
    assert link.is_symlink()
    assert victim.exists() is not dangling
    if not dangling:
        assert victim.read_text() == "untouched\n"


def test_a_symbolic_link_planted_during_the_export_is_replaced_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("untouched\n")
    path = tmp_path / "slice.jsonl"
    with pytest.raises(UsageError, match="symbolic link"):
        export_then(path, "data\n", lambda: path.symlink_to(victim))
    assert victim.read_text() == "untouched\n"
    assert entries(tmp_path) == ["slice.jsonl", "victim"]


@pytest.mark.parametrize("kind", ["directory", "missing parent"])
def test_paths_that_cannot_be_a_new_file_are_usage_errors(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "out"
    if kind == "directory":
        path.mkdir()
    else:
        path = tmp_path / "no-such-dir" / "out"
    with pytest.raises(UsageError) as caught, export_file(path, force=True):
        pytest.fail("the block must not run")
    assert isinstance(caught.value, ArchiveError)
    assert caught.value.exit_code == 2
    assert "--output" in str(caught.value)
