"""`rabbit-capture check` against the real broker and database: every missing right in one run, with its fix.

The users, permissions and GRANTs are README.md's "Least privilege" ones (read from it), with
one right taken away at a time; the check must name it, say how to fix it, change nothing and
exit 1, and exit 0 on the documented setup.
"""

import json
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.acceptance.test_cli import capture_command
from tests.acceptance.test_least_privilege import (
    PASSWORD,
    blocks,
    capture_permissions,
    database_name,
    dropped_roles,
    rabbit_user,
    rabbitmqctl,
    set_permissions,
    sql_statements,
    with_user,
)
from tests.acceptance.test_replay import replay_command
from tests.conftest import run_sql
from tests.support.services import Services

pytestmark = pytest.mark.acceptance


@pytest.fixture
def exchanges(pika_channel: Any) -> list[str]:
    """Two exchanges to capture in the test's vhost."""
    pika_channel.exchange_declare("orders", "topic")
    pika_channel.exchange_declare("audit", "fanout")
    return ["audit", "orders"]


@pytest.fixture
def capture_role(services: Services, database_url: str) -> Iterator[str]:
    """A PostgreSQL role set up as README.md says (CREATE on an existing database); dropped afterwards."""
    role = f"check_{uuid.uuid4().hex[:8]}"
    database = database_name(database_url)
    capture_sql, _ = blocks("sql")
    with dropped_roles(services, database, role):
        for statement in sql_statements(capture_sql, {"rabbit_capture": role, "rabbit_archive": database}):
            run_sql(services.postgres_url, statement)
        yield role


def check(env: dict[str, str], *args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """Run `rabbit-capture check --json`; the process and its report."""
    result = capture_command(env, "check", "--json", *args)
    assert "Traceback" not in result.stderr
    assert PASSWORD not in result.stdout + result.stderr
    return result, json.loads(result.stdout)


def problems(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The failed findings."""
    return [finding for finding in report["findings"] if finding["status"] == "fail"]


def env_for(capture_env: dict[str, str], user: str, role: str | None = None, **extra: str) -> dict[str, str]:
    """The test's capture environment as broker user `user` (and database role `role`)."""
    env = {**capture_env, "RABBIT_ARCHIVE_AMQP_URL": with_user(capture_env["RABBIT_ARCHIVE_AMQP_URL"], user)}
    if role is not None:
        env["RABBIT_ARCHIVE_DATABASE_URL"] = with_user(env["RABBIT_ARCHIVE_DATABASE_URL"], role)
    env.update({f"RABBIT_ARCHIVE_{key.upper()}": value for key, value in extra.items()})
    return env


def queues(management: httpx.Client, vhost: str) -> list[str]:
    """Names of the vhost's queues (the check must declare none)."""
    return sorted(item["name"] for item in management.get(f"/api/queues/{vhost}").json())


def test_the_documented_setup_passes_and_changes_nothing(
    management: httpx.Client,
    vhost: str,
    capture_env: dict[str, str],
    exchanges: list[str],
    capture_role: str,
) -> None:
    permissions, tags = capture_permissions()
    with rabbit_user(management, vhost, "check", permissions, tags) as user:
        result, report = check(env_for(capture_env, user, capture_role))
        text = capture_command(env_for(capture_env, user, capture_role), "check")
    assert result.returncode == 0, result.stdout
    assert report["ok"] is True
    assert problems(report) == []
    found = {finding["check"]: finding for finding in report["findings"]}
    assert found["exchanges"]["status"] == "ok"
    assert found["database_rights"]["status"] == "ok"
    assert "RabbitMQ 3." in found["rabbitmq_version"]["detail"]
    assert "PostgreSQL" in found["postgresql_version"]["detail"]
    assert found["schema_version"]["status"] == "ok"
    assert {finding["check"] for finding in report["findings"]} >= {"broker", "management_api", "clock_skew"}
    assert queues(management, vhost) == []
    assert text.returncode == 0
    assert text.stdout.rstrip().endswith("capture would work")
    assert text.stderr == ""


@pytest.mark.parametrize(
    ("missing", "check_name", "fragment", "fix"),
    [
        ("configure", "permissions", "no configure permission on queue 'rabbit-archive'", "set_permissions"),
        ("write", "permissions", "no write permission on queue 'rabbit-archive'", "set_permissions"),
        (
            "read on the queue",
            "permissions",
            "no read permission on queue 'rabbit-archive'",
            "set_permissions",
        ),
        ("read on an exchange", "exchanges", "cannot be bound (no read permission): 'orders'", "EXCLUDE"),
        ("management tag", "management_api", "needs the 'management' tag", "set_user_tags"),
        ("administrator tag for firehose", "user_tags", "needs 'administrator'", "set_user_tags"),
    ],
)
def test_a_missing_right_is_named_with_its_fix(
    management: httpx.Client,
    vhost: str,
    capture_env: dict[str, str],
    exchanges: list[str],
    missing: str,
    check_name: str,
    fragment: str,
    fix: str,
) -> None:
    (configure, write, read), tags = capture_permissions()
    extra: dict[str, str] = {}
    if missing == "configure":
        configure = "^$"
    elif missing == "write":
        write = "^$"
    elif missing == "read on the queue":
        read = r"^(audit|orders|amq\..*)$"
    elif missing == "read on an exchange":
        read = r"^(rabbit-archive|audit|amq\..*)$"
    elif missing == "management tag":
        tags = ""
    else:
        extra["source"] = "firehose"
    with rabbit_user(management, vhost, "check", (configure, write, read), tags) as user:
        result, report = check(env_for(capture_env, user, **extra))
    assert result.returncode == 1, result.stdout
    assert report["ok"] is False
    failed = problems(report)
    assert [finding["check"] for finding in failed] == [check_name], failed
    assert fragment in failed[0]["detail"]
    assert fix in failed[0]["fix"]
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("rabbit-capture: error: 1 problem")
    assert queues(management, vhost) == []


def test_every_problem_is_reported_in_one_run(
    services: Services,
    management: httpx.Client,
    vhost: str,
    capture_env: dict[str, str],
    database_url: str,
    exchanges: list[str],
    pika_channel: Any,
) -> None:
    # A classic archive queue where a quorum one is configured, a role without CREATE on the
    # database, an exchange the user may not read, and an event vhost without the plugin's exchange.
    pika_channel.queue_declare("rabbit-archive", durable=True)
    database = database_name(database_url)
    role = f"check_{uuid.uuid4().hex[:8]}"
    (configure, write, _), tags = capture_permissions()
    with (
        dropped_roles(services, database, role),
        rabbit_user(
            management, vhost, "check", (configure, write, r"^(rabbit-archive|audit|amq\..*)$"), tags
        ) as user,
    ):
        run_sql(services.postgres_url, f"CREATE ROLE \"{role}\" LOGIN PASSWORD '{PASSWORD}'")
        run_sql(services.postgres_url, f'CREATE DATABASE "{database}"')
        result, report = check(env_for(capture_env, user, role, event_vhost=vhost))
        listed = capture_command(env_for(capture_env, user, role, event_vhost=vhost), "check")
        schema = run_sql(database_url, "SELECT to_regnamespace('rabbit_archive')")[0][0]
    assert result.returncode == 1
    failed = {finding["check"]: finding for finding in problems(report)}
    assert set(failed) == {"archive_queue", "exchanges", "database_rights"}, failed
    assert "exists with other arguments" in failed["archive_queue"]["detail"]
    assert "RABBIT_ARCHIVE_QUEUE" in failed["archive_queue"]["fix"]
    assert "'orders'" in failed["exchanges"]["detail"]
    assert "lacks CREATE on database" in failed["database_rights"]["detail"]
    assert failed["database_rights"]["fix"] == f'GRANT CREATE ON DATABASE "{database}" TO "{role}"'
    warned = {finding["check"]: finding for finding in report["findings"] if finding["status"] == "warn"}
    assert "rabbitmq-plugins enable rabbitmq_event_exchange" in warned["event_exchange"]["fix"]
    assert report["problems"] == 3
    # For people: each problem on its line with its fix under it, one error line on stderr.
    lines = listed.stdout.splitlines()
    assert sum(line.startswith("FAIL") for line in lines) == 3
    assert sum(line.strip().startswith("fix: ") for line in lines) >= 3
    assert (
        listed.stderr
        == "rabbit-capture: error: 3 problem(s) found: fix them as listed and run the check again\n"
    )
    # Nothing changed: the queue is still the classic one, the database has no schema.
    assert management.get(f"/api/queues/{vhost}/rabbit-archive").json()["type"] == "classic"
    assert schema is None


def test_replay_check_passes_with_the_documented_rights_and_names_each_missing_one(
    services: Services,
    management: httpx.Client,
    vhost: str,
    amqp_url: str,
    capture_env: dict[str, str],
    database_url: str,
    pika_channel: Any,
) -> None:
    pika_channel.exchange_declare("orders", "topic", durable=True)
    pika_channel.queue_declare("debug", durable=True)
    assert capture_command(capture_env, "migrate").returncode == 0
    database = database_name(database_url)
    role = f"check_replay_{uuid.uuid4().hex[:8]}"
    _, replay_sql = blocks("sql")
    configure, write, read = rabbitmqctl("rabbit-replay")["set_permissions"][-3:]
    with (
        dropped_roles(services, database, role),
        rabbit_user(management, vhost, "check-replay", (configure, write, read)) as user,
    ):
        for statement in sql_statements(replay_sql, {"rabbit_replay": role}):
            run_sql(database_url, statement)
        env = {
            **capture_env,
            "RABBIT_ARCHIVE_AMQP_URL": with_user(amqp_url, user),
            "RABBIT_ARCHIVE_DATABASE_URL": with_user(database_url, role),
        }
        passed = replay_command(env, "check", "--json", "--exchange", "orders", "--to-queue", "debug")
        assert passed.returncode == 0, passed.stdout + passed.stderr
        report = json.loads(passed.stdout)
        assert problems(report) == []
        checked = [finding["detail"] for finding in report["findings"] if finding["check"] == "permissions"]
        assert any("'amq.default'" in detail for detail in checked)
        assert any("'orders'" in detail for detail in checked)

        # Write on orders only, no UPDATE on the history, and a target that does not exist.
        set_permissions(management, vhost, user, (configure, "^orders$", read))
        run_sql(database_url, f'REVOKE UPDATE ON rabbit_archive.replays FROM "{role}"')
        failed = replay_command(
            env, "check", "--json", "--exchange", "orders", "--to-queue", "debug", "--to-exchange", "nowhere"
        )
        text = replay_command(env, "check", "--to-queue", "debug")
    assert failed.returncode == 1
    assert PASSWORD not in failed.stdout + failed.stderr + text.stdout + text.stderr
    found = problems(json.loads(failed.stdout))
    details = {finding["check"]: finding for finding in found}
    assert len(found) == 3, found
    assert "may not publish to exchange 'amq.default'" in details["permissions"]["detail"]
    assert "set_permissions" in details["permissions"]["fix"]
    assert "lacks UPDATE on rabbit_archive.replays" in details["database_rights"]["detail"]
    assert details["database_rights"]["fix"] == f'GRANT UPDATE ON rabbit_archive.replays TO "{role}"'
    assert "exchange 'nowhere' does not exist" in details["target"]["detail"]
    assert text.returncode == 1
    assert "FAIL  permissions" in text.stdout
    assert text.stderr.startswith("rabbit-replay: error: 2 problem(s) found")


def test_a_conflicting_queue_is_seen_without_configure_and_the_drop_counter_needs_its_own(
    management: httpx.Client,
    vhost: str,
    capture_env: dict[str, str],
    exchanges: list[str],
    pika_channel: Any,
) -> None:
    pika_channel.queue_declare("rabbit-archive", durable=True)  # classic, no single active consumer
    (_, write, read), tags = capture_permissions()
    with rabbit_user(management, vhost, "check", ("^$", write, read), tags) as user:
        _, report = check(env_for(capture_env, user))
    found = problems(report)
    assert [finding["check"] for finding in found] == ["archive_queue", "permissions"], found
    assert "not the configured" in found[0]["detail"]
    assert "no configure permission on queue 'rabbit-archive'" in found[1]["detail"]

    # QUEUE_MAX_BYTES: dropped messages are dead-lettered through the default exchange to
    # rabbit-archive.dropped, which the daemon declares: README's rights for the archive queue
    # alone are not enough.
    pika_channel.queue_delete("rabbit-archive")
    permissions, tags = capture_permissions()
    with rabbit_user(management, vhost, "check", permissions, tags) as user:
        _, report = check(env_for(capture_env, user, queue_max_bytes="1000000"))
    found = problems(report)
    assert [finding["check"] for finding in found] == ["permissions", "permissions"], found
    assert "no configure permission on queue 'rabbit-archive.dropped'" in found[0]["detail"]
    assert "no write permission on the default exchange" in found[1]["detail"]
    assert "amq.default" in found[1]["fix"]
    assert queues(management, vhost) == []


def test_a_missing_database_is_fine_only_when_the_role_may_create_it(
    services: Services, capture_env: dict[str, str], database_url: str
) -> None:
    role = f"check_{uuid.uuid4().hex[:8]}"
    database = database_name(database_url)
    with dropped_roles(services, database, role):
        run_sql(services.postgres_url, f"CREATE ROLE \"{role}\" LOGIN PASSWORD '{PASSWORD}'")
        env = {
            **capture_env,
            "RABBIT_ARCHIVE_DATABASE_URL": with_user(capture_env["RABBIT_ARCHIVE_DATABASE_URL"], role),
        }
        result, report = check(env)
        run_sql(services.postgres_url, f'ALTER ROLE "{role}" CREATEDB')
        allowed, allowed_report = check(env)
    assert result.returncode == 1
    found_problems = problems(report)
    assert len(found_problems) == 1, found_problems
    problem = found_problems[0]
    assert problem["check"] == "database"
    assert f"database {database!r} does not exist" in problem["detail"]
    assert problem["fix"].startswith(f'as an administrator: CREATE DATABASE "{database}"')
    assert allowed.returncode == 0, allowed.stdout
    found = {finding["check"]: finding for finding in allowed_report["findings"]}
    assert "the first start creates it" in found["database"]["detail"]
