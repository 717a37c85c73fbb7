"""Benchmark the web console: how fast `rabbit-replay web` answers searches over a million-row archive.

A fresh database gets the archive's schema (`rabbit-capture migrate`) and N rows written by SQL
(the capture daemon is measured elsewhere; here only reading counts): ten exchanges, fifty routing
keys, a hundred tenants in a header, 512-byte JSON bodies, captured over three days up to now, in
daily partitions, then ANALYZEd (as autovacuum would). The console runs as a subprocess; each page is
fetched once cold and then `--repeat` times, timed from request to last byte. The database is
dropped at the end, whatever happens. Run: scripts/bench web (or python -m bench.web).
"""

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import asyncpg
import httpx
from rich.console import Console
from rich.table import Table

from bench.common import POSTGRES, admin_sql, free_port, log, peak_rss_mb
from rabbit_archive.archive import queries
from rabbit_archive.archive.amqp_codec import Properties, encode_properties

DEFAULT_ROWS = 1_000_000
DAYS = 3
EXCHANGES = (
    "orders",
    "payments",
    "audit",
    "shipping",
    "billing",
    "inventory",
    "users",
    "emails",
    "metrics",
    "search",
)
# Issue 19's target: the first page of a search.
FIRST_PAGE_TARGET_MS = 200
REPLAY = Path(sys.executable).parent / "rabbit-replay"
CAPTURE = Path(sys.executable).parent / "rabbit-capture"

# One row per generate_series value $1..$2, spread evenly over [$3, $3 + $4 seconds): ids rise with
# capture time, as the daemon writes them. The header table's bytes ($5) are the same for every row.
FILL = """
INSERT INTO rabbit_archive.messages (captured_at, vhost, exchange, routing_key, redelivered,
    properties_raw, properties, headers, message_id, correlation_id, body, body_size)
SELECT $3::timestamptz + make_interval(secs => i * $4::float8 / $6::bigint),
       '/',
       ($7::text[])[1 + i % 10],
       'eu.shop.' || (i % 50),
       false,
       $5::bytea,
       jsonb_build_object('message_id', 'm-' || i, 'content_type', 'application/json', 'delivery_mode', 2),
       jsonb_build_object('tenant', 't-' || (i % 100), 'attempt', i % 5),
       'm-' || i,
       'c-' || (i / 10),
       b.body,
       length(b.body)
FROM generate_series($1::bigint, $2::bigint) AS i,
     LATERAL (SELECT convert_to('{"order": ' || i || ', "customer": ' || (i % 997) || ', "pad": "'
                                || repeat('x', 440) || '"}', 'UTF8') AS body) AS b
"""


def searches(now: datetime) -> list[tuple[str, str | None]]:
    """(what, path) of the pages measured."""
    day_ago = now - timedelta(days=1)
    window = {"since": day_ago.isoformat(), "until": (day_ago + timedelta(hours=1)).isoformat()}
    return [
        ("search: no filter", "/"),
        ("search: one exchange", "/?exchange=orders"),
        ("search: exchange + header", "/?" + urlencode({"exchange": "orders", "header": "tenant=t-40"})),
        ("search: last 2 hours", "/?since=2h"),
        ("search: one hour a day ago, one exchange", "/?" + urlencode({"exchange": "payments", **window})),
        ("search: routing key pattern", "/?" + urlencode({"routing_key": "eu.shop.7"})),
        ("search: message id", "/?message_id=m-500000"),
        ("search: header only (1 in 100)", "/?" + urlencode({"header": "tenant=t-7"})),
        ("search: next page (after=)", None),  # filled in from the exchange search's next link
        ("search: body contains (1 in 997)", "/?" + urlencode({"body_contains": '"customer": 996,'})),
        # Nothing matches: the page walks every id window of the archive before it can say so.
        (
            "no match at all (the whole archive)",
            "/?" + urlencode({"exchange": "orders", "header": "tenant=t-42"}),
        ),
        ("message page", "/messages/500000"),
        ("chart data: one exchange, 3 days", "/traffic?exchange=orders"),
        ("chart data: everything, 3 days", "/traffic"),
        ("replay preview: exchange, last 2 hours", "/preview?exchange=orders&since=2h"),
    ]


def fetch(client: httpx.Client, path: str) -> tuple[float, httpx.Response]:
    """Milliseconds from request to the last byte, and the response."""
    started = time.perf_counter()
    response = client.get(path)
    return (time.perf_counter() - started) * 1000, response


def measure_page(client: httpx.Client, what: str, path: str, repeat: int) -> dict[str, Any]:
    """One cold fetch, then `repeat` more; timings in ms."""
    cold, response = fetch(client, path)
    times = [fetch(client, path)[0] for _ in range(repeat)]
    rows = response.text.count('<td class="num"><a href="/messages/')
    return {
        "what": what,
        "path": path,
        "status": response.status_code,
        "rows": rows if path.startswith("/?") or path == "/" else None,
        "cold_ms": cold,
        "median_ms": statistics.median(times),
        "p95_ms": sorted(times)[max(0, round(0.95 * len(times)) - 1)],
        "max_ms": max(times),
    }


async def fill(database_url: str, rows: int, batch: int) -> dict[str, Any]:
    """Write the rows in batches (one statement each), create the partitions, ANALYZE; returns timings."""
    now = datetime.now(UTC)
    start = now - timedelta(days=DAYS)
    properties_raw = encode_properties(
        Properties(
            content_type=b"application/json",
            delivery_mode=2,
            headers=[(b"tenant", ("S", b"t-42")), (b"attempt", ("I", 3))],
        )
    )
    connection = await asyncpg.connect(database_url)
    try:
        await connection.execute(queries.ENSURE_PARTITIONS, start.date(), DAYS + 2)
        started = time.perf_counter()
        for first in range(0, rows, batch):
            last = min(rows, first + batch) - 1
            await connection.execute(
                FILL, first, last, start, DAYS * 86400.0, properties_raw, rows, list(EXCHANGES)
            )
            log.log(f"  {last + 1:,} rows")
        filled = time.perf_counter() - started
        started = time.perf_counter()
        await connection.execute("ANALYZE rabbit_archive.messages")
        analyzed = time.perf_counter() - started
        size = await connection.fetchval("SELECT pg_size_pretty(pg_database_size(current_database()))")
    finally:
        await connection.close()
    return {"fill_s": filled, "analyze_s": analyzed, "database_size": size, "now": now}


def run(rows: int, repeat: int, batch: int) -> dict[str, Any]:
    """Create the database, fill it, serve it, measure, and drop the database again."""
    database = f"bench_web_{uuid.uuid4().hex[:10]}"
    database_url = f"{POSTGRES}/{database}"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("RABBIT_ARCHIVE_")},
        "RABBIT_ARCHIVE_DATABASE_URL": database_url,
        "RABBIT_ARCHIVE_LOG_FORMAT": "json",
    }
    asyncio.run(admin_sql(f'CREATE DATABASE "{database}"'))
    try:
        subprocess.run([str(CAPTURE), "migrate"], env=env, check=True, capture_output=True, timeout=120)
        log.log(f"filling {rows:,} rows")
        filled = asyncio.run(fill(database_url, rows, batch))
        port = free_port()
        with tempfile.NamedTemporaryFile(prefix="bench-web-", suffix=".log") as output:
            console = subprocess.Popen(
                [str(REPLAY), "web", "--port", str(port)], env=env, stdout=output, stderr=subprocess.STDOUT
            )
            try:
                pages = serve_and_measure(f"http://127.0.0.1:{port}", filled["now"], repeat, console)
                rss = peak_rss_mb(console.pid)
            finally:
                console.terminate()
                console.wait(15)
    finally:
        asyncio.run(admin_sql(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
    return {
        "rows": rows,
        "repeat": repeat,
        "fill_s": filled["fill_s"],
        "analyze_s": filled["analyze_s"],
        "database_size": filled["database_size"],
        "console_peak_rss_mb": rss,
        "pages": pages,
    }


def serve_and_measure(base: str, now: datetime, repeat: int, console: "subprocess.Popen[bytes]") -> list[Any]:
    """Wait for /healthz, then measure every page."""
    deadline = time.monotonic() + 60
    with httpx.Client(base_url=base, timeout=60) as client:
        while True:
            try:
                if client.get("/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if console.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("rabbit-replay web did not start")
            time.sleep(0.2)
        results = []
        next_page = None
        for what, path in searches(now):
            if path is None:
                if next_page is None:
                    continue
                path = next_page
            result = measure_page(client, what, path, repeat)
            results.append(result)
            if what == "search: one exchange":
                _, response = fetch(client, path)
                marker = 'id="next-page" href="'
                if marker in response.text:
                    next_page = response.text.split(marker, 1)[1].split('"', 1)[0].replace("&amp;", "&")
        return results


def show(result: dict[str, Any]) -> None:
    """The table: page, rows, cold, median, p95, max, and the target for the first page of a search."""
    table = Table(
        title=f"rabbit-replay web over {result['rows']:,} archived messages ({result['database_size']}), "
        f"{result['repeat']} fetches each after a cold one"
    )
    for header in ("page", "rows", "cold ms", "median ms", "p95 ms", "max ms", "target"):
        table.add_column(header, justify="left" if header in ("page", "target") else "right")
    for page in result["pages"]:
        target = ""
        if page["what"].startswith("search"):
            met = page["median_ms"] < FIRST_PAGE_TARGET_MS
            target = f"< {FIRST_PAGE_TARGET_MS}: {'[green]met' if met else '[red]missed'}"
        table.add_row(
            page["what"] + ("" if page["status"] == 200 else f" (HTTP {page['status']})"),
            "" if page["rows"] is None else str(page["rows"]),
            f"{page['cold_ms']:.0f}",
            f"{page['median_ms']:.1f}",
            f"{page['p95_ms']:.1f}",
            f"{page['max_ms']:.1f}",
            target,
        )
    console = Console()
    console.width = max(console.width, 110)
    console.print(table)
    console.print(
        f"fill {result['fill_s']:.1f} s, ANALYZE {result['analyze_s']:.1f} s, "
        f"console peak RSS {result['console_peak_rss_mb']:.0f} MB"
    )


def main() -> None:
    """Parse options, run once, print the table, write the JSON."""
    parser = argparse.ArgumentParser(prog="scripts/bench web", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rows", type=int, default=DEFAULT_ROWS, help=f"archived messages (default {DEFAULT_ROWS:,})"
    )
    parser.add_argument(
        "--repeat", type=int, default=20, help="fetches of each page after the cold one (default 20)"
    )
    parser.add_argument("--batch", type=int, default=100_000, help="rows per INSERT statement")
    parser.add_argument("--output", type=Path, default=Path("bench-results/web.json"))
    args = parser.parse_args()
    if args.rows < 1000 or args.repeat < 1:
        parser.error("--rows must be at least 1000 and --repeat at least 1")
    result = run(args.rows, args.repeat, args.batch)
    show(result)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2, default=str) + "\n")
    log.log(f"wrote {args.output}")


if __name__ == "__main__":
    main()
