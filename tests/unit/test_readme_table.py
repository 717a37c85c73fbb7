"""bench.readme_table: README's performance table from scripts/bench's JSON."""

from typing import Any

from bench.readme_table import column_title, table


def run(
    body_size: int = 512, *, java: bool = True, steady_rates: tuple[int, ...] = (1000, 5000)
) -> dict[str, Any]:
    """The parts of a scripts/bench JSON the table reads."""
    steady = [
        {
            "rate_msg_per_s": rate,
            "latency_p50_ms": 3.84,
            "latency_p99_ms": 8.61,
            "broker_latency": {"latency_p50_ms": 1.0, "latency_p99_ms": 2.6},
        }
        for rate in steady_rates
    ]
    return {
        "messages": 100000,
        "body_size": body_size,
        "baseline": {
            "consumer": {"msg_per_s": 12494.4},
            "copy": {"rows_per_s": 67014.2},
            "consumer_and_copy": {"msg_per_s": 8888.0},
            "publisher": {"msg_per_s": 4517.0},
            "java_consumer": {"msg_per_s": 82572.0} if java else None,
            "java_publisher": {"msg_per_s": 23747.0} if java else None,
        },
        "capture": {
            "drain": {
                "msg_per_s": 38112.0,
                "ratio": 3.05,  # ÷ the consumer; the table shows ÷ the lesser baseline
                "bound_ratio": 0.57,
                "bound_rounds": [
                    {"copy_rows_per_s": 67014.2, "drain_msg_per_s": 38112.0},
                    {"copy_rows_per_s": 70100.4, "drain_msg_per_s": 36999.6},
                ],
                "together_ratio": 4.288,
                "java_ratio": 0.4615 if java else None,
                "peak_rss_mb": 75.2,
                "cpu_s_per_10k_msgs": 0.214,
            },
            "steady": steady,
        },
        "replay": {"publishing_msg_per_s": 14623.0, "ratio": 3.237, "java_ratio": 0.616 if java else None},
    }


def rows(markdown: str) -> dict[str, str]:
    """First cell -> the rest of the line, for the table's data lines."""
    cells = [line.strip("|").split(" | ", 1) for line in markdown.splitlines()[2:]]
    return {first.strip(): rest.strip(" |") for first, rest in cells}


def test_each_line_reads_its_figure_from_the_run() -> None:
    lines = rows(table([run()]))
    assert lines["aio-pika consumer, msg/s"] == "12,494"
    assert lines["Java consumer, msg/s"] == "82,572"
    assert lines["raw COPY of the same rows, rows/s"] == "67,014"
    assert lines["**capture drain**, msg/s"] == "38,112"
    assert lines["raw COPY → capture drain right after it, by round"] == "67,014 → 38,112, 70,100 → 37,000"
    assert lines["÷ lesser of consumer and COPY (median of rounds) / ÷ both at once / ÷ Java"] == (
        "0.57 / 4.29 / 0.46"
    )
    assert lines["capture peak RSS, MB / CPU s per 10k msgs"] == "75 / 0.21"
    assert lines["**latency at 1,000 msg/s**, p50 / p99 ms (broker alone)"] == "3.8 / **8.6** (1.0 / 2.6)"
    assert lines["aio-pika publisher / Java publisher, msg/s"] == "4,517 / 23,747"
    assert lines["**replay publishing**, msg/s (÷ aio-pika / ÷ Java)"] == "14,623 (3.24 / 0.62)"


def test_a_capped_load_says_its_rate_and_a_missing_one_is_empty() -> None:
    lines = rows(table([run(1048576, steady_rates=(32,))]))
    assert lines["**latency at 1,000 msg/s**, p50 / p99 ms (broker alone)"].startswith("at 32 msg/s: 3.8")
    assert lines["**latency at 5,000 msg/s**, p50 / p99 ms (broker alone)"] == ""


def test_without_java_its_figures_read_n_a() -> None:
    lines = rows(table([run(java=False)]))
    assert lines["Java consumer, msg/s"] == "n/a"
    assert lines["÷ lesser of consumer and COPY (median of rounds) / ÷ both at once / ÷ Java"] == (
        "0.57 / 4.29 / n/a"
    )


def test_columns_are_named_by_the_runs_options() -> None:
    assert column_title(run()) == "`--messages 100000`"
    assert column_title(run(16384)) == "`--messages 100000 --body-size 16384`"
    assert column_title({**run(), "title": "quick"}) == "`--quick`"
