"""README's performance table, from the JSON of `scripts/bench` runs: one column per run.

Run: .venv/bin/python -m bench.readme_table quick=bench-results/quick.json bench-results/100k.json ...
(a column's title is the run's options; `--quick`, which the JSON does not record, is named so).
Prints the Markdown table; the commit each run was measured at is in its JSON (and must be one).
"""

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

# The steady loads' nominal rates, one row each (a run with big bodies caps them in bytes).
STEADY_ROWS = (1000, 5000)


def column_title(run: dict[str, Any]) -> str:
    """The options the run was made with."""
    if run.get("title"):
        return f"`--{run['title']}`"
    options = f"--messages {run['messages']}"
    if run["body_size"] != 512:
        options += f" --body-size {run['body_size']}"
    return f"`{options}`"


def whole(value: float) -> str:
    return f"{value:,.0f}"


def latency(run: dict[str, Any], index: int) -> str:
    loads = run["capture"]["steady"]
    if index >= len(loads):
        return ""
    load = loads[index]
    broker = load["broker_latency"]
    text = (
        f"{load['latency_p50_ms']:.1f} / **{load['latency_p99_ms']:.1f}** "
        f"({broker['latency_p50_ms']:.1f} / {broker['latency_p99_ms']:.1f})"
    )
    rate = load["rate_msg_per_s"]
    return text if rate == STEADY_ROWS[index] else f"at {whole(rate)} msg/s: {text}"


def java(run: dict[str, Any], name: str) -> float | None:
    measured = run["baseline"].get(name)
    return None if not measured else measured["msg_per_s"]


def optional(value: float | None, shown: Callable[[float], str]) -> str:
    return "n/a" if value is None else shown(value)


def ratios(measured: dict[str, Any], keys: tuple[str, ...]) -> str:
    return " / ".join(optional(measured.get(key), lambda ratio: f"{ratio:.2f}") for key in keys)


def bound_rounds(run: dict[str, Any]) -> str:
    """Each pair of the COPY baseline and the drain measured right after it (older runs: none)."""
    pairs = run["capture"]["drain"].get("bound_rounds", [])
    return ", ".join(f"{whole(pair['copy_rows_per_s'])} → {whole(pair['drain_msg_per_s'])}" for pair in pairs)


def drain_costs(run: dict[str, Any]) -> str:
    drain = run["capture"]["drain"]
    return f"{drain['peak_rss_mb']:.0f} / {drain['cpu_s_per_10k_msgs']:.2f}"


def publishers(run: dict[str, Any]) -> str:
    plain = whole(run["baseline"]["publisher"]["msg_per_s"])
    return f"{plain} / {optional(java(run, 'java_publisher'), whole)}"


def replayed(run: dict[str, Any]) -> str:
    replay = run["replay"]
    return f"{whole(replay['publishing_msg_per_s'])} ({ratios(replay, ('ratio', 'java_ratio'))})"


ROWS: tuple[tuple[str, Callable[[dict[str, Any]], str]], ...] = (
    ("aio-pika consumer, msg/s", lambda run: whole(run["baseline"]["consumer"]["msg_per_s"])),
    ("Java consumer, msg/s", lambda run: optional(java(run, "java_consumer"), whole)),
    ("raw COPY of the same rows, rows/s", lambda run: whole(run["baseline"]["copy"]["rows_per_s"])),
    (
        "consumer and COPY at once in one process, msg/s",
        lambda run: whole(run["baseline"]["consumer_and_copy"]["msg_per_s"]),
    ),
    ("**capture drain**, msg/s", lambda run: whole(run["capture"]["drain"]["msg_per_s"])),
    ("raw COPY → capture drain right after it, by round", bound_rounds),
    (
        "÷ lesser of consumer and COPY (median of rounds) / ÷ both at once / ÷ Java",
        lambda run: ratios(run["capture"]["drain"], ("bound_ratio", "together_ratio", "java_ratio")),
    ),
    ("capture peak RSS, MB / CPU s per 10k msgs", drain_costs),
    ("**latency at 1,000 msg/s**, p50 / p99 ms (broker alone)", lambda run: latency(run, 0)),
    ("**latency at 5,000 msg/s**, p50 / p99 ms (broker alone)", lambda run: latency(run, 1)),
    ("aio-pika publisher / Java publisher, msg/s", publishers),
    ("**replay publishing**, msg/s (÷ aio-pika / ÷ Java)", replayed),
)


def table(runs: list[dict[str, Any]]) -> str:
    lines = [
        "| `scripts/bench` | " + " | ".join(column_title(run) for run in runs) + " |",
        "| --- |" + " ---: |" * len(runs),
    ]
    lines += [f"| {title} | " + " | ".join(cell(run) for run in runs) + " |" for title, cell in ROWS]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="scripts/bench --output files, or OPTION=FILE")
    runs = []
    for argument in parser.parse_args().runs:
        title, _, path = argument.rpartition("=")
        runs.append({**json.loads(Path(path).read_text()), "title": title})
    commits = {(run["commit"], run["dirty"]) for run in runs}
    if len(commits) != 1 or any(dirty for _, dirty in commits):
        sys.exit(f"bench.readme_table: the runs are of several commits or changed files: {sorted(commits)}")
    print(f"Measured at commit {runs[0]['commit']}.\n")
    print(table(runs))


if __name__ == "__main__":
    main()
