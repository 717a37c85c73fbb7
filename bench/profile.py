"""Where `rabbit-capture run` (or `rabbit-replay run`) spends its time per message: py-spy samples.

Publishes N messages (512 random bytes, three headers) to a fresh vhost while the daemon is stopped,
starts it, waits for its first row, then samples it with py-spy (250 Hz, without pausing it) until
every row is stored. With --command replay the drain is not sampled: the daemon stops once every row
is stored, and `rabbit-replay run --exchange bench --to-queue <fresh quorum queue> --yes` of the N
archived messages is sampled from start to exit instead. Each sample goes to the area (AREAS or
REPLAY_AREAS) of its innermost frame that has one; the shares of the areas, the functions with the
most samples of their own and the rate are printed as JSON. py-spy cannot see into compiled code:
asyncpg's COPY encoding counts where its Python caller is.
Run: .venv/bin/python -m bench.profile [--messages N] [--command capture|replay]
"""

import argparse
import asyncio
import collections
import json
import re
import shutil
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import httpx

from bench.capture import Daemon, prepare
from bench.common import (
    MANAGEMENT,
    Sizes,
    amqp_url,
    fill,
    git_state,
    log,
    scratch_database,
    scratch_vhost,
)
from bench.replay import COMMAND, TARGET_QUEUE, completed, replay_env

PY_SPY = Path(sys.executable).parent / "py-spy"
# (area, what a frame's "function (path)" contains): a sample goes to the area of its innermost frame
# that matches one; samples that match none (the loop's own work) go to EVENT_LOOP.
AREAS: tuple[tuple[str, str], ...] = (
    ("database: COPY and statements (asyncpg)", "asyncpg/"),
    ("rows: properties view, fingerprint, row tuples", "archive/records.py"),
    ("rows: properties view, fingerprint, row tuples", "archive/amqp_codec.py"),
    ("rows: properties view, fingerprint, row tuples", "capture/store.py"),
    ("AMQP frames: reading and parsing", "archive/content_header.py"),
    ("AMQP frames: reading and parsing", "archive/frames.py"),
    ("AMQP frames: reading and parsing", "asyncio/streams.py"),
    ("aiormq: channel queue, message objects, a task per delivery", "aiormq/"),
    ("batching and acknowledging", "capture/consumer.py"),
    ("batching and acknowledging", "capture/acks.py"),
    ("batching and acknowledging", "capture/batching.py"),
    ("batching and acknowledging", "capture/read_gate.py"),
)
# The replay's areas: where a publish's time goes, from reading the archive to the broker's confirm.
REPLAY_AREAS: tuple[tuple[str, str], ...] = (
    ("database: reading pages (asyncpg)", "asyncpg/"),
    ("database: reading pages (asyncpg)", "replay/selection.py"),
    ("tagging: properties with the replay headers", "replay/tagging.py"),
    ("tagging: properties with the replay headers", "archive/amqp_codec.py"),
    ("tagging: properties with the replay headers", "replay/edits.py"),
    ("publishing: frames, channel, confirms", "replay/publisher.py"),
    ("publishing: frames, channel, confirms", "archive/frames.py"),
    ("publishing: frames, channel, confirms", "archive/content_header.py"),
    ("aiormq and pamqp: writer, reader, confirm futures", "aiormq/"),
    ("aiormq and pamqp: writer, reader, confirm futures", "pamqp/"),
    ("replay loop: window, cursors, history", "replay/runner.py"),
    ("replay loop: window, cursors, history", "replay/history.py"),
    ("start-up: imports, preview, connections", "<frozen importlib"),
)
EVENT_LOOP = "event loop: scheduling, callbacks, select"
ROWS = "SELECT count(*) FROM rabbit_archive.messages"
SAMPLE = re.compile(r"(?P<function>.*) \((?P<path>.*?):\d+\)$")


def frame_name(frame: str) -> str:
    """'function (path)' with the path cut to the package: the same for every line of a function."""
    match = SAMPLE.match(frame)
    if match is None:
        return frame
    path = match["path"]
    for marker in ("site-packages/", "/src/", "lib/python3.11/", "lib/python3.12/", "lib/python3.13/"):
        path = path.split(marker)[-1]
    return f"{match['function']} ({path})"


def area_of(stack: list[str], areas: tuple[tuple[str, str], ...] = AREAS) -> str:
    """The area of a sample: that of its innermost frame that matches one of areas, else EVENT_LOOP."""
    for frame in reversed(stack):
        for area, needle in areas:
            if needle in frame:
                return area
    return EVENT_LOOP


def summarise(raw: str, top: int = 15, areas_of: tuple[tuple[str, str], ...] = AREAS) -> dict[str, Any]:
    """Shares by area and the functions with the most samples of their own, from py-spy's raw output."""
    areas: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack_text, _, count_text = line.rstrip().rpartition(" ")
        if not stack_text or not count_text.isdigit():
            continue
        count = int(count_text)
        stack = [frame_name(frame) for frame in stack_text.split(";")]
        total += count
        areas[area_of(stack, areas_of)] += count
        own[stack[-1]] += count
    if not total:
        raise RuntimeError("py-spy took no samples")
    return {
        "samples": total,
        "areas": {area: round(count / total, 3) for area, count in areas.most_common()},
        "own_time": {name: round(count / total, 3) for name, count in own.most_common(top)},
    }


async def measure(sizes: Sizes, command: str = "capture", keep_raw: Path | None = None) -> dict[str, Any]:
    """Drain N messages (under py-spy, or then replay them under it) in a fresh vhost and database;
    both removed at the end."""
    if not PY_SPY.exists() and shutil.which("py-spy") is None:
        raise RuntimeError("py-spy is not installed: scripts/install test installs it")
    spy_command = str(PY_SPY) if PY_SPY.exists() else "py-spy"
    tag = uuid.uuid4().hex[:8]
    async with (
        httpx.AsyncClient(base_url=MANAGEMENT, auth=("guest", "guest"), timeout=10) as api,
        scratch_vhost(api, f"bench-profile-{tag}") as vhost,
        scratch_database(f"bench_profile_{tag}") as database_url,
    ):
        with tempfile.TemporaryDirectory() as folder, tempfile.TemporaryFile() as output:
            daemon = Daemon(vhost, database_url, output)
            raw_path = Path(folder) / "raw.txt"
            spy_options = (
                "record",
                "--format",
                "raw",
                "--rate",
                "250",
                "--nonblocking",
                "--output",
                str(raw_path),
            )
            try:
                await prepare(api, daemon, vhost)
                log.log(f"profile: publishing {sizes.messages} messages")
                await fill(vhost, sizes)
                connection = await asyncpg.connect(database_url)
                try:
                    pid = await daemon.start()
                    while not await connection.fetchval(ROWS):
                        daemon.check_running()
                        await asyncio.sleep(0.05)
                    spy = None
                    if command == "capture":
                        spy = await asyncio.create_subprocess_exec(
                            spy_command, *spy_options, "--pid", str(pid),
                            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
                        )  # fmt: skip
                    started = time.perf_counter()
                    first = rows = int(await connection.fetchval(ROWS))
                    while rows < sizes.messages:
                        daemon.check_running()
                        await asyncio.sleep(0.2)
                        rows = int(await connection.fetchval(ROWS))
                    seconds = time.perf_counter() - started
                    if spy is not None:
                        spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
                        await asyncio.wait_for(spy.wait(), 30)
                        rate = {"drain_msg_per_s": round((rows - first) / seconds)}
                    else:
                        await daemon.stop()
                        rate = await replay_sampled(vhost, database_url, sizes, [spy_command, *spy_options])
                        rate["replay_msg_per_s"] = round(sizes.messages / rate["publishing_s"])
                finally:
                    await connection.close()
                if keep_raw is not None:
                    shutil.copyfile(raw_path, keep_raw)
                summary = summarise(
                    raw_path.read_text(), areas_of=AREAS if command == "capture" else REPLAY_AREAS
                )
            finally:
                await daemon.stop()
    return {"command": command, "messages": sizes.messages, **rate, **summary}


async def replay_sampled(vhost: str, database_url: str, sizes: Sizes, spy: list[str]) -> dict[str, Any]:
    """`rabbit-replay run` of the archived backlog into a fresh quorum queue, under py-spy: its span."""
    async with await aio_pika.connect(amqp_url(vhost)) as broker:
        channel = await broker.channel()
        await channel.declare_queue(TARGET_QUEUE, durable=True, arguments={"x-queue-type": "quorum"})
    log.log(f"profile: replaying {sizes.messages} messages under py-spy")
    process = await asyncio.create_subprocess_exec(
        *spy, "--", *COMMAND,
        env=replay_env(vhost, database_url), stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL, cwd=tempfile.gettempdir(),
    )  # fmt: skip
    if await asyncio.wait_for(process.wait(), sizes.timeout()) != 0:
        raise RuntimeError(f"py-spy or rabbit-replay exited {process.returncode}")
    history = await completed(database_url, sizes)
    return {"publishing_s": round(float(history["seconds"]), 3)}


def main() -> None:
    """Command line: python -m bench.profile."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=150_000)
    parser.add_argument("--body-size", type=int, default=512)
    parser.add_argument("--command", choices=("capture", "replay"), default="capture")
    parser.add_argument("--raw", type=Path, help="also keep py-spy's raw stacks in this file")
    args = parser.parse_args()
    result = asyncio.run(measure(Sizes(args.messages, args.body_size), args.command, args.raw))
    print(json.dumps({**git_state(), **result}, indent=2))


if __name__ == "__main__":
    main()
