"""The capture phase for several versions of the daemon side by side, in alternating rounds of one run.

A build is a git revision, its tracked files exported (`git archive`) into a temporary directory
whose src/rabbit_archive goes first on the daemon's import path, or `worktree`: the files as they
are now. Each build has a vhost and a database of its own, so the schemas of two revisions never
meet; the plain consumer (bench/baseline.py) has a vhost of its own too, and the raw COPY baseline
a database. Every round runs, in alternating order (consumer, copy, A, B; B, A, copy, consumer; ...),
the consumer's drain and its latency publish → delivered under each steady load (the broker's
share, the floor), a raw COPY of the same rows (the database's share), and, for each build, a
fresh daemon draining a fresh backlog of N messages, then the steady loads at each rate with
latency publish → committed (bench/capture.py), then the daemon stops. A drain's rate is over
all its rounds (messages over seconds, first row to last), its ratios are to the consumer's, to
the lesser of the consumer and the COPY (the bound) and to the first build's, and also per round
(the median is reported: a shared machine drifts).
Latency percentiles pool every round's messages.

Run: .venv/bin/python -m bench.builds --build HEAD --build worktree [--quick]
"""

import argparse
import asyncio
import json
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO, Any

import asyncpg
import httpx
from rich.console import Console
from rich.table import Table

from bench import baseline, capture
from bench.common import MANAGEMENT, POSTGRES, Sizes, admin_sql, esc, log

REPOSITORY = Path(__file__).resolve().parent.parent
WORKTREE = "worktree"
ROUNDS = 4
QUICK_ROUNDS = 2
QUICK_MESSAGES = 20_000
DEFAULT_MESSAGES = 100_000
RATES = (1000.0, 5000.0)


def export(revision: str, into: Path) -> str:
    """The revision's tracked files written under `into`; returns its short commit id."""
    commit = subprocess.run(
        ["git", "rev-parse", "--short", f"{revision}^{{commit}}"],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", commit], cwd=REPOSITORY, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return commit


async def measure(
    builds: Mapping[str, Path | None],
    sizes: Sizes,
    rates: tuple[float, ...],
    seconds: float,
    rounds: int,
    output: IO[bytes],
) -> dict[str, Any]:
    """Every round: the consumer's drain and each build's drain and steady loads, in alternating order."""
    tag = uuid.uuid4().hex[:10]
    names = list(builds)
    vhosts = {"consumer": f"bench-{tag}-consumer"} | {
        name: f"bench-{tag}-build-{number}" for number, name in enumerate(names)
    }
    databases = {name: f"bench_{tag}_{number}" for number, name in enumerate(names)}
    databases["copy"] = f"bench_{tag}_copy"
    consumer_seconds: list[float] = []
    floor: dict[float, list[list[float]]] = {rate: [] for rate in rates}
    copy_seconds: list[float] = []
    drains: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    loads: dict[str, dict[float, list[dict[str, Any]]]] = {
        name: {rate: [] for rate in rates} for name in names
    }
    latencies: dict[str, dict[float, list[float]]] = {name: {rate: [] for rate in rates} for name in names}
    async with httpx.AsyncClient(base_url=MANAGEMENT, auth=("guest", "guest"), timeout=10) as api:
        try:
            for vhost in vhosts.values():
                (await api.put(f"/api/vhosts/{esc(vhost)}")).raise_for_status()
                everything = {"configure": ".*", "write": ".*", "read": ".*"}
                (await api.put(f"/api/permissions/{esc(vhost)}/guest", json=everything)).raise_for_status()
            for database in databases.values():
                await admin_sql(f'CREATE DATABASE "{database}"')
            for name in names:
                daemon = capture.Daemon(
                    vhosts[name], f"{POSTGRES}/{databases[name]}", output, build=builds[name]
                )
                await capture.prepare(api, daemon, vhosts[name])
            order = ["consumer", "copy", *names]
            for round_number in range(rounds):
                for variant in order if round_number % 2 == 0 else reversed(order):
                    if variant == "consumer":
                        rate = (await baseline.consumer(vhosts["consumer"], sizes))["msg_per_s"]
                        consumer_seconds.append((sizes.messages - 1) / rate)
                        for steady_rate in rates:
                            floor[steady_rate].append(
                                await baseline.latency(vhosts["consumer"], sizes, steady_rate, seconds)
                            )
                        continue
                    if variant == "copy":
                        copied = await baseline.copy(f"{POSTGRES}/{databases['copy']}", sizes)
                        copy_seconds.append(copied["seconds"])
                        continue
                    log.log(f"builds: round {round_number + 1} of {rounds}, {variant}")
                    url = f"{POSTGRES}/{databases[variant]}"
                    daemon = capture.Daemon(vhosts[variant], url, output, build=builds[variant])
                    connection = await asyncpg.connect(url)
                    try:
                        drains[variant].append(
                            await capture.drain(daemon, connection, vhosts[variant], sizes)
                        )
                        for rate in rates:
                            loaded, each = await capture.steady(
                                daemon, connection, vhosts[variant], sizes, rate, seconds
                            )
                            loads[variant][rate].append(loaded)
                            latencies[variant][rate].extend(each)
                    finally:
                        await daemon.stop()
                        await connection.close()
        finally:
            for vhost in vhosts.values():
                try:
                    await api.delete(f"/api/vhosts/{esc(vhost)}")
                except httpx.HTTPError as error:
                    log.log(f"[red]could not delete vhost {vhost}: {error}")
            for database in databases.values():
                try:
                    await admin_sql(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
                    log.log(f"[red]could not drop database {database}: {error}")
    return summary(names, sizes, consumer_seconds, copy_seconds, floor, drains, loads, latencies)


def summary(
    names: list[str],
    sizes: Sizes,
    consumer_seconds: list[float],
    copy_seconds: list[float],
    floor: dict[float, list[list[float]]],
    drains: dict[str, list[dict[str, Any]]],
    loads: dict[str, dict[float, list[dict[str, Any]]]],
    latencies: dict[str, dict[float, list[float]]],
) -> dict[str, Any]:
    """Rates over all rounds, ratios to the consumer and to the first build, pooled latency percentiles."""
    consumer_rate = len(consumer_seconds) * (sizes.messages - 1) / sum(consumer_seconds)
    copy_rate = len(copy_seconds) * sizes.messages / sum(copy_seconds)
    bound = min(consumer_rate, copy_rate)
    result: dict[str, Any] = {
        "consumer": {
            "msg_per_s": consumer_rate,
            "seconds": consumer_seconds,
            "steady": {
                f"{rate:.0f}": {
                    "latency_p50_ms": capture.percentile([ms for one in each for ms in one], 0.5),
                    "latency_p99_ms": capture.percentile([ms for one in each for ms in one], 0.99),
                    "latency_max_ms": max(ms for one in each for ms in one),
                    "latency_p50_ms_median_of_rounds": median(capture.percentile(one, 0.5) for one in each),
                    "latency_p99_ms_median_of_rounds": median(capture.percentile(one, 0.99) for one in each),
                }
                for rate, each in floor.items()
            },
        },
        "copy": {"rows_per_s": copy_rate, "seconds": copy_seconds},
        "bound_msg_per_s": bound,
    }
    first = names[0]

    def drain_seconds(name: str) -> list[float]:
        return [d["first_to_last_s"] for d in drains[name]]

    def drain_rate(name: str) -> float:
        counted = sum(sizes.messages - int(d["rows_at_first_poll"]) for d in drains[name])
        return counted / sum(drain_seconds(name))

    for name in names:
        per_round = sorted(
            d["msg_per_s"] / ((sizes.messages - 1) / c)
            for d, c in zip(drains[name], consumer_seconds, strict=True)
        )
        against_first = sorted(
            d["msg_per_s"] / f["msg_per_s"] for d, f in zip(drains[name], drains[first], strict=True)
        )
        steady: dict[str, Any] = {}
        for rate, each in latencies[name].items():
            steady[f"{rate:.0f}"] = {
                "latency_p50_ms": capture.percentile(each, 0.5),
                "latency_p99_ms": capture.percentile(each, 0.99),
                "latency_max_ms": max(each),
                "latency_p50_ms_median_of_rounds": median(
                    load["latency_p50_ms"] for load in loads[name][rate]
                ),
                "latency_p99_ms_median_of_rounds": median(
                    load["latency_p99_ms"] for load in loads[name][rate]
                ),
                "mean_batch": sum(load["published"] for load in loads[name][rate])
                / sum(load["batches"] for load in loads[name][rate]),
                **{
                    f"{process}_cpu_s_per_10k_msgs": cpu_per_10k(loads[name][rate], process)
                    for process in ("daemon", "broker")
                },
                "rounds": loads[name][rate],
            }
        result[name] = {
            "drain_msg_per_s": drain_rate(name),
            "drain_ratio_to_consumer": drain_rate(name) / consumer_rate,
            "drain_ratio_to_consumer_median_of_rounds": per_round[len(per_round) // 2],
            "drain_ratio_to_bound": drain_rate(name) / bound,
            "drain_ratio_to_reference": drain_rate(name) / drain_rate(first),
            "drain_ratio_to_reference_median_of_rounds": against_first[len(against_first) // 2],
            "peak_rss_mb": max(d["peak_rss_mb"] for d in drains[name]),
            "cpu_s_per_10k_msgs": sum(d["cpu_seconds"] for d in drains[name])
            / (len(drains[name]) * sizes.messages)
            * 10_000,
            "drains": drains[name],
            "steady": steady,
        }
    return result


def median(values: Iterable[float]) -> float:
    """The middle value (the upper one of an even count, as the drain ratios take it)."""
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def cpu_per_10k(loads: list[dict[str, Any]], process: str) -> float | None:
    """A process's CPU seconds per 10,000 messages over the loads, None where it was not read."""
    seconds: list[float | None] = [load[f"{process}_cpu_s"] for load in loads]
    known = [value for value in seconds if value is not None]
    if len(known) < len(seconds):
        return None
    return sum(known) / sum(int(load["published"]) for load in loads) * 10_000


def latency_cell(steady: dict[str, Any]) -> str:
    """Pooled p50 / p99, and the medians of the rounds' own p50 / p99."""
    pooled = f"{steady['latency_p50_ms']:.1f} / {steady['latency_p99_ms']:.1f}"
    p50, p99 = steady["latency_p50_ms_median_of_rounds"], steady["latency_p99_ms_median_of_rounds"]
    return f"{pooled} ({p50:.1f} / {p99:.1f})"


def cpu_cell(steady: dict[str, Any]) -> str:
    """Daemon and broker CPU per 10k messages, '-' where not read."""
    values = (steady[f"{process}_cpu_s_per_10k_msgs"] for process in ("daemon", "broker"))
    return " / ".join("-" if value is None else f"{value:.2f}" for value in values)


def ratios(build: dict[str, Any], to: str) -> str:
    """A drain ratio over all rounds, with the median of the rounds' ratios."""
    return f"{build[f'drain_ratio_to_{to}']:.2f} ({build[f'drain_ratio_to_{to}_median_of_rounds']:.2f})"


def show(result: dict[str, Any]) -> None:
    """One table: per build, the drain and its ratios, then latency per steady rate."""
    names = result["builds"]
    table = Table(
        title=f"rabbit-capture builds side by side: {result['messages']:,} messages of "
        f"{result['body_size']:,} bytes, {result['rounds']} rounds"
    )
    table.add_column("measure")
    for name in names:
        table.add_column(f"{name} ({result['commits'][name]})", justify="right")
    first = names[0]
    consumer = result["consumer"]["msg_per_s"]
    rows = [
        ("plain consumer drain msg/s", [f"{consumer:,.0f}" for _ in names]),
        ("raw COPY of the same rows, rows/s", [f"{result['copy']['rows_per_s']:,.0f}" for _ in names]),
        ("drain msg/s", [f"{result[n]['drain_msg_per_s']:,.0f}" for n in names]),
        ("drain ÷ lesser of consumer and COPY", [f"{result[n]['drain_ratio_to_bound']:.2f}" for n in names]),
        ("drain ÷ consumer (median of rounds)", [ratios(result[n], "consumer") for n in names]),
        (f"drain ÷ {first} (median of rounds)", [ratios(result[n], "reference") for n in names]),
        ("drain peak RSS MB", [f"{result[n]['peak_rss_mb']:.0f}" for n in names]),
        ("drain CPU s / 10k msgs", [f"{result[n]['cpu_s_per_10k_msgs']:.2f}" for n in names]),
    ]  # fmt: skip
    for rate in result["rates"]:
        key = f"{rate:.0f}"
        delivered = result["consumer"]["steady"][key]
        rows.append(
            (
                f"{rate:,.0f} msg/s: consumer, to delivery: p50 / p99 ms (medians of rounds)",
                [latency_cell(delivered) for _ in names],
            )
        )
        rows.append(
            (
                f"{rate:,.0f} msg/s: capture, to commit: p50 / p99 ms (medians of rounds)",
                [latency_cell(result[n]["steady"][key]) for n in names],
            )
        )
        rows.append(
            (
                f"{rate:,.0f} msg/s: CPU s / 10k msgs: daemon / broker",
                [cpu_cell(result[n]["steady"][key]) for n in names],
            )
        )
        rows.append(
            (
                f"{rate:,.0f} msg/s: messages per commit",
                [f"{result[n]['steady'][key]['mean_batch']:.1f}" for n in names],
            )
        )
    for label, values in rows:
        table.add_row(label, *values)
    console = Console()
    console.width = max(console.width, 110)
    console.print(table)


def main() -> None:
    """Parse options, export the builds, run the rounds, print the table and write the JSON."""
    started = time.perf_counter()
    parser = argparse.ArgumentParser(prog="python -m bench.builds", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--build",
        action="append",
        required=True,
        help=f"a git revision, or {WORKTREE!r}: the files as they are (repeated; the first is the reference)",
    )
    parser.add_argument(
        "--quick", action="store_true", help=f"{QUICK_MESSAGES} messages, {QUICK_ROUNDS} rounds, 5 s loads"
    )
    parser.add_argument("--messages", type=int, help=f"backlog per drain (default {DEFAULT_MESSAGES})")
    parser.add_argument("--body-size", type=int, default=512)
    parser.add_argument("--rounds", type=int, help=f"default {ROUNDS}, quick {QUICK_ROUNDS}")
    parser.add_argument(
        "--steady-rates", default=",".join(f"{rate:.0f}" for rate in RATES), help="comma-separated msg/s"
    )
    parser.add_argument("--steady-seconds", type=float, help="each load's duration (default 10, quick 5)")
    parser.add_argument("--output", type=Path, default=Path("bench-results/builds.json"))
    args = parser.parse_args()
    if len(set(args.build)) != len(args.build):
        parser.error("each --build once")
    sizes = Sizes(args.messages or (QUICK_MESSAGES if args.quick else DEFAULT_MESSAGES), args.body_size)
    rounds = args.rounds or (QUICK_ROUNDS if args.quick else ROUNDS)
    rates = tuple(float(rate) for rate in args.steady_rates.split(","))
    seconds = args.steady_seconds or (5.0 if args.quick else 10.0)
    with tempfile.TemporaryDirectory(prefix="bench-builds-") as directory:
        builds: dict[str, Path | None] = {}
        commits: dict[str, str] = {}
        for number, name in enumerate(args.build):
            if name == WORKTREE:
                builds[name], commits[name] = None, run_git("rev-parse", "--short", "HEAD") + " + changes"
            else:
                builds[name] = into = Path(directory) / str(number)
                commits[name] = export(name, into)
        with tempfile.NamedTemporaryFile(prefix="bench-builds-", suffix=".log") as output:
            measured = asyncio.run(measure(builds, sizes, rates, seconds, rounds, output))
    result = {
        "builds": args.build,
        "commits": commits,
        "messages": sizes.messages,
        "body_size": sizes.body_size,
        "rounds": rounds,
        "rates": rates,
        "steady_seconds": seconds,
        **measured,
        "total_s": time.perf_counter() - started,
    }
    show(result)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    log.log(f"total {result['total_s']:.1f} s; wrote {args.output}")


def run_git(*args: str) -> str:
    """A git command's output in the repository."""
    return subprocess.run(
        ["git", *args], cwd=REPOSITORY, capture_output=True, text=True, check=True
    ).stdout.strip()


if __name__ == "__main__":
    main()
