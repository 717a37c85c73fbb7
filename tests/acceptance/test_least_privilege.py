"""The rights README.md's "Least privilege" documents are enough, and each missing one is one line.

The GRANTs and rabbitmqctl lines are read from README.md itself, with this test's names
substituted, so the documentation cannot drift from what was verified.
"""

import asyncio
import contextlib
import json
import re
import shlex
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import aiormq
import httpx
import pika
import pytest

from rabbit_archive.capture import discovery
from rabbit_archive.capture.discovery import BindingKeeper, Channels
from rabbit_archive.capture.management import ManagementApi, management_client
from rabbit_archive.capture.metrics import CaptureMetrics
from rabbit_archive.config.settings import Settings
from tests.acceptance.test_cli import assert_one_line_error, capture_command
from tests.acceptance.test_replay import assert_one_line_error as assert_replay_error
from tests.acceptance.test_replay import json_lines, ok, replay_command
from tests.conftest import run_sql
from tests.support.daemon import CaptureProcess, wait_for
from tests.support.services import Services

pytestmark = pytest.mark.acceptance

README = Path(__file__).resolve().parents[2] / "README.md"
PASSWORD = "s3cret-lp"  # checked never to be printed


def section() -> str:
    """README.md's "Least privilege" section."""
    text = README.read_text()
    start = text.index("\n## Least privilege\n")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def blocks(language: str) -> list[str]:
    """The fenced blocks of that language in the section."""
    return re.findall(rf"^```{language}\n(.*?)^```", section(), re.MULTILINE | re.DOTALL)


def rabbitmqctl(user: str) -> dict[str, list[str]]:
    """The section's rabbitmqctl commands for a user: command name -> arguments after it."""
    commands = {}
    for block in blocks("sh"):
        for line in block.splitlines():
            words = shlex.split(line)
            if words[:1] == ["rabbitmqctl"] and user in words:
                commands[words[1]] = words[2:]
    return commands


def sql_statements(block: str, names: dict[str, str]) -> list[str]:
    """The statements of a SQL block with the README's names replaced by the test's."""
    text = "\n".join(line for line in block.splitlines() if not line.startswith("--"))
    for old, new in names.items():
        text = re.sub(rf"\b{re.escape(old)}\b", new, text)
    return [statement.strip() for statement in text.split(";") if statement.strip()]


def with_user(url: str, user: str) -> str:
    """The URL with user and password replaced."""
    parts = urlsplit(url)
    host = f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)
    return urlunsplit(parts._replace(netloc=f"{quote(user, safe='')}:{PASSWORD}@{host}"))


@contextlib.contextmanager
def rabbit_user(
    management: httpx.Client, vhost: str, prefix: str, permissions: tuple[str, str, str], tags: str = ""
) -> Iterator[str]:
    """A broker user with exactly these permissions in the vhost (and tags); deleted afterwards."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    management.put(f"/api/users/{name}", json={"password": PASSWORD, "tags": tags}).raise_for_status()
    try:
        set_permissions(management, vhost, name, permissions)
        yield name
    finally:
        management.delete(f"/api/users/{name}")


def set_permissions(
    management: httpx.Client, vhost: str, user: str, permissions: tuple[str, str, str]
) -> None:
    configure, write, read = permissions
    management.put(
        f"/api/permissions/{quote(vhost, safe='')}/{user}",
        json={"configure": configure, "write": write, "read": read},
    ).raise_for_status()


@contextlib.contextmanager
def dropped_roles(services: Services, database: str, *roles: str) -> Iterator[None]:
    """Drop the roles (and what they own or were granted in the database) at the end."""
    try:
        yield
    finally:
        # The database goes first (its fixture drops it again, harmlessly), taking the roles'
        # objects and privileges with it.
        run_sql(services.postgres_url, f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        for role in roles:
            run_sql(services.postgres_url, f'DROP ROLE IF EXISTS "{role}"')


def database_name(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


def capture_permissions(read: str | None = None) -> tuple[tuple[str, str, str], str]:
    """The capture user's permissions and tags as README.md gives them (read optionally narrowed)."""
    commands = rabbitmqctl("rabbit-capture")
    configure, write, readme_read = commands["set_permissions"][-3:]
    tags = commands["set_user_tags"][-1]
    return (configure, write, read if read is not None else readme_read), tags


def test_the_documented_rights_are_enough_to_capture_and_an_unreadable_exchange_is_skipped(
    services: Services,
    management: httpx.Client,
    vhost: str,
    amqp_url: str,
    database_url: str,
    pika_channel: Any,
    start_capture: Callable[..., CaptureProcess],
) -> None:
    for exchange, kind in (("audit", "fanout"), ("billing", "topic"), ("orders", "topic")):
        pika_channel.exchange_declare(exchange, kind)
    database = database_name(database_url)
    role = f"lp_capture_{uuid.uuid4().hex[:8]}"
    capture_sql, _ = blocks("sql")
    # The read regex covers the archive queue, the amq.* exchanges and two of the three others:
    # 'billing', between them in binding order, is refused and must not keep the others unbound.
    permissions, tags = capture_permissions(read=r"^(rabbit-archive|audit|orders|amq\..*)$")
    assert tags == "management"
    with (
        dropped_roles(services, database, role),
        rabbit_user(management, vhost, "lp-capture", permissions, tags) as user,
    ):
        for statement in sql_statements(capture_sql, {"rabbit_capture": role, "rabbit_archive": database}):
            run_sql(services.postgres_url, statement)
        daemon = start_capture(amqp_url=with_user(amqp_url, user), database_url=with_user(database_url, role))
        daemon.wait_bound("orders")
        wait_for(lambda: '"binding_refused"' in daemon.log(), 10, what="the refused binding logged")
        for exchange in ("audit", "billing", "orders"):
            pika_channel.basic_publish(exchange, "a.b", b"x", pika.BasicProperties(message_id=exchange))

        def captured() -> set[str]:
            return {row[0] for row in run_sql(database_url, "SELECT message_id FROM rabbit_archive.messages")}

        wait_for(lambda: captured() == {"audit", "orders"}, 15, what="audit and orders captured")
        wait_for(lambda: "bound_exchanges" in daemon.metrics(), 5, what="metrics")
        owner = run_sql(
            database_url, "SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = 'rabbit_archive'"
        )
        assert owner[0][0] == role
        log = daemon.log()
        assert daemon.stop() == 0
    events = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    refused = [event for event in events if event.get("event") == "binding_refused"]
    # Once, although discovery ran every second meanwhile.
    assert [event["exchange"] for event in refused] == ["billing"], refused
    assert "read permission on exchange 'billing'" in refused[0]["problem"]
    assert user in refused[0]["problem"]
    assert "Traceback" not in log
    assert PASSWORD not in log


def test_an_exchange_granted_later_is_bound_on_a_later_round(
    services: Services,
    management: httpx.Client,
    vhost: str,
    amqp_url: str,
    pika_channel: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pika_channel.exchange_declare("billing", "topic")
    pika_channel.queue_declare("rabbit-archive", durable=True)
    monkeypatch.setattr(discovery, "REFUSED_RETRY", 0.0)
    (configure, write, _), tags = capture_permissions()
    with rabbit_user(management, vhost, "lp-capture", (configure, write, "^rabbit-archive$"), tags) as user:
        settings = Settings(
            amqp_url=with_user(amqp_url, user), management_url=services.management_url, exclude=["amq.*"]
        )

        async def rounds() -> tuple[list[str], list[str]]:
            connection = await aiormq.connect(settings.amqp_url)
            try:
                async with management_client(settings) as client:
                    keeper = BindingKeeper(settings, ManagementApi(client), CaptureMetrics())
                    channels = Channels(connection)
                    await keeper.reconcile_once(channels, vhost)
                    before = keeper.refused_exchanges(vhost)
                    set_permissions(management, vhost, user, (configure, write, ".*"))
                    await keeper.reconcile_once(channels, vhost)
                    return before, keeper.refused_exchanges(vhost)
            finally:
                await connection.close()

        assert asyncio.run(rounds()) == (["billing"], [])
    bindings = management.get(f"/api/exchanges/{quote(vhost, safe='')}/billing/bindings/source").json()
    assert [(b["destination"], b["routing_key"]) for b in bindings] == [("rabbit-archive", "#")]


@pytest.mark.parametrize(
    ("missing", "fragments"),
    [
        ("configure", ("configure", "'rabbit-archive'")),
        ("write", ("write permission", "'rabbit-archive'")),
        ("tag", ("'management' tag",)),
        ("vhost", ("access to vhost", "permissions there")),
        ("password", ("rejected the credentials",)),
    ],
)
def test_daemon_missing_a_right_of_its_own_says_which_in_one_line_and_exits_2(
    missing: str,
    fragments: tuple[str, ...],
    management: httpx.Client,
    vhost: str,
    amqp_url: str,
    capture_env: dict[str, str],
    pika_channel: Any,
) -> None:
    pika_channel.exchange_declare("orders", "topic")
    (configure, write, read), tags = capture_permissions()
    if missing == "configure":
        configure = "^$"
    elif missing == "write":
        write = "^$"
    elif missing == "tag":
        tags = ""
    with rabbit_user(management, vhost, "lp-capture", (configure, write, read), tags) as user:
        if missing == "vhost":
            management.delete(f"/api/permissions/{quote(vhost, safe='')}/{user}").raise_for_status()
        url = with_user(amqp_url, user)
        if missing == "password":
            url = url.replace(PASSWORD, PASSWORD + "-wrong")
        env = {**capture_env, "RABBIT_ARCHIVE_AMQP_URL": url}
        result = capture_command(env, "run", timeout=60)
    assert_one_line_error(result, 2, user, *fragments)
    assert PASSWORD not in result.stderr + result.stdout


def test_capture_role_without_create_on_the_database_says_so_in_one_line_and_exits_2(
    services: Services, capture_env: dict[str, str], database_url: str
) -> None:
    database = database_name(database_url)
    role = f"lp_capture_{uuid.uuid4().hex[:8]}"
    with dropped_roles(services, database, role):
        run_sql(services.postgres_url, f'CREATE DATABASE "{database}"')
        run_sql(services.postgres_url, f'CREATE ROLE "{role}" LOGIN')
        env = {**capture_env, "RABBIT_ARCHIVE_DATABASE_URL": with_user(database_url, role)}
        result = capture_command(env, "run", timeout=60)
    assert_one_line_error(result, 2, role, "CREATE on the database", "permission denied")
    assert PASSWORD not in result.stderr + result.stdout


def test_the_documented_rights_are_enough_to_replay_and_a_missing_one_is_one_line(
    services: Services,
    management: httpx.Client,
    vhost: str,
    amqp_url: str,
    capture_env: dict[str, str],
    database_url: str,
    pika_channel: Any,
    start_capture: Callable[..., CaptureProcess],
) -> None:
    channel = pika_channel
    channel.exchange_declare("orders", "topic", durable=True)
    channel.queue_declare("orders-all", durable=True)
    channel.queue_bind("orders-all", "orders", "#")
    channel.queue_declare("debug", durable=True)
    daemon = start_capture()
    daemon.wait_bound("orders")
    for n in range(3):
        channel.basic_publish("orders", f"eu.{n}", b"o", pika.BasicProperties(message_id=f"m-{n}"))
    wait_for(
        lambda: run_sql(database_url, "SELECT count(*) FROM rabbit_archive.messages")[0][0] == 3,
        15,
        what="3 archived messages",
    )
    channel.queue_purge("orders-all")
    database = database_name(database_url)
    role = f"lp_replay_{uuid.uuid4().hex[:8]}"
    _, replay_sql = blocks("sql")
    configure, write, read = rabbitmqctl("rabbit-replay")["set_permissions"][-3:]
    with (
        dropped_roles(services, database, role),
        rabbit_user(management, vhost, "lp-replay", (configure, write, read)) as user,
    ):
        for statement in sql_statements(replay_sql, {"rabbit_replay": role}):
            run_sql(database_url, statement)
        env = {
            **capture_env,
            "RABBIT_ARCHIVE_AMQP_URL": with_user(amqp_url, user),
            "RABBIT_ARCHIVE_DATABASE_URL": with_user(database_url, role),
        }

        def depth(queue: str) -> int:
            return int(channel.queue_declare(queue, passive=True).method.message_count)

        assert len(json_lines(ok(replay_command(env, "find", "--json")))) == 3
        ok(replay_command(env, "run", "--exchange", "orders", "--yes", "--reason", "lp"))
        wait_for(lambda: depth("orders-all") == 3, 10, what="replayed to the original exchange")
        ok(
            replay_command(
                env, "run", "--exchange", "orders", "--to-queue", "debug", "--max-queue-depth", "10", "--yes"
            )
        )
        wait_for(lambda: depth("debug") == 3, 10, what="replayed into the queue")
        history = json_lines(ok(replay_command(env, "history", "--json")))
        assert [item["status"] for item in history] == ["completed", "completed"]

        # Without write on amq.default, --to-queue is refused by the broker: one line, exit 2.
        set_permissions(management, vhost, user, (configure, "^orders$", read))
        refused = replay_command(env, "run", "--exchange", "orders", "--to-queue", "debug", "--yes")
        assert_replay_error(refused, 2, "amq.default", "write permission", user)
        assert PASSWORD not in refused.stderr + refused.stdout
        failed = json_lines(ok(replay_command(env, "history", "--json")))[-1]
        assert failed["status"] == "failed"
        assert f"rabbit-replay resume {failed['replay_id']}" in refused.stderr
        assert depth("debug") == 3
        # Once granted, the failed replay resumes.
        set_permissions(management, vhost, user, (configure, write, read))
        ok(replay_command(env, "resume", failed["replay_id"], "--yes"))
        wait_for(lambda: depth("debug") == 6, 10, what="the resumed replay")

        # Without UPDATE on the history: refused before anything is published.
        run_sql(database_url, f'REVOKE UPDATE ON rabbit_archive.replays FROM "{role}"')
        no_update = replay_command(env, "run", "--exchange", "orders", "--yes")
        assert_replay_error(no_update, 2, "UPDATE on rabbit_archive.replays", role)
        assert depth("orders-all") == 3
        assert "3 messages" in ok(replay_command(env, "run", "--exchange", "orders", "--dry-run"))
        # Without SELECT on the archive, even find stops in one line naming the privilege.
        run_sql(database_url, f'REVOKE SELECT ON rabbit_archive.messages FROM "{role}"')  # noqa: S608
        no_select = replay_command(env, "find")
        assert_replay_error(no_select, 2, "SELECT on rabbit_archive.messages", role)
        assert PASSWORD not in no_select.stderr + no_select.stdout
