"""Capture beyond one process: one daemon, two on one archive queue, two on two queues split by INCLUDE.

Each layout gets a fresh vhost and database and drains the same backlog: N messages published while
its daemons are stopped, half to exchange `scale-a` and half to `scale-b` (512 random bytes, three
headers, persistent). Layouts:
- one: one `rabbit-capture run` (the default single active consumer);
- shared: two daemons on one archive queue with SINGLE_ACTIVE_CONSUMER=false, both consuming;
- split: two daemons, QUEUE=rabbit-archive-a with INCLUDE=scale-a and QUEUE=rabbit-archive-b with
  INCLUDE=scale-b: each its own queue and exchanges.
Rate: rows over the time from the first row to the last (polled every 0.2 s). CPU: the daemons'
together over that time. Order: the share of messages stored after a message of the same exchange
published after them (0 when the archive's order is the publish order). Rounds rotate the layouts.
Run: .venv/bin/python -m bench.scaling [--messages N] [--rounds R]
"""

import argparse
import asyncio
import json
import statistics
import tempfile
import time
import uuid
from typing import Any

import asyncpg
import httpx

from bench.capture import Daemon
from bench.common import (
    MANAGEMENT,
    Sizes,
    cpu_seconds,
    esc,
    fill,
    git_state,
    log,
    scratch_database,
    scratch_vhost,
)

EXCHANGES = ("scale-a", "scale-b")
POLL = 0.2
LAYOUTS: dict[str, list[dict[str, str]]] = {
    "one": [{}],
    "shared": [{"SINGLE_ACTIVE_CONSUMER": "false"}, {"SINGLE_ACTIVE_CONSUMER": "false"}],
    "split": [
        {"QUEUE": "rabbit-archive-a", "INCLUDE": "scale-a"},
        {"QUEUE": "rabbit-archive-b", "INCLUDE": "scale-b"},
    ],
}
ROWS = "SELECT count(*) FROM rabbit_archive.messages"
SEQUENCES = """
SELECT exchange, array_agg((headers ->> 'seq')::bigint ORDER BY id) AS seqs
FROM rabbit_archive.messages GROUP BY exchange
"""


def out_of_order(seqs: list[int]) -> int:
    """Messages stored after one with a higher publish index."""
    highest, late = -1, 0
    for seq in seqs:
        if seq < highest:
            late += 1
        highest = max(highest, seq)
    return late


async def bound(api: httpx.AsyncClient, vhost: str, queue: str, exchanges: tuple[str, ...]) -> bool:
    """Whether the queue is bound to every one of the exchanges."""
    response = await api.get(f"/api/queues/{esc(vhost)}/{esc(queue)}/bindings")
    if response.status_code != 200:
        return False
    sources = {binding["source"] for binding in response.json()}
    return set(exchanges) <= sources


async def layout_round(api: httpx.AsyncClient, name: str, sizes: Sizes) -> dict[str, Any]:
    """Prepare a vhost and database for the layout, drain N messages, remove both again."""
    tag = uuid.uuid4().hex[:8]
    async with (
        scratch_vhost(api, f"bench-scale-{name}-{tag}") as vhost,
        scratch_database(f"bench_scale_{name}_{tag}") as database_url,
    ):
        with tempfile.TemporaryFile() as output:
            daemons = [Daemon(vhost, database_url, output, settings=extra) for extra in LAYOUTS[name]]
            try:
                for exchange in EXCHANGES:
                    topic = {"type": "topic", "durable": True}
                    (await api.put(f"/api/exchanges/{esc(vhost)}/{exchange}", json=topic)).raise_for_status()
                for daemon, extra in zip(daemons, LAYOUTS[name], strict=True):
                    await daemon.start()
                    queue = extra.get("QUEUE", "rabbit-archive")
                    wanted = (extra["INCLUDE"],) if "INCLUDE" in extra else EXCHANGES
                    deadline = time.monotonic() + 60
                    while not await bound(api, vhost, queue, wanted):
                        daemon.check_running()
                        if time.monotonic() > deadline:
                            raise RuntimeError(f"{name}: queue {queue} not bound after 60 s")
                        await asyncio.sleep(0.1)
                for daemon in daemons:
                    await daemon.stop()
                half = Sizes(sizes.messages // 2, sizes.body_size)
                for exchange in EXCHANGES:
                    await fill(vhost, half, exchange=exchange)
                total = 2 * half.messages
                database_connection = await asyncpg.connect(database_url)
                try:
                    pids = [await daemon.start() for daemon in daemons]
                    first: tuple[float, int, float] | None = None  # when, rows then, CPU seconds then
                    while True:
                        rows = int(await database_connection.fetchval(ROWS))
                        now = time.perf_counter()
                        if rows and first is None:
                            first = (now, rows, sum(cpu_seconds(pid) for pid in pids))
                        if rows >= total:
                            break
                        for daemon in daemons:
                            daemon.check_running()
                        await asyncio.sleep(POLL)
                    cpu = sum(cpu_seconds(pid) for pid in pids)
                    assert first is not None
                    late = sum(
                        out_of_order(list(row["seqs"])) for row in await database_connection.fetch(SEQUENCES)
                    )
                finally:
                    await database_connection.close()
                if first[1] >= total:
                    raise RuntimeError(
                        f"{name}: all {total} rows arrived within one poll: use more --messages"
                    )
                return {
                    "msg_per_s": (total - first[1]) / (now - first[0]),
                    # From the first row on: start-up (imports, connecting, binding) is not per message.
                    "cpu_s_per_10k_msgs": (cpu - first[2]) / (total - first[1]) * 10_000,
                    "out_of_order_share": late / total,
                }
            finally:
                for daemon in daemons:
                    await daemon.stop()


async def measure(sizes: Sizes, rounds: int) -> dict[str, Any]:
    """Every layout once per round, the order rotated each round; per layout the median of its rounds."""
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in LAYOUTS}
    names = list(LAYOUTS)
    async with httpx.AsyncClient(base_url=MANAGEMENT, auth=("guest", "guest"), timeout=10) as api:
        for number in range(rounds):
            order = names[number % len(names) :] + names[: number % len(names)]
            for name in order:
                log.log(f"scaling round {number + 1}: {name}")
                results[name].append(await layout_round(api, name, sizes))
    one = statistics.median(r["msg_per_s"] for r in results["one"])
    summary: dict[str, Any] = {"messages": sizes.messages, "body_size": sizes.body_size, "rounds": rounds}
    for name, measured in results.items():
        rate = statistics.median(r["msg_per_s"] for r in measured)
        summary[name] = {
            "msg_per_s": round(rate),
            "ratio_to_one": round(rate / one, 2),
            "cpu_s_per_10k_msgs": round(statistics.median(r["cpu_s_per_10k_msgs"] for r in measured), 2),
            "out_of_order_share": round(max(r["out_of_order_share"] for r in measured), 4),
            "rounds": measured,
        }
    return summary


def main() -> None:
    """Command line: python -m bench.scaling."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--body-size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    result = asyncio.run(measure(Sizes(args.messages, args.body_size), args.rounds))
    print(json.dumps({**git_state(), **result}, indent=2))


if __name__ == "__main__":
    main()
