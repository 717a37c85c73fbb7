"""Benchmark rabbit-capture and rabbit-replay against plain aio-pika on the local broker and database.

One run, in this order: a plain consumer draining N messages (aio-pika); the consumer and a raw COPY of
the rows of N messages into a table of the archive's shape at once in one process (the machine doing
both, as capture does); publish → delivered to a plain consumer under each steady load (the broker's
share of the latency); RabbitMQ's Java client draining N messages (bench/java_baseline.py, the
physical limit); the raw COPY alone (PostgreSQL's share) and right after it `rabbit-capture run`
draining the same N messages (with sizing figures: messages per CPU second, table, index and WAL bytes
per message), then steady publish loads at 1,000 and 5,000 msg/s with latency publish → committed;
two more pairs of the COPY and a drain (BOUND_ROUNDS, not with --quick); a plain confirming publisher
of N messages (aio-pika, then Java); `rabbit-replay run` of the N archived messages into a fresh
queue; a consumer applying each message in a PostgreSQL transaction with and without
rabbit_archive.inbox (bench/inbox.py); a producer's publish rate with no daemon and beside
`rabbit-capture run` under each SOURCE (bench/sources.py). Fresh vhosts and databases are used and
deleted at the end, whatever happens. Run: scripts/bench --quick
"""

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import IO, Any

import asyncpg
import httpx
from rich.console import Console
from rich.table import Table

from bench import baseline, capture, inbox, java_baseline, replay, sources
from bench.common import (
    MANAGEMENT,
    POSTGRES,
    Sizes,
    admin_sql,
    esc,
    git_state,
    log,
    scratch_database,
    scratch_vhost,
)

QUICK_MESSAGES = 20_000
DEFAULT_MESSAGES = 100_000
STEADY_RATES = (1000, 5000)
STEADY_BYTES_PER_S = 32 * 1024 * 1024  # large bodies: the steady rates drop to stay under this
# Issue 6's targets.
DRAIN_RATIO_TARGET = 0.8
# Issue 18's: p99 publish → committed by steady rate, and the drain of big bodies against the lesser
# of the plain consumer and a raw COPY of the same rows.
P99_TARGETS_MS = {1000: 50, 5000: 100}
BOUND_RATIO_TARGET = 0.9
# Pairs of the COPY baseline and the capture drain, each drain right after its COPY (one with --quick).
BOUND_ROUNDS = 3
REPLAY_RATIO_TARGET = 0.8
RSS_TARGET_MB = 200
# Issue 16's target.
INBOX_RATIO_TARGET = 0.8


async def measure(
    sizes: Sizes,
    steady_rates: tuple[float, ...],
    steady_seconds: float,
    analyze: bool,
    quick: bool,
    output: IO[bytes],
) -> dict[str, Any]:
    """Create the vhosts and a database, run every phase, and delete them again whatever happens."""
    tag = uuid.uuid4().hex[:10]
    source_vhosts = sources.vhost_names(tag)
    vhosts = {"baseline": f"bench-{tag}-baseline", "capture": f"bench-{tag}-capture", **source_vhosts}
    database = f"bench_{tag}"
    database_url = f"{POSTGRES}/{database}"
    copy_database = f"bench_{tag}_copy"  # the raw COPY baseline's table, apart from the daemon's
    java = await java_baseline.prepare()  # None (noted) when it cannot be built: its lines read n/a
    async with httpx.AsyncClient(base_url=MANAGEMENT, auth=("guest", "guest"), timeout=10) as api:
        try:
            for vhost in vhosts.values():
                (await api.put(f"/api/vhosts/{esc(vhost)}")).raise_for_status()
                everything = {"configure": ".*", "write": ".*", "read": ".*"}
                (await api.put(f"/api/permissions/{esc(vhost)}/guest", json=everything)).raise_for_status()
            await admin_sql(f'CREATE DATABASE "{database}"')
            await admin_sql(f'CREATE DATABASE "{copy_database}"')
            consumer = await baseline.consumer(vhosts["baseline"], sizes)
            together = await baseline.consumer_and_copy(
                vhosts["baseline"], f"{POSTGRES}/{copy_database}", sizes
            )
            # The broker's share of the latency: publish → delivered to a plain consumer, same loads.
            broker_latency = [
                latency_summary(await baseline.latency(vhosts["baseline"], sizes, rate, steady_seconds))
                for rate in steady_rates
            ]
            java_consumer = await java_baseline.optional(
                java_baseline.consumer, vhosts["baseline"], sizes, java
            )
            # The COPY baseline right before the drain, each in a database of its own (dropped only
            # after both), and further such pairs (bound_round).
            async with scratch_database(f"bench_{tag}_copy_alone") as copy_alone_url:
                copied = await baseline.copy(copy_alone_url, sizes)
                captured = await capture.run(
                    api, vhosts["capture"], database_url, sizes, steady_rates, steady_seconds, output
                )
            pairs = [(copied["rows_per_s"], captured["drain"]["msg_per_s"])]
            for index in range(1, 1 if quick else BOUND_ROUNDS):
                pairs.append(await bound_round(api, f"{tag}_{index}", sizes, output))
            publisher = await baseline.publisher(vhosts["baseline"], sizes)
            java_publisher = await java_baseline.optional(
                java_baseline.publisher, vhosts["baseline"], sizes, java
            )
            replayed = await replay.run(vhosts["capture"], database_url, sizes, analyze, output)
            inboxed = await inbox.run(vhosts["baseline"], database_url, sizes, quick=quick)
            # A quarter of the messages per source and target: eight of them take turns (an eighth
            # with --quick, which stays under a minute).
            sourced = await sources.run(
                api,
                source_vhosts,
                database_url,
                Sizes(sizes.messages // (8 if quick else 4), sizes.body_size),
                output,
                rounds=sources.QUICK_ROUNDS if quick else sources.ROUNDS,
            )
        finally:
            for vhost in vhosts.values():
                try:
                    await api.delete(f"/api/vhosts/{esc(vhost)}")
                except httpx.HTTPError as error:
                    log.log(f"[red]could not delete vhost {vhost}: {error}")
            for name in (database, copy_database):
                try:
                    await admin_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
                    log.log(f"[red]could not drop database {name}: {error}")
    captured["drain"]["ratio"] = captured["drain"]["msg_per_s"] / consumer["msg_per_s"]
    captured["drain"]["copy_ratio"] = captured["drain"]["msg_per_s"] / copied["rows_per_s"]
    captured["drain"]["together_ratio"] = captured["drain"]["msg_per_s"] / together["msg_per_s"]
    lesser = [min(consumer["msg_per_s"], copy_rate) for copy_rate, _ in pairs]
    captured["drain"]["bound_rounds"] = [
        {"copy_rows_per_s": copy_rate, "drain_msg_per_s": drain_rate, "bound_ratio": drain_rate / bound}
        for (copy_rate, drain_rate), bound in zip(pairs, lesser, strict=True)
    ]
    captured["drain"]["bound_ratio"] = statistics.median(
        pair["bound_ratio"] for pair in captured["drain"]["bound_rounds"]
    )
    for load, broker in zip(captured["steady"], broker_latency, strict=True):
        load["broker_latency"] = broker
    replayed["ratio"] = replayed["publishing_msg_per_s"] / publisher["msg_per_s"]
    replayed["incl_startup_ratio"] = replayed["incl_startup_msg_per_s"] / publisher["msg_per_s"]
    captured["drain"]["java_ratio"] = java_ratio(captured["drain"]["msg_per_s"], java_consumer)
    replayed["java_ratio"] = java_ratio(replayed["publishing_msg_per_s"], java_publisher)
    return {
        "baseline": {
            "consumer": consumer,
            "copy": copied,
            "consumer_and_copy": together,
            "publisher": publisher,
            "java_consumer": java_consumer,
            "java_publisher": java_publisher,
        },
        "capture": captured,
        "replay": replayed,
        "inbox": inboxed,
        "sources": sourced,
    }


async def bound_round(
    api: httpx.AsyncClient, tag: str, sizes: Sizes, output: IO[bytes]
) -> tuple[float, float]:
    """One more COPY baseline and, right after it, one more capture drain: (COPY rows/s, drain msg/s).

    Each writes into a database created for it (the pair at the same moment), as the first pair
    does: this machine's disk writes blocks never written before at a fifth of the speed of blocks
    freed a moment ago (README, Performance), and a new database's files land wherever the file
    system puts a new directory. Which of the two a phase gets moves its rate by up to a third, so
    the drain's share of the COPY is the median of pairs rather than of one pair.
    """
    async with (
        scratch_vhost(api, f"bench-{tag}-bound") as vhost,
        scratch_database(f"bench_{tag}_bound_copy") as copy_url,
        scratch_database(f"bench_{tag}_bound") as database_url,
    ):
        copied = await baseline.copy(copy_url, sizes)
        drained = await capture.drain_alone(api, vhost, database_url, sizes, output)
    return copied["rows_per_s"], drained["msg_per_s"]


def latency_summary(latencies: list[float]) -> dict[str, float]:
    """p50, p99 and max of latencies in ms."""
    return {
        "latency_p50_ms": capture.percentile(latencies, 0.5),
        "latency_p99_ms": capture.percentile(latencies, 0.99),
        "latency_max_ms": max(latencies),
    }


def steady_rates_for(body_size: int, rate: float | None) -> tuple[float, ...]:
    """The steady loads' rates: --steady-rate alone, or STEADY_RATES capped at STEADY_BYTES_PER_S."""
    if rate is not None:
        return (rate,)
    capped = (min(r, STEADY_BYTES_PER_S / max(body_size, 1)) for r in STEADY_RATES)
    return tuple(dict.fromkeys(round(r) for r in capped))


def java_ratio(rate: float, java: dict[str, Any] | None) -> float | None:
    """A rate ÷ the Java baseline's, None without it."""
    return rate / java["msg_per_s"] if java else None


def steady_rows(loads: list[dict[str, Any]]) -> list[tuple[str, str, str, str]]:
    """Per steady load: its rate, latency publish → committed against the broker's own, the target."""
    rows = []
    for load in loads:
        rate, broker = round(load["rate_msg_per_s"]), load["broker_latency"]
        target = P99_TARGETS_MS.get(rate)
        rows += [
            ("", f"steady load msg/s x s (achieved {load['achieved_msg_per_s']:,.0f})",
             f"{rate:,} x {load['seconds']:.0f}", f"mean batch {load['mean_batch']:.1f}"),
            ("", "latency p50 / p99 / max ms, publish → committed",
             f"{load['latency_p50_ms']:.1f} / {load['latency_p99_ms']:.1f} / {load['latency_max_ms']:.1f}",
             f"p99 ≤ {target}: {verdict(load['latency_p99_ms'] <= target)}" if target else ""),
            ("", "broker alone: publish → delivered p50 / p99 ms",
             f"{broker['latency_p50_ms']:.1f} / {broker['latency_p99_ms']:.1f}", ""),
        ]  # fmt: skip
    return rows


def bound_pairs(drain: dict[str, Any]) -> str:
    """Each round's COPY baseline and the drain right after it."""
    return ", ".join(
        f"{pair['copy_rows_per_s']:,.0f} → {pair['drain_msg_per_s']:,.0f}" for pair in drain["bound_rounds"]
    )


def java_cell(value: float | None, form: str) -> str:
    """A Java baseline's value for the table, n/a when it was not measured."""
    return "n/a" if value is None else format(value, form)


def verdict(met: bool) -> str:
    """A target's outcome for the table."""
    return "[green]met" if met else "[red]missed"


def yes_no(flag: bool) -> str:
    """A flag for the table."""
    return "yes" if flag else "no"


def source_rows(sourced: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """The sources phase's rows: the publisher's rate per target, beside each SOURCE and without a daemon."""
    rows = [
        (
            "sources",
            f"publisher msg/s ({sourced['messages_per_cell']:,} msgs x {sourced['rounds']} rounds, "
            f"{sourced['in_flight']:,} in flight)",
            "",
            "",
        )
    ]
    for source in sources.SOURCES:
        for target in sources.TARGETS:
            cell = sourced[source][target]
            to = "to exchange" if target == "exchange" else "to default exchange"
            if source == "none":
                rows.append(("", f"no daemon, {to}", f"{cell['msg_per_s']:,.0f}", ""))
            else:
                captured = "" if cell["captured"] else ", not captured"
                rows.append(
                    (
                        "",
                        f"SOURCE={source}, {to}{captured} (÷ none)",
                        f"{cell['msg_per_s']:,.0f} ({cell['ratio']:.2f})",
                        "",
                    )
                )
    return rows


def show(result: dict[str, Any]) -> None:
    """Print the results as one table: phase, measure, value, target."""
    consumer, publisher = result["baseline"]["consumer"], result["baseline"]["publisher"]
    drain, loads, replayed = result["capture"]["drain"], result["capture"]["steady"], result["replay"]
    copied = result["baseline"]["copy"]
    inboxed, sourced = result["inbox"], result["sources"]
    java_consumer, java_publisher = result["baseline"]["java_consumer"], result["baseline"]["java_publisher"]
    table = Table(
        title=f"rabbit-archive benchmark: {result['messages']:,} messages of {result['body_size']:,} bytes, "
        f"commit {result['commit']}{' (dirty)' if result['dirty'] else ''}"
    )
    for header in ("phase", "measure", "value", "target"):
        table.add_column(header, justify="right" if header == "value" else "left")
    rows = [
        ("baseline", "consumer drain msg/s", f"{consumer['msg_per_s']:,.0f}", ""),
        ("", "java consumer, msg/s (the physical limit)",
         java_cell(java_consumer["msg_per_s"] if java_consumer else None, ",.0f"), ""),
        ("", f"publisher msg/s ({publisher['in_flight']} confirms in flight)",
         f"{publisher['msg_per_s']:,.0f}", ""),
        ("", "java publisher, msg/s (as many in flight)",
         java_cell(java_publisher["msg_per_s"] if java_publisher else None, ",.0f"), ""),
        ("capture", "drain msg/s (first→last row)", f"{drain['msg_per_s']:,.0f}", ""),
        ("", "drain ÷ baseline consumer", f"{drain['ratio']:.2f}",
         f"≥ {DRAIN_RATIO_TARGET}: {verdict(drain['ratio'] >= DRAIN_RATIO_TARGET)}"),
        ("", "drain ÷ java consumer", java_cell(drain["java_ratio"], ".2f"), ""),
        ("", f"raw COPY of the same rows, rows/s ({copied['rows_per_transaction']:,} a transaction)",
         f"{copied['rows_per_s']:,.0f}", ""),
        ("", "raw COPY → drain, rows/s → msg/s, by round", bound_pairs(drain), ""),
        ("", f"drain ÷ lesser of consumer and COPY (median of {len(drain['bound_rounds'])})",
         f"{drain['bound_ratio']:.2f}",
         f"≥ {BOUND_RATIO_TARGET}: {verdict(drain['bound_ratio'] >= BOUND_RATIO_TARGET)}"),
        ("", "consumer and COPY at once, one process, msg/s",
         f"{result['baseline']['consumer_and_copy']['msg_per_s']:,.0f}", ""),
        ("", "drain ÷ consumer and COPY at once", f"{drain['together_ratio']:.2f}", ""),
        ("", "sizing: msg per daemon CPU second", f"{drain['msg_per_cpu_second']:,.0f}", ""),
        ("", "sizing: table / index / WAL bytes per msg",
         f"{drain['table_bytes_per_msg']:,.0f} / {drain['index_bytes_per_msg']:,.0f} / "
         f"{drain['wal_bytes_per_msg']:,.0f}", ""),
        ("", "drain incl. start-up (s)", f"{drain['incl_startup_s']:.2f}", ""),
        ("", "peak RSS MB (drain)", f"{drain['peak_rss_mb']:.1f}",
         f"< {RSS_TARGET_MB} (for 200k msgs): {verdict(drain['peak_rss_mb'] < RSS_TARGET_MB)}"),
        ("", "CPU s / 10k msgs (drain)", f"{drain['cpu_s_per_10k_msgs']:.2f}", ""),
        *steady_rows(loads),
        ("replay", "wall time s (whole command)", f"{replayed['wall_s']:.2f}", ""),
        ("", "msg/s incl. start-up", f"{replayed['incl_startup_msg_per_s']:,.0f}", ""),
        ("", "msg/s publishing only (history span)", f"{replayed['publishing_msg_per_s']:,.0f}", ""),
        ("", "publishing only ÷ baseline publisher", f"{replayed['ratio']:.2f}",
         f"≥ {REPLAY_RATIO_TARGET}: {verdict(replayed['ratio'] >= REPLAY_RATIO_TARGET)}"),
        ("", "publishing only ÷ java publisher", java_cell(replayed["java_ratio"], ".2f"), ""),
        ("", "incl. start-up ÷ baseline publisher", f"{replayed['incl_startup_ratio']:.2f}", ""),
        ("", "peak RSS MB", f"{replayed['peak_rss_mb']:.1f}", ""),
        ("", "CPU s / 10k msgs", f"{replayed['cpu_s_per_10k_msgs']:.2f}", ""),
        ("", "archive analyzed by PostgreSQL (before / after)",
         f"{yes_no(replayed['archive_analyzed_before'])} / {yes_no(replayed['archive_analyzed_after'])}", ""),
        ("inbox", f"consumer + INSERT, msg/s ({inboxed['messages']:,} msgs in {inboxed['rounds']} rounds)",
         f"{inboxed['plain_msg_per_s']:,.0f}", ""),
        ("", "the same with rabbit_archive.inbox, msg/s", f"{inboxed['inbox_msg_per_s']:,.0f}", ""),
        ("", "inbox ÷ without", f"{inboxed['ratio']:.2f}",
         f"≥ {INBOX_RATIO_TARGET}: {verdict(inboxed['ratio'] >= INBOX_RATIO_TARGET)}"),
        ("", "inbox ÷ without, median of rounds", f"{inboxed['ratio_median_of_rounds']:.2f}", ""),
        ("", "inbox with digest keys ÷ without", f"{inboxed['digest_ratio']:.2f}", ""),
        *source_rows(sourced),
    ]  # fmt: skip
    for row in rows:
        table.add_row(*row)
    console = Console()
    console.width = max(console.width, 110)  # a pipe's default 80 columns would cut the rows
    console.print(table)


def main() -> None:
    """Parse options, run the benchmark once, print the table and write the JSON."""
    started = time.perf_counter()
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_MESSAGES} messages, 2 s steady loads")
    parser.add_argument("--messages", type=int, help=f"messages per phase (default {DEFAULT_MESSAGES})")
    parser.add_argument("--body-size", type=int, default=512, help="body bytes per message (default 512)")
    parser.add_argument(
        "--steady-rate",
        type=float,
        help=f"one steady load at this msg/s (default: one at each of {STEADY_RATES}, capped at 32 MiB/s)",
    )
    parser.add_argument("--steady-seconds", type=float, help="steady load duration (default 10, quick 2)")
    parser.add_argument(
        "--analyze",
        action="store_true",
        help="ANALYZE the archive before the replay, as autovacuum would on a server where it is on",
    )
    parser.add_argument("--output", type=Path, default=Path("bench-results/bench.json"))
    args = parser.parse_args()
    count = args.messages or (QUICK_MESSAGES if args.quick else DEFAULT_MESSAGES)
    if count < 2 * baseline.ACK_EVERY:
        parser.error(f"--messages must be at least {2 * baseline.ACK_EVERY}")
    if args.body_size < 0:
        parser.error("--body-size must not be negative")
    sizes = Sizes(count, args.body_size)
    steady_rates = steady_rates_for(args.body_size, args.steady_rate)
    steady_seconds = args.steady_seconds or (2.0 if args.quick else 10.0)
    if min(steady_rates) * steady_seconds < 100:
        parser.error("the steady load needs at least 100 messages: raise --steady-rate or --steady-seconds")
    git = git_state()
    with tempfile.NamedTemporaryFile(prefix="bench-", suffix=".log") as output:
        try:
            measured = asyncio.run(
                measure(sizes, steady_rates, steady_seconds, args.analyze, args.quick, output)
            )
        except KeyboardInterrupt:
            log.log("interrupted (the vhosts and database it created are deleted unless reported above)")
            sys.exit(130)
    result = {
        **git,
        "messages": count,
        "body_size": args.body_size,
        "analyze": args.analyze,
        **measured,
        "total_s": time.perf_counter() - started,
    }
    show(result)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    log.log(f"total {result['total_s']:.1f} s; wrote {args.output}")
