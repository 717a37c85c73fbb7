"""The installed `rabbit-capture`: one-line errors and exit codes, status, migrate, bindings kept in step."""

import json
import os
import subprocess
import time
from collections.abc import Callable
from typing import Any

import pika
import pytest

from rabbit_archive.archive.amqp_codec import decode_properties
from rabbit_archive.archive.migrate import latest_version
from tests.conftest import run_sql
from tests.support.daemon import CaptureProcess, command, wait_for

pytestmark = pytest.mark.acceptance


def capture_command(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run `rabbit-capture ARGS` with only the given RABBIT_ARCHIVE_* variables."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RABBIT_ARCHIVE_")}
    return subprocess.run(
        [command("rabbit-capture"), *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int, *fragments: str) -> None:
    """Exit code as given, one line on stderr containing the fragments, no traceback."""
    assert result.returncode == code, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    error_lines = [line for line in lines if line.startswith("rabbit-capture: error:")]
    assert len(error_lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in error_lines[0]


def test_bad_setting_is_one_line_naming_the_variable_exit_2(capture_env: dict[str, str]) -> None:
    result = capture_command({**capture_env, "RABBIT_ARCHIVE_PREFETCH": "lots"}, "run")
    assert_one_line_error(result, 2, "RABBIT_ARCHIVE_PREFETCH")


def test_url_with_password_is_masked_in_errors(capture_env: dict[str, str]) -> None:
    result = capture_command({**capture_env, "RABBIT_ARCHIVE_AMQP_URL": "http://u:hunter2@x/"}, "run")
    assert_one_line_error(result, 2, "RABBIT_ARCHIVE_AMQP_URL")
    assert "hunter2" not in result.stderr + result.stdout


def test_existing_queue_with_other_arguments_is_one_line_exit_2(
    capture_env: dict[str, str], pika_channel: Any
) -> None:
    pika_channel.queue_declare("rabbit-archive", durable=True, arguments={"x-queue-type": "classic"})
    result = capture_command(capture_env, "run", timeout=60)
    assert_one_line_error(result, 2, "rabbit-archive", "RABBIT_ARCHIVE_QUEUE")


def test_firehose_source_captures_the_default_exchange_and_restores_tracing(
    start_capture: Callable[..., CaptureProcess],
    pika_channel: Any,
    database_url: str,
    management: Any,
    vhost: str,
) -> None:
    def tracing() -> bool:
        return bool(management.get(f"/api/vhosts/{vhost}").json().get("tracing"))

    assert not tracing()
    daemon = start_capture(source="firehose")
    wait_for(tracing, 15, what="tracing switched on")
    pika_channel.queue_declare("direct-inbox", durable=True)
    # Straight into a queue through the default exchange: no binding could see this one.
    pika_channel.basic_publish(
        "",
        "direct-inbox",
        b"via the default exchange",
        pika.BasicProperties(message_id="fh-1", headers={"n": 1, "big": 2**40}, content_type="text/plain"),
    )
    wait_for(
        lambda: run_sql(database_url, "SELECT count(*) FROM rabbit_archive.messages")[0][0] == 1,
        15,
        what="the traced message stored",
    )
    row = run_sql(
        database_url,
        "SELECT exchange, routing_key, body, message_id, properties_raw FROM rabbit_archive.messages",
    )[0]
    assert (row["exchange"], row["routing_key"], row["body"], row["message_id"]) == (
        "",
        "direct-inbox",
        b"via the default exchange",
        "fh-1",
    )
    props = decode_properties(row["properties_raw"])
    assert props.content_type == b"text/plain"
    assert props.headers == [(b"n", ("I", 1)), (b"big", ("l", 2**40))]  # as pika encoded them
    assert daemon.stop() == 0
    assert not tracing()


def test_bindings_plus_default_captures_default_exchange_publishes_once_beside_bound_exchanges(
    start_capture: Callable[..., CaptureProcess],
    pika_channel: Any,
    database_url: str,
    management: Any,
    vhost: str,
) -> None:
    """Task frameworks publish through the default exchange: only the tracer sees those."""

    def tracing() -> bool:
        return bool(management.get(f"/api/vhosts/{vhost}").json().get("tracing"))

    pika_channel.exchange_declare("orders", "topic")
    pika_channel.queue_declare("orders-consumer")
    pika_channel.queue_bind("orders-consumer", "orders", "#")
    pika_channel.queue_declare("celery")
    daemon = start_capture(source="bindings+default")
    wait_for(tracing, 15, what="tracing switched on")
    daemon.wait_bound("orders")
    daemon.wait_bound("amq.rabbitmq.trace")
    for n in range(5):
        pika_channel.basic_publish(
            "", "celery", f"task {n}".encode(), pika.BasicProperties(message_id=f"t-{n}")
        )
        pika_channel.basic_publish(
            "orders", "eu.created", f"order {n}".encode(), pika.BasicProperties(message_id=f"o-{n}")
        )
    # Consuming makes the tracer publish deliver.<queue> copies: they must not be stored.
    for queue in ("celery", "orders-consumer"):
        for _ in range(5):
            method, _, _ = pika_channel.basic_get(queue, auto_ack=True)
            assert method is not None
    wait_for(
        lambda: run_sql(database_url, "SELECT count(*) FROM rabbit_archive.messages")[0][0] >= 10,
        15,
        what="ten messages stored",
    )
    time.sleep(1)
    rows = run_sql(
        database_url,
        "SELECT exchange, routing_key, message_id FROM rabbit_archive.messages ORDER BY message_id",
    )
    assert [(row[0], row[1], row[2]) for row in rows] == [
        *[("orders", "eu.created", f"o-{n}") for n in range(5)],
        *[("", "celery", f"t-{n}") for n in range(5)],
    ]
    assert daemon.stop() == 0
    assert not tracing()


def test_unreachable_database_makes_status_exit_1_in_one_line(capture_env: dict[str, str]) -> None:
    env = {**capture_env, "RABBIT_ARCHIVE_DATABASE_URL": "postgresql://root:pw@127.0.0.1:1/none"}
    result = capture_command(env, "status")
    assert_one_line_error(result, 1, "PostgreSQL")
    assert "pw@" not in result.stderr


def test_migrate_creates_the_database_and_is_idempotent(
    capture_env: dict[str, str], database_url: str
) -> None:
    first = capture_command(capture_env, "migrate")
    assert first.returncode == 0, first.stderr
    assert f"applied migrations {list(range(1, latest_version() + 1))}" in first.stdout
    second = capture_command(capture_env, "migrate")
    assert second.returncode == 0, second.stderr
    assert "up to date" in second.stdout
    assert (
        run_sql(database_url, "SELECT max(version) FROM rabbit_archive.schema_migrations")[0][0]
        == latest_version()
    )


def test_status_json_reports_bindings_skips_and_counts(
    start_capture: Callable[..., CaptureProcess],
    capture_env: dict[str, str],
    pika_channel: Any,
    database_url: str,
) -> None:
    channel = pika_channel
    channel.exchange_declare("events", "topic")
    channel.exchange_declare("jobs", "x-consistent-hash")
    channel.exchange_declare("private.logs", "fanout")
    daemon = start_capture(exclude="private.*")
    daemon.wait_bound("events")
    for index in range(3):
        channel.basic_publish("events", "a.b", b"x", pika.BasicProperties(message_id=str(index)))
    wait_for(
        lambda: run_sql(database_url, "SELECT count(*) FROM rabbit_archive.messages")[0][0] == 3,
        10,
        what="3 rows",
    )
    result = capture_command({**capture_env, "RABBIT_ARCHIVE_EXCLUDE": "private.*"}, "status", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    bound = {item["exchange"]: item for item in report["exchanges"]}
    assert bound["events"]["bindings"] == [{"routing_key": "#", "arguments": {}}]
    assert bound["events"]["type"] == "topic"
    assert "jobs" not in bound
    assert "private.logs" not in bound
    skipped = {item["exchange"]: item["reason"] for item in report["skipped"]}
    assert "one queue" in skipped["jobs"]
    assert "EXCLUDE" in skipped["private.logs"]
    assert report["rows"] == 3
    assert report["schema_version"] == latest_version()
    assert report["newest_captured_at"] is not None
    assert report["queue_depth"] >= 0
    assert set(report) >= {
        "exchanges",
        "skipped",
        "queue_depth",
        "rows",
        "newest_captured_at",
        "schema_version",
    }
    assert report["capturing"] is True
    recent = {item["exchange"]: item for item in report["stored_by_exchange"]}
    assert (recent["events"]["rows_last_hour"], recent["events"]["bytes_last_hour"]) == (3, 3)
    assert (recent["events"]["rows_last_day"], recent["events"]["bytes_last_day"]) == (3, 3)
    # As a probe: with the daemon stopped, status says so and exits 1.
    assert daemon.stop() == 0
    stopped = capture_command({**capture_env, "RABBIT_ARCHIVE_EXCLUDE": "private.*"}, "status", "--json")
    assert stopped.returncode == 1
    assert json.loads(stopped.stdout)["capturing"] is False
    assert "not running" in stopped.stderr


def test_direct_bindings_follow_other_queues_and_are_removed_when_they_go(
    start_capture: Callable[..., CaptureProcess], pika_channel: Any, management: Any, vhost: str
) -> None:
    channel = pika_channel
    channel.exchange_declare("payments", "direct")
    channel.queue_declare("ledger")
    channel.queue_bind("ledger", "payments", "settled")

    def archive_keys() -> set[str]:
        bindings = management.get(f"/api/exchanges/{vhost}/payments/bindings/source").json()
        return {b["routing_key"] for b in bindings if b["destination"] == "rabbit-archive"}

    start_capture()
    wait_for(lambda: archive_keys() == {"settled"}, 10, what="archive bound to 'settled'")
    channel.queue_bind("ledger", "payments", "refunded")
    wait_for(lambda: archive_keys() == {"settled", "refunded"}, 5, what="new key mirrored")
    channel.queue_unbind("ledger", "payments", "settled")
    wait_for(lambda: archive_keys() == {"refunded"}, 5, what="stale key unbound")


def test_alternate_exchange_keeps_receiving_unroutable_messages(
    start_capture: Callable[..., CaptureProcess], pika_channel: Any, database_url: str, vhost: str
) -> None:
    channel = pika_channel
    channel.exchange_declare("unrouted", "fanout")
    channel.queue_declare("unrouted-inbox")
    channel.queue_bind("unrouted-inbox", "unrouted")
    channel.exchange_declare("orders", "topic", arguments={"alternate-exchange": "unrouted"})
    channel.queue_declare("eu-orders")
    channel.queue_bind("eu-orders", "orders", "eu.#")
    daemon = start_capture()
    daemon.wait_bound("orders")
    channel.basic_publish("orders", "eu.created", b"routable", pika.BasicProperties(message_id="r"))
    channel.basic_publish("orders", "us.created", b"unroutable", pika.BasicProperties(message_id="u"))
    time.sleep(0.5)
    # The archive mirrored 'eu.#' on orders instead of '#': the US order still went to the
    # alternate exchange's queue, as it did before the archive existed.
    assert channel.queue_declare("unrouted-inbox", passive=True).method.message_count == 1
    wait_for(
        lambda: (
            {r[0] for r in run_sql(database_url, "SELECT message_id FROM rabbit_archive.messages")}
            >= {"r", "u"}
        ),
        10,
        what="both captured (the unroutable one through the alternate exchange's fanout)",
    )


def test_metrics_count_stored_messages_per_exchange(
    start_capture: Callable[..., CaptureProcess], pika_channel: Any
) -> None:
    pika_channel.exchange_declare("metered", "fanout")
    daemon = start_capture()
    daemon.wait_bound("metered")
    for _ in range(4):
        pika_channel.basic_publish("metered", "", b"12345")
    expected = 'rabbit_archive_messages_stored_total{exchange="metered",vhost='
    wait_for(lambda: expected in daemon.metrics(), 10, what="stored metric")
    line = next(line for line in daemon.metrics().splitlines() if line.startswith(expected))
    assert line.endswith(" 4.0")
    bytes_line = next(
        line
        for line in daemon.metrics().splitlines()
        if line.startswith('rabbit_archive_bytes_stored_total{exchange="metered"')
    )
    assert bytes_line.endswith(" 20.0")


def test_prune_drops_whole_days_older_than_asked_and_keeps_the_rest(
    capture_env: dict[str, str], database_url: str
) -> None:
    assert capture_command(capture_env, "migrate").returncode == 0
    run_sql(database_url, "SELECT rabbit_archive.ensure_partitions(current_date - 10, 11)")
    insert = """
        INSERT INTO rabbit_archive.messages
            (captured_at, vhost, exchange, routing_key, redelivered,
             properties_raw, properties, body, body_size)
        VALUES (now() - $1::text::interval, '/', 'ex', 'rk', false, '\\x0000', '{}', 'b', 1)
    """
    for age in ("9 days", "6 days", "1 hour"):
        run_sql(database_url, insert, age)
    refused = capture_command(capture_env, "prune", "--older-than", "5d")
    assert_one_line_error(refused, 2, "--yes")
    result = capture_command(capture_env, "prune", "--older-than", "5d", "--yes")
    assert result.returncode == 0, result.stderr
    remaining = run_sql(
        database_url,
        "SELECT count(*) FROM rabbit_archive.messages WHERE captured_at < now() - interval '5 days'",
    )[0][0]
    assert remaining == 0
    assert run_sql(database_url, "SELECT count(*) FROM rabbit_archive.messages")[0][0] == 1
    partitions = {
        row[0]
        for row in run_sql(
            database_url,
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = 'rabbit_archive.messages'::regclass",
        )
    }
    assert "messages_default" in partitions
    assert len(partitions) == 1 + 6  # today and the five days before it, plus the default


def test_prune_rejects_an_unparseable_age(capture_env: dict[str, str]) -> None:
    assert_one_line_error(
        capture_command(capture_env, "prune", "--older-than", "soon", "--yes"), 2, "--older-than"
    )


def test_capture_recovers_when_the_archive_queue_is_deleted(
    start_capture: Callable[..., CaptureProcess],
    pika_channel: Any,
    database_url: str,
    management: Any,
    vhost: str,
) -> None:
    pika_channel.exchange_declare("resilient", "fanout")
    daemon = start_capture()
    daemon.wait_bound("resilient")
    # The broker cancels the consumer; the daemon must notice, redeclare, rebind and go on.
    management.delete(f"/api/queues/{vhost}/rabbit-archive").raise_for_status()
    wait_for(lambda: "cancelled the consumer" in daemon.log(), 10, what="cancellation noticed")

    def captured() -> bool:
        pika_channel.basic_publish("resilient", "", b"after", pika.BasicProperties(message_id="after"))
        rows = run_sql(
            database_url, "SELECT count(*) FROM rabbit_archive.messages WHERE message_id = 'after'"
        )
        return bool(rows[0][0])

    wait_for(captured, 20, interval=0.5, what="capture after the queue came back")


def test_no_password_appears_in_logs_status_metrics_or_replay_output(
    start_capture: Callable[..., CaptureProcess],
    capture_env: dict[str, str],
    pika_channel: Any,
    database_url: str,
    services: Any,
) -> None:
    # The same secret in every URL: the broker's and the management API's password.
    secret = "guest"
    assert f":{secret}@" in capture_env["RABBIT_ARCHIVE_AMQP_URL"]
    env = {
        **capture_env,
        "RABBIT_ARCHIVE_MANAGEMENT_URL": services.management_url.replace("://", f"://guest:{secret}@"),
    }
    daemon = start_capture(management_url=env["RABBIT_ARCHIVE_MANAGEMENT_URL"], log_level="DEBUG")
    pika_channel.exchange_declare("secret-test", "fanout", durable=True)
    daemon.wait_bound("secret-test")
    pika_channel.basic_publish("secret-test", "", b"x")
    wait_for(lambda: run_sql(database_url, "SELECT count(*) FROM rabbit_archive.messages")[0][0] == 1, 30)
    outputs = [daemon.log(), daemon.metrics()]
    for args in (("status",), ("status", "--json")):
        result = capture_command(env, *args)
        outputs += [result.stdout, result.stderr]
    replay = subprocess.run(
        [command("rabbit-replay"), "find", "--json"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    outputs += [replay.stdout, replay.stderr]
    daemon.stop()
    outputs.append(daemon.log())
    for output in outputs:
        assert f":{secret}@" not in output
        assert f"guest:{secret}" not in output
