"""Incident replays with the installed `rabbit-replay` on the real broker and database: guards
(--expect-count, typed-back counts, --canary), dead letters sent home, edits on the way, another vhost."""

import os
import pty
import subprocess
from collections.abc import Callable
from typing import Any

import pytest

from tests.acceptance.test_replay import assert_one_line_error, json_lines, ok, replay_command
from tests.acceptance.test_replay_resume import depth, drain
from tests.acceptance.test_replay_trust import loaded
from tests.support.daemon import command

pytestmark = pytest.mark.acceptance

__all__ = ["loaded"]  # the fixture, used by name below


def history(env: dict[str, str]) -> list[dict[str, Any]]:
    return json_lines(ok(replay_command(env, "history", "--json")))


# ------------------------------------------------------------------ guards


def test_expect_count_refuses_a_wrong_count_and_publishes_nothing(
    loaded: Callable[[int], list[int]], capture_env: dict[str, str], pika_channel: Any
) -> None:
    loaded(10)
    pika_channel.queue_declare("guarded", durable=True)
    base = ("run", "--exchange", "load", "--to-queue", "guarded", "--yes")
    for wrong in ("9", "11", "0"):
        result = replay_command(capture_env, *base, "--expect-count", wrong)
        assert_one_line_error(
            result, 2, f"--expect-count {wrong}", "holds 10 messages", "nothing was published"
        )
    assert depth(pika_channel, "guarded") == 0
    assert history(capture_env) == []
    dry = replay_command(capture_env, "run", "--exchange", "load", "--dry-run", "--expect-count", "3")
    assert_one_line_error(dry, 2, "--expect-count 3")
    ok(replay_command(capture_env, *base, "--expect-count", "10"))
    assert len(drain(pika_channel, "guarded")) == 10
    bad = replay_command(capture_env, *base, "--expect-count", "-1")
    assert bad.returncode == 2


def _answer_on_a_terminal(env: dict[str, str], args: list[str], answer: str) -> tuple[int, str]:
    """Run rabbit-replay with a terminal as standard input, typing `answer`; exit code and output."""
    master, terminal = pty.openpty()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RABBIT_ARCHIVE_")}
    process = subprocess.Popen(
        [command("rabbit-replay"), *args],
        env={**clean, **env},
        stdin=terminal,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    os.close(terminal)
    try:
        os.write(master, answer.encode() + b"\n")
        stdout, stderr = process.communicate(timeout=60)
    finally:
        os.close(master)
    return process.returncode, stdout + stderr


def test_above_the_threshold_the_count_is_typed_back(
    loaded: Callable[[int], list[int]], capture_env: dict[str, str], pika_channel: Any
) -> None:
    loaded(12)
    pika_channel.queue_declare("typed", durable=True)
    env = {**capture_env, "RABBIT_ARCHIVE_REPLAY_CONFIRM_COUNT_ABOVE": "10"}
    args = ["run", "--exchange", "load", "--to-queue", "typed"]
    for wrong in ("y", "11", "yes"):
        code, output = _answer_on_a_terminal(env, args, wrong)
        assert code == 1, output
        assert "Type the number of messages (12)" in output
        assert "not confirmed; nothing was published" in output
    assert depth(pika_channel, "typed") == 0
    code, output = _answer_on_a_terminal(env, args, "12")
    assert code == 0, output
    assert len(drain(pika_channel, "typed")) == 12
    # At or under the threshold a yes/no is enough.
    code, output = _answer_on_a_terminal(
        {**capture_env, "RABBIT_ARCHIVE_REPLAY_CONFIRM_COUNT_ABOVE": "12"}, args, "y"
    )
    assert code == 0, output
    assert "[y/N]" in output
    assert len(drain(pika_channel, "typed")) == 12
