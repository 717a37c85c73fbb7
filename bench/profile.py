"""Where `rabbit-capture run` spends its time per message: py-spy samples of a backlog drain.

Publishes N messages (512 random bytes, three headers) to a fresh vhost while the daemon is stopped,
starts it, waits for its first row, then samples it with py-spy (250 Hz, without pausing it) until
every row is stored. Each sample goes to the area (AREAS) of its innermost frame that has one; the
shares of the areas, the functions with the most samples of their own and the drain rate are
printed as JSON. py-spy cannot see into compiled code: asyncpg's COPY encoding counts where its
Python caller is. Run: .venv/bin/python -m bench.profile [--messages N]
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

import asyncpg
import httpx

from bench.capture import Daemon, prepare
from bench.common import MANAGEMENT, Sizes, git_state, log, publish, scratch_database, scratch_vhost

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


def area_of(stack: list[str]) -> str:
    """The area of a sample: that of its innermost frame that matches one of AREAS, else EVENT_LOOP."""
    for frame in reversed(stack):
        for area, needle in AREAS:
            if needle in frame:
                return area
    return EVENT_LOOP


def summarise(raw: str, top: int = 15) -> dict[str, Any]:
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
        areas[area_of(stack)] += count
        own[stack[-1]] += count
    if not total:
        raise RuntimeError("py-spy took no samples")
    return {
        "samples": total,
        "areas": {area: round(count / total, 3) for area, count in areas.most_common()},
        "own_time": {name: round(count / total, 3) for name, count in own.most_common(top)},
    }


async def measure(sizes: Sizes) -> dict[str, Any]:
    """Drain N messages under py-spy in a fresh vhost and database; both removed at the end."""
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
            try:
                await prepare(api, daemon, vhost)
                log.log(f"profile: publishing {sizes.messages} messages")
                await publish(vhost, sizes)
                connection = await asyncpg.connect(database_url)
                try:
                    pid = await daemon.start()
                    while not await connection.fetchval(ROWS):
                        daemon.check_running()
                        await asyncio.sleep(0.05)
                    spy = await asyncio.create_subprocess_exec(
                        *(spy_command, "record", "--pid", str(pid), "--format", "raw", "--rate", "250"),
                        *("--nonblocking", "--output", str(raw_path)),
                        stdout=asyncio.subprocess.DEVNULL,
                        stderr=asyncio.subprocess.DEVNULL,
                    )
                    started = time.perf_counter()
                    first = rows = int(await connection.fetchval(ROWS))
                    while rows < sizes.messages:
                        daemon.check_running()
                        await asyncio.sleep(0.2)
                        rows = int(await connection.fetchval(ROWS))
                    seconds = time.perf_counter() - started
                    spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
                    await asyncio.wait_for(spy.wait(), 30)
                finally:
                    await connection.close()
                summary = summarise(raw_path.read_text())
            finally:
                await daemon.stop()
    return {"messages": sizes.messages, "drain_msg_per_s": round((rows - first) / seconds), **summary}


def main() -> None:
    """Command line: python -m bench.profile."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=150_000)
    parser.add_argument("--body-size", type=int, default=512)
    args = parser.parse_args()
    result = asyncio.run(measure(Sizes(args.messages, args.body_size)))
    print(json.dumps({**git_state(), **result}, indent=2))


if __name__ == "__main__":
    main()
