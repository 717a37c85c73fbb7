"""The sources phase: what each SOURCE costs producers, beside no daemon at all, in one run.

Four vhosts of the same shape, each with a topic exchange `bench` bound with `#` to a quorum
queue `app`, and a quorum queue `tasks`: one without a daemon (the baseline), and one each with
`rabbit-capture run` under SOURCE=bindings, bindings+default and firehose (the last two switch
the broker's tracer on in their vhost). The daemons run on this machine, as a sidecar would, and
start before the first round. A cell is one producer publishing a vhost's share of messages
with publisher confirms (a sliding window in flight, bench.common.publish), either to the
exchange or through the default exchange straight into `tasks`, timed from the first publish to
the last confirm; then the bench waits until the vhost's daemon has stored what it should (the
producer's publish rate is the measure, the daemon only must not fall behind into the next cell)
and purges the queues. Every cell runs once per round, in alternating order (A B ... H, H ... B A),
so the load of a shared machine, which drifts over seconds, weighs on each of them alike. A
cell's rate is its messages over its publish time, summed over the rounds; its ratio is that rate
over the baseline vhost's for the same target.

Alone (its own vhosts and database, deleted afterwards): .venv/bin/python -m bench.sources
"""

import argparse
import asyncio
import contextlib
import json
import tempfile
import time
import uuid
from collections.abc import Mapping
from typing import IO, Any

import asyncpg
import httpx

from bench.capture import ARCHIVE_QUEUE, Daemon
from bench.common import (
    BACKLOG_WINDOW,
    BACKLOG_WINDOW_BYTES,
    EXCHANGE,
    MANAGEMENT,
    POSTGRES,
    Sizes,
    admin_sql,
    cpu_seconds,
    esc,
    git_state,
    log,
    publish,
    window_size,
)

SOURCES = ("none", "bindings", "bindings+default", "firehose")
TARGETS = ("exchange", "default")
APP_QUEUE = "app"
TASKS_QUEUE = "tasks"
MAX_MESSAGES = 50_000  # per source and target, over all rounds
ROUNDS = 4
QUICK_ROUNDS = 2
TRACE_EXCHANGE = "amq.rabbitmq.trace"
# The archive queue's bindings that show a daemon is ready for a source: (exchange, routing key).
READY_BINDINGS: dict[str, set[tuple[str, str]]] = {
    "bindings": {(EXCHANGE, "#")},
    "bindings+default": {(EXCHANGE, "#"), (TRACE_EXCHANGE, "publish.")},
    "firehose": {(TRACE_EXCHANGE, "publish.#")},
}
# What a daemon stores of each target's publishes: bindings cannot see the default exchange.
CAPTURED = {
    "none": set[str](),
    "bindings": {"exchange"},
    "bindings+default": {"exchange", "default"},
    "firehose": {"exchange", "default"},
}
NEWEST_ID = "SELECT coalesce(max(id), 0) FROM rabbit_archive.messages"
ROWS_SINCE = "SELECT count(*) FROM rabbit_archive.messages WHERE vhost = $1 AND id > $2"
ROWS_OF = "SELECT count(*) FROM rabbit_archive.messages WHERE vhost = $1"


def vhost_names(tag: str) -> dict[str, str]:
    """The phase's vhost for each source (and "none", the baseline), named after the run's tag."""
    return {source: f"bench-{tag}-source-{source.replace('+', '-')}" for source in SOURCES}


async def setup_vhost(api: httpx.AsyncClient, vhost: str) -> None:
    """The exchange, the queue bound to it, and the queue that default-exchange publishes go to."""
    quorum = {"durable": True, "arguments": {"x-queue-type": "quorum"}}
    (
        await api.put(f"/api/exchanges/{esc(vhost)}/{EXCHANGE}", json={"type": "topic", "durable": True})
    ).raise_for_status()
    for queue in (APP_QUEUE, TASKS_QUEUE):
        (await api.put(f"/api/queues/{esc(vhost)}/{queue}", json=quorum)).raise_for_status()
    binding = {"routing_key": "#"}
    (
        await api.post(f"/api/bindings/{esc(vhost)}/e/{EXCHANGE}/q/{APP_QUEUE}", json=binding)
    ).raise_for_status()


async def wait_ready(api: httpx.AsyncClient, daemon: Daemon, vhost: str, source: str) -> None:
    """Wait until /readyz is 200, the archive queue has the source's bindings and tracing is as it needs."""
    wanted = READY_BINDINGS[source]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        daemon.check_running()
        with contextlib.suppress(httpx.HTTPError):
            ready = await api.get(f"http://127.0.0.1:{daemon.port}/readyz")
            bindings = await api.get(f"/api/queues/{esc(vhost)}/{ARCHIVE_QUEUE}/bindings")
            tracing = (await api.get(f"/api/vhosts/{esc(vhost)}")).json().get("tracing") is True
            if ready.status_code == 200 and bindings.status_code == 200:
                bound = {(item["source"], item["routing_key"]) for item in bindings.json()}
                if wanted <= bound and tracing == (TRACE_EXCHANGE in {name for name, _ in wanted}):
                    return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"rabbit-capture SOURCE={source} did not become ready within 60 s")


async def wait_stored(
    database: "asyncpg.Connection[asyncpg.Record]", daemon: Daemon, vhost: str, after_id: int, expected: int
) -> None:
    """Wait until the vhost has `expected` rows with ids above after_id."""
    deadline = time.monotonic() + 120
    while (rows := int(await database.fetchval(ROWS_SINCE, vhost, after_id))) < expected:
        daemon.check_running()
        if time.monotonic() > deadline:
            raise RuntimeError(f"sources phase: only {rows} of {expected} rows stored in vhost {vhost}")
        await asyncio.sleep(0.1)


async def purge(api: httpx.AsyncClient, vhost: str) -> None:
    """Empty the producer's queues, so that every cell publishes into queues of the same depth."""
    for queue in (APP_QUEUE, TASKS_QUEUE):
        (await api.delete(f"/api/queues/{esc(vhost)}/{queue}/contents")).raise_for_status()


async def run(
    api: httpx.AsyncClient,
    vhosts: Mapping[str, str],
    database_url: str,
    sizes: Sizes,
    output: IO[bytes],
    *,
    rounds: int = ROUNDS,
) -> dict[str, Any]:
    """Every source and target once per round, in alternating order; rates, ratios, daemon CPU."""
    per_cell = Sizes(max(1, min(sizes.messages, MAX_MESSAGES) // rounds), sizes.body_size)
    for vhost in vhosts.values():
        await setup_vhost(api, vhost)
    daemons = {
        source: Daemon(vhosts[source], database_url, output, settings={"SOURCE": source})
        for source in SOURCES
        if source != "none"
    }
    database = await asyncpg.connect(database_url)
    try:
        pids = {source: await daemon.start() for source, daemon in daemons.items()}
        await asyncio.gather(*(wait_ready(api, d, vhosts[s], s) for s, d in daemons.items()))
        log.log(
            f"sources phase: {rounds} rounds of {per_cell.messages} messages per source and target, "
            f"{', '.join(SOURCES)}"
        )
        cells = [(source, target) for source in SOURCES for target in TARGETS]
        seconds: dict[str, dict[str, list[float]]] = {s: {t: [] for t in TARGETS} for s in SOURCES}
        daemon_cpu: dict[str, float] = dict.fromkeys(daemons, 0.0)
        for round_number in range(rounds):
            for source, target in cells if round_number % 2 == 0 else reversed(cells):
                vhost = vhosts[source]
                after_id = int(await database.fetchval(NEWEST_ID))
                cpu_before = cpu_seconds(pids[source]) if source in pids else 0.0
                queue = TASKS_QUEUE if target == "default" else None
                took = await asyncio.wait_for(publish(vhost, per_cell, queue=queue), per_cell.timeout())
                seconds[source][target].append(took)
                if source in daemons:
                    expected = per_cell.messages if target in CAPTURED[source] else 0
                    await wait_stored(database, daemons[source], vhost, after_id, expected)
                    daemon_cpu[source] += cpu_seconds(pids[source]) - cpu_before
                await purge(api, vhost)
                log.log(
                    f"sources phase: {source} → {target}: {per_cell.messages / took:,.0f} msg/s published"
                )
        for source, daemon in daemons.items():
            await daemon.stop()
            stored = int(await database.fetchval(ROWS_OF, vhosts[source]))
            expected = rounds * per_cell.messages * len(CAPTURED[source])
            if stored != expected:
                raise RuntimeError(
                    f"sources phase: SOURCE={source} stored {stored} rows, expected {expected}"
                )
    finally:
        for daemon in daemons.values():
            await daemon.stop()
        await database.close()
    return summary(seconds, daemon_cpu, per_cell, rounds)


def summary(
    seconds: dict[str, dict[str, list[float]]], daemon_cpu: dict[str, float], per_cell: Sizes, rounds: int
) -> dict[str, Any]:
    """Per source and target: msg/s over all rounds, its ratio to no daemon, the median ratio of rounds."""
    messages = rounds * per_cell.messages
    result: dict[str, Any] = {
        "messages_per_cell": per_cell.messages,
        "rounds": rounds,
        "in_flight": window_size(per_cell.body_size, BACKLOG_WINDOW, BACKLOG_WINDOW_BYTES),
        "publish_seconds": seconds,
    }
    for source in SOURCES:
        entry: dict[str, Any] = {}
        for target in TARGETS:
            rate = messages / sum(seconds[source][target])
            baseline = messages / sum(seconds["none"][target])
            per_round = sorted(
                none / this
                for none, this in zip(seconds["none"][target], seconds[source][target], strict=True)
            )
            entry[target] = {
                "msg_per_s": rate,
                "ratio": rate / baseline,
                "ratio_median_of_rounds": per_round[len(per_round) // 2],
                "captured": target in CAPTURED[source],
            }
        if source in daemon_cpu:
            captured = messages * len(CAPTURED[source])
            entry["daemon_cpu_s"] = daemon_cpu[source]
            entry["daemon_cpu_s_per_10k_captured"] = (
                daemon_cpu[source] / captured * 10_000 if captured else None
            )
        result[source] = entry
    return result


async def alone(sizes: Sizes, rounds: int) -> dict[str, Any]:
    """The phase in its own vhosts and database, deleted afterwards whatever happens."""
    tag = uuid.uuid4().hex[:10]
    vhosts, database = vhost_names(tag), f"bench_{tag}"
    async with httpx.AsyncClient(base_url=MANAGEMENT, auth=("guest", "guest"), timeout=10) as api:
        try:
            for vhost in vhosts.values():
                (await api.put(f"/api/vhosts/{esc(vhost)}")).raise_for_status()
                everything = {"configure": ".*", "write": ".*", "read": ".*"}
                (await api.put(f"/api/permissions/{esc(vhost)}/guest", json=everything)).raise_for_status()
            await admin_sql(f'CREATE DATABASE "{database}"')
            with tempfile.NamedTemporaryFile(prefix="bench-sources-", suffix=".log") as output:
                return await run(api, vhosts, f"{POSTGRES}/{database}", sizes, output, rounds=rounds)
        finally:
            for vhost in vhosts.values():
                await api.delete(f"/api/vhosts/{esc(vhost)}")
            await admin_sql(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


def main() -> None:
    """Run the sources phase alone and print its result as JSON."""
    parser = argparse.ArgumentParser(prog="python -m bench.sources", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--messages", type=int, default=MAX_MESSAGES, help="messages per source and target, over all rounds"
    )
    parser.add_argument("--body-size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    args = parser.parse_args()
    git = git_state()
    measured = asyncio.run(alone(Sizes(args.messages, args.body_size), args.rounds))
    print(json.dumps({**git, **measured}, indent=2))


if __name__ == "__main__":
    main()
