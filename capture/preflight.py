"""`rabbit-capture check`: a preflight that changes nothing and reports every problem at once, with its fix.

Rights are asked of the broker with AMQP methods it refuses or accepts before they could
change anything:

- configure on the archive queue: queue.declare with the configured arguments when the queue
  exists (the same arguments change nothing; other ones are the conflict the daemon would
  stop on); when it does not, the same declare with a negative `x-max-length`, which the
  broker rejects after the permission checks and before creating anything;
- write on the archive queue and read on an exchange: queue.unbind of a binding with an
  argument nobody binds with (`x-rabbit-archive-check`), so no binding matches;
- read on the archive queue: basic.consume with an `x-priority` that is not a number, refused
  for permission first, else rejected as a bad argument before any consumer exists.

Findings, the report and the probes themselves are archive/checks.py's.
"""

import asyncio
import contextlib
import ssl
import time
import uuid
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import aiormq
import aiormq.abc
import asyncpg

from rabbit_archive.archive import frames, queries
from rabbit_archive.archive.checks import (
    Outcome,
    Probes,
    Report,
    Status,
    connection_failure,
    probe_arguments,
)
from rabbit_archive.archive.db import CONNECTION_ERRORS, DATABASE_ERRORS
from rabbit_archive.archive.errors import ArchiveError, describe
from rabbit_archive.archive.migrate import latest_version, schema_version
from rabbit_archive.capture.binding_plan import BindingPlan
from rabbit_archive.capture.consumer import dropped_queue, queue_arguments
from rabbit_archive.capture.discovery import BindingKeeper
from rabbit_archive.capture.events import EVENT_EXCHANGE
from rabbit_archive.capture.management import ManagementApi, management_client
from rabbit_archive.capture.metrics import CaptureMetrics
from rabbit_archive.config.settings import ConfigError, Settings, mask_url

# Oldest versions the product is built and tested against (README).
MIN_RABBITMQ = (3, 10)
MIN_POSTGRESQL = 130000
# Beyond these the host, broker and database disagree about "now" enough to matter.
MAX_BROKER_SKEW = 2.0  # the HTTP Date header has whole seconds
MAX_DATABASE_SKEW = 1.0
TRACE_EXCHANGE = "amq.rabbitmq.trace"
# Tags whose holders may use the management API as the daemon does.
# What capture/consumer.py declares the QUEUE_MAX_BYTES drop counter with.
DROPPED_QUEUE_ARGUMENTS: dict[str, Any] = {"x-max-length": 10_000, "x-overflow": "drop-head"}
MANAGEMENT_TAGS = frozenset({"management", "policymaker", "monitoring", "administrator"})


def user_tags(whoami: dict[str, Any]) -> set[str]:
    """The tags of /api/whoami (a list since RabbitMQ 3.9, a comma-separated string before)."""
    tags = whoami.get("tags")
    if isinstance(tags, str):
        return {tag.strip() for tag in tags.split(",") if tag.strip()}
    if isinstance(tags, list):
        return {tag for tag in tags if isinstance(tag, str)}
    return set()


def tag_findings(report: Report, user: str, tags: set[str], source: str) -> None:
    """The user's tags against what the management API calls of the chosen SOURCE need."""
    shown = ", ".join(sorted(tags)) or "none"
    if not tags & MANAGEMENT_TAGS:
        report.add(
            "user_tags",
            "fail",
            f"user {user!r} has tags: {shown}; the management API needs 'management'",
            f"rabbitmqctl set_user_tags {user} management",
        )
        return
    if source != "bindings" and "administrator" not in tags:
        report.add(
            "user_tags",
            "fail",
            f"user {user!r} has tags: {shown}; SOURCE={source} switches the tracer on, "
            "which needs 'administrator'",
            f"rabbitmqctl set_user_tags {user} administrator (or SOURCE=bindings)",
        )
        return
    report.add("user_tags", "ok", f"user {user!r} has tags: {shown}")


def version_tuple(text: str) -> tuple[int, ...]:
    """'3.10.8' -> (3, 10, 8); what does not parse counts as 0."""
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def broker_version_finding(report: Report, version: str) -> None:
    """RabbitMQ's version against the oldest one the product is tested on."""
    if not version:
        report.add("rabbitmq_version", "warn", "the management API did not say which RabbitMQ version runs")
    elif version_tuple(version) < MIN_RABBITMQ:
        report.add(
            "rabbitmq_version",
            "warn",
            f"RabbitMQ {version}: rabbit-archive is tested on 3.10 and newer",
            "upgrade RabbitMQ to 3.10 or newer",
        )
    else:
        report.add("rabbitmq_version", "ok", f"RabbitMQ {version}")


def skew_finding(report: Report, what: str, skew: float, limit: float, fix: str) -> None:
    """How far `what`'s clock is from this host's (positive: ahead)."""
    detail = f"{what}'s clock is {skew:+.1f} s from this host's"
    if abs(skew) > limit:
        report.add("clock_skew", "warn", detail, fix)
    else:
        report.add("clock_skew", "ok", detail)


def schema_finding(report: Report, version: int | None, latest: int) -> None:
    """The schema version in the database against the one this code brings."""
    if version is None:
        report.add("schema_version", "ok", f"no archive schema yet: the first start applies version {latest}")
    elif version < latest:
        report.add(
            "schema_version", "ok", f"schema version {version}: the first start migrates it to {latest}"
        )
    elif version > latest:
        report.add(
            "schema_version",
            "fail",
            f"schema version {version} is newer than this rabbit-archive knows ({latest})",
            "upgrade rabbit-archive to the version that wrote the schema",
        )
    else:
        report.add("schema_version", "ok", f"schema version {version} (current)")


def database_rights_findings(report: Report, rights: dict[str, Any]) -> None:
    """CREATE on the database and ownership of the schema and its table (README 'Least privilege')."""
    role, database = rights["role"], rights["database"]
    problems = []
    if not rights["can_create"]:
        problems.append(
            (
                f"role {role!r} lacks CREATE on database {database!r} (CREATE SCHEMA IF NOT EXISTS needs it "
                "at every start, even when the schema exists)",
                f'GRANT CREATE ON DATABASE "{database}" TO "{role}"',
            )
        )
    if rights["schema_exists"] and not rights["owns_schema"]:
        problems.append(
            (
                f"schema rabbit_archive belongs to {rights['schema_owner']!r}, not to {role!r}",
                f'ALTER SCHEMA rabbit_archive OWNER TO "{role}" (or run as {rights["schema_owner"]!r})',
            )
        )
    if rights["schema_exists"] and not rights["owns_messages"]:
        problems.append(
            (
                f"table rabbit_archive.messages belongs to {rights['messages_owner']!r}, not to {role!r}: "
                "only its owner creates and drops the daily partitions",
                f'ALTER TABLE rabbit_archive.messages OWNER TO "{role}"',
            )
        )
    for detail, fix in problems:
        report.add("database_rights", "fail", detail, fix)
    if not problems:
        report.add("database_rights", "ok", f"role {role!r} may create and own the archive schema")


async def _declare(probes: Probes, queue: str, arguments: dict[str, Any]) -> tuple[bool, Outcome, str]:
    """Whether the queue exists, and how the broker answers declaring it with these arguments.

    An existing queue is declared as configured (which changes nothing, or is rejected for
    other arguments); a missing one with a negative `x-max-length`, which the broker rejects
    after every permission check (configure; with a dead-letter exchange, read on the queue and
    write on that exchange) and before creating anything.
    """
    exists, _ = await probes.ask(frames.queue_declare(queue, passive=True))
    if exists == "accepted":
        answer, text = await probes.ask(frames.queue_declare(queue, durable=True, arguments=arguments))
        return True, answer, text
    answer, text = await probes.ask(
        frames.queue_declare(queue, durable=True, arguments={**arguments, "x-max-length": -1})
    )
    return False, ("accepted" if answer == "rejected" else answer), text


def _refused_fix(user: str, vhost: str, right: str, name: str) -> str:
    return (
        f"give user {user!r} {right} on {name!r} in vhost {vhost!r}, e.g. rabbitmqctl set_permissions -p "
        f"{vhost} {user} (see 'Least privilege' in README.md)"
    )


class Preflight:
    """Runs every check of `rabbit-capture check` against the configured servers."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.report = Report()
        self.user = unquote(urlsplit(settings.amqp_url).username or "guest")
        # vhost -> the archive queue as the management API lists it (None: it does not exist).
        self.queues: dict[str, dict[str, Any] | None] = {}

    async def run(self) -> Report:
        """Every check; unreachable servers are findings too, never exceptions."""
        plans = await self._management()
        await self._broker(plans)
        await self._database()
        return self.report

    # --- management API ---------------------------------------------------------------------

    async def _management(self) -> dict[str, BindingPlan | None]:
        """Reachability, version, tags, event plugin, and the binding plan per vhost."""
        settings, report = self.settings, self.report
        vhosts = list(settings.capture_vhosts)
        plans: dict[str, BindingPlan | None] = {vhost: None for vhost in vhosts if vhost != "*"}
        try:
            settings.check_management_transport()
        except ConfigError as error:
            report.add("management_api", "fail", str(error), "see the message")
            return plans
        where = ", ".join(settings.management_bases)
        async with management_client(settings) as client:
            api = ManagementApi(client)
            sent = time.time()
            try:
                overview, date = await api.overview()
                whoami = await api.whoami()
            except ArchiveError as error:
                report.add(
                    "management_api",
                    "fail",
                    _management_detail(str(error), where),
                    _management_fix(str(error), settings.management_auth[0]),
                )
                return plans
            received = time.time()
            report.add(
                "management_api", "ok", f"management API at {where} answers (rabbitmq_management plugin on)"
            )
            broker_version_finding(report, str(overview.get("rabbitmq_version") or ""))
            if date:
                with contextlib.suppress(TypeError, ValueError):
                    # Date has whole seconds: its middle is the best guess.
                    skew = parsedate_to_datetime(date).timestamp() + 0.5 - (sent + received) / 2
                    skew_finding(
                        report,
                        "the broker",
                        skew,
                        MAX_BROKER_SKEW,
                        "synchronise the clocks (NTP) of this host and the broker",
                    )
            tag_findings(
                report,
                str(whoami.get("name") or settings.management_auth[0]),
                user_tags(whoami),
                settings.source,
            )
            if "*" in vhosts:
                try:
                    vhosts = await api.vhosts()
                except ArchiveError as error:
                    report.add("vhosts", "fail", f"cannot list vhosts for VHOSTS=*: {error}")
                    return plans
                plans = {vhost: None for vhost in vhosts}
            keeper = BindingKeeper(settings, api, CaptureMetrics())
            for vhost in plans:
                try:
                    plans[vhost], _ = await keeper.plan(vhost)
                    self.queues[vhost] = await api.queue(vhost, settings.queue)
                except ArchiveError as error:
                    report.add("management_vhost", "fail", str(error), vhost=vhost)
            return plans

    # --- AMQP -------------------------------------------------------------------------------

    async def _broker(self, plans: dict[str, BindingPlan | None]) -> None:
        settings = self.settings
        for vhost, plan in plans.items():
            connection = await self._connect(vhost)
            if connection is None:
                continue
            try:
                probes = Probes(connection)
                await self._archive_queue(probes, vhost)
                await self._exchanges(probes, vhost, plan)
            finally:
                with contextlib.suppress(aiormq.exceptions.AMQPError, OSError, TimeoutError):
                    await asyncio.wait_for(connection.close(), 5)
        if settings.source != "firehose":
            await self._events()

    async def _connect(
        self, vhost: str, check: str = "broker", status: Status = "fail", effect: str = ""
    ) -> aiormq.abc.AbstractConnection | None:
        url = self.settings.amqp_url_for(vhost)
        try:
            connection = await asyncio.wait_for(
                frames.connect(url, vhost, client_properties={"connection_name": "rabbit-capture check"}), 30
            )
        except (aiormq.exceptions.AMQPError, OSError, TimeoutError) as error:
            detail, fix = connection_failure(error, mask_url(url), self.user, vhost)
            if check != "broker" and any(
                finding.check == "broker" and finding.detail == detail for finding in self.report.findings
            ):
                return None  # already reported, with its fix
            self.report.add(check, status, detail + effect, fix, vhost)
            return None
        if check == "broker":
            self.report.add(
                check, "ok", f"connected to {mask_url(url)} ({frames.node_of(connection)})", vhost=vhost
            )
        return connection

    async def _archive_queue(self, probes: Probes, vhost: str) -> None:
        settings, report, user = self.settings, self.report, self.user
        queue = settings.queue
        arguments = queue_arguments(settings)
        exists, answer, text = await _declare(probes, queue, arguments)
        if answer == "refused" and exists:
            # Without configure the declare says nothing about the arguments: compare the listing's.
            listed = self.queues.get(vhost)
            if listed is not None and (
                listed.get("arguments") != arguments or listed.get("durable") is not True
            ):
                report.add(
                    "archive_queue",
                    "fail",
                    f"queue {queue!r} exists with arguments {listed.get('arguments')} (durable: "
                    f"{listed.get('durable')}), not the configured {arguments} (durable)",
                    f"drain it and delete it (rabbitmqctl delete_queue -p {vhost} {queue}), or set "
                    "RABBIT_ARCHIVE_QUEUE to a new name",
                    vhost,
                )
        if settings.queue_max_bytes is not None:
            dropped = dropped_queue(settings)
            _, dropped_answer, dropped_text = await _declare(probes, dropped, DROPPED_QUEUE_ARGUMENTS)
            if dropped_answer == "refused":
                report.add(
                    "permissions",
                    "fail",
                    f"no configure permission on queue {dropped!r} (QUEUE_MAX_BYTES counts drops there): "
                    f"{dropped_text}",
                    _refused_fix(user, vhost, "configure", dropped),
                    vhost,
                )
            elif dropped_answer == "rejected":
                report.add(
                    "archive_queue",
                    "fail",
                    f"queue {dropped!r} exists with other arguments ({dropped_text})",
                    f"delete it (rabbitmqctl delete_queue -p {vhost} {dropped})",
                    vhost,
                )
        if answer == "refused" and "access to exchange" in text:
            report.add(
                "permissions",
                "fail",
                f"no write permission on the default exchange, through which QUEUE_MAX_BYTES dead-letters "
                f"what the archive queue drops: {text}",
                _refused_fix(user, vhost, "write", "amq.default"),
                vhost,
            )
        elif answer == "refused":
            report.add(
                "permissions",
                "fail",
                f"no configure permission on queue {queue!r}: {text}",
                _refused_fix(user, vhost, "configure", queue),
                vhost,
            )
        elif answer == "rejected":
            report.add(
                "archive_queue",
                "fail",
                f"queue {queue!r} exists with other arguments than the configured ones ({text})",
                f"drain it and delete it (rabbitmqctl delete_queue -p {vhost} {queue}), or set "
                "RABBIT_ARCHIVE_QUEUE to a new name",
                vhost,
            )
        elif answer == "accepted":
            state = "exists with the configured arguments" if exists else "will be declared at start"
            report.add("archive_queue", "ok", f"queue {queue!r} {state}; configure permitted", vhost=vhost)
        else:
            report.add("archive_queue", "fail", f"declaring queue {queue!r} failed: {text}", vhost=vhost)
        # Write on the queue is checked first, then read on the (missing) exchange: a refusal that
        # names the exchange means write was granted.
        answer, text = await probes.ask(
            frames.queue_unbind(queue, f"rabbit-archive-check-{uuid.uuid4().hex}", "", probe_arguments())
        )
        if answer == "refused" and "access to queue" in text:
            report.add(
                "permissions",
                "fail",
                f"no write permission on queue {queue!r} (queue.bind needs it): {text}",
                _refused_fix(user, vhost, "write", queue),
                vhost,
            )
        answer, text = await probes.ask(
            frames.basic_consume(queue, "rabbit-archive-check", arguments={"x-priority": "check"})
        )
        if answer == "refused":
            report.add(
                "permissions",
                "fail",
                f"no read permission on queue {queue!r} (consuming needs it): {text}",
                _refused_fix(user, vhost, "read", queue),
                vhost,
            )

    async def _exchanges(self, probes: Probes, vhost: str, plan: BindingPlan | None) -> None:
        """Read on every exchange the daemon would bind (and topic read for its key)."""
        settings, queue = self.settings, self.settings.queue
        wanted: list[tuple[str, str]] = []
        if settings.source == "firehose":
            wanted.append((TRACE_EXCHANGE, "publish.#"))
        elif plan is not None:
            for bound in plan.bound:
                key = bound.bindings[0].routing_key if bound.bindings else ""
                wanted.append((bound.exchange, key))
        if plan is None and settings.source != "firehose":
            return
        refused: list[str] = []
        for exchange, key in wanted:
            answer, text = await probes.ask(frames.queue_unbind(queue, exchange, key, probe_arguments()))
            if answer == "refused" and "access to queue" in text:
                # Write on the queue is checked first (and reported above): exchanges are unknown.
                self.report.add(
                    "exchanges",
                    "warn",
                    f"read on the {len(wanted)} exchanges not checked: the broker refused write on "
                    "the queue first",
                    vhost=vhost,
                )
                return
            if answer == "refused":
                refused.append(exchange)
        if refused:
            names = ", ".join(repr(name) for name in refused)
            self.report.add(
                "exchanges",
                "fail",
                f"{len(refused)} of {len(wanted)} exchanges cannot be bound (no read permission): {names}",
                f"widen the read permission of user {self.user!r} in vhost {vhost!r} to them, or leave them "
                "out with RABBIT_ARCHIVE_EXCLUDE",
                vhost,
            )
        else:
            self.report.add(
                "exchanges", "ok", f"all {len(wanted)} exchanges to capture can be bound", vhost=vhost
            )

    async def _events(self) -> None:
        """The event exchange (instant discovery): without it discovery is periodic, so warnings only."""
        vhost = self.settings.event_vhost
        connection = await self._connect(
            vhost,
            check="event_exchange",
            status="warn",
            effect=f"; without {EVENT_EXCHANGE} discovery is periodic",
        )
        if connection is None:
            return
        try:
            probes = Probes(connection)
            exists, _ = await probes.ask(frames.exchange_declare(EVENT_EXCHANGE, "topic", passive=True))
            if exists == "not_found":
                self.report.add(
                    "event_exchange",
                    "warn",
                    f"no {EVENT_EXCHANGE} in vhost {vhost!r}: new exchanges are bound only at the next "
                    f"discovery round (every {self.settings.discovery_interval:g} s)",
                    "rabbitmq-plugins enable rabbitmq_event_exchange (or set RABBIT_ARCHIVE_EVENT_VHOST to "
                    "the plugin's vhost)",
                    vhost,
                )
                return
            declared, text = await probes.ask(
                frames.queue_declare(
                    "", exclusive=True, auto_delete=True, arguments={"x-dead-letter-exchange": 0}
                )
            )
            bound, bind_text = await probes.ask(
                frames.queue_unbind(
                    "amq.gen-rabbit-archive-check", EVENT_EXCHANGE, "exchange.created", probe_arguments()
                )
            )
            missing = [t for answer, t in ((declared, text), (bound, bind_text)) if answer == "refused"]
            if missing:
                self.report.add(
                    "event_exchange",
                    "warn",
                    f"user {self.user!r} cannot listen to {EVENT_EXCHANGE} in vhost {vhost!r} "
                    f"({'; '.join(missing)}): discovery is periodic only",
                    f"give it configure and write on '^amq\\.gen-.*' and read on '^amq\\.rabbitmq\\.event$' "
                    f"in vhost {vhost!r}",
                    vhost,
                )
            else:
                self.report.add(
                    "event_exchange",
                    "ok",
                    f"{EVENT_EXCHANGE} in vhost {vhost!r}: instant discovery",
                    vhost=vhost,
                )
        finally:
            with contextlib.suppress(aiormq.exceptions.AMQPError, OSError, TimeoutError):
                await asyncio.wait_for(connection.close(), 5)

    # --- PostgreSQL -------------------------------------------------------------------------

    async def _database(self) -> None:
        url, report = self.settings.database_url, self.report
        shown = mask_url(url)
        try:
            connection = await asyncio.wait_for(asyncpg.connect(url), 30)
        except asyncpg.InvalidCatalogNameError:
            await self._missing_database(url)
            return
        except asyncpg.InvalidPasswordError:
            report.add(
                "database",
                "fail",
                f"PostgreSQL at {shown} rejected the credentials",
                "check RABBIT_ARCHIVE_DATABASE_URL",
            )
            return
        except asyncpg.InsufficientPrivilegeError as error:
            report.add(
                "database",
                "fail",
                f"PostgreSQL at {shown} refused: {describe(error)}",
                "GRANT CONNECT ON DATABASE to the role",
            )
            return
        except DATABASE_ERRORS as error:
            report.add(
                "database",
                "fail",
                f"cannot reach PostgreSQL at {shown}: {describe(error)}",
                _database_fix(error),
            )
            return
        try:
            report.add("database", "ok", f"connected to {shown}")
            number, text = await connection.fetchrow(queries.SERVER_VERSION) or (0, "unknown")
            if number < MIN_POSTGRESQL:
                report.add(
                    "postgresql_version",
                    "fail",
                    f"PostgreSQL {text}: rabbit-archive needs 13 or newer",
                    "upgrade PostgreSQL",
                )
            else:
                report.add("postgresql_version", "ok", f"PostgreSQL {text}")
            rights = await connection.fetchrow(queries.CAPTURE_RIGHTS)
            if rights is not None:  # one row always: the query starts from a one-row table
                database_rights_findings(report, dict(rights.items()))
            try:
                schema_finding(report, await schema_version(connection), latest_version())
            except ArchiveError as error:
                report.add(
                    "schema_version", "fail", str(error), "give the role USAGE on schema rabbit_archive"
                )
            sent = time.time()
            now = await connection.fetchval(queries.NOW)
            received = time.time()
            skew_finding(
                report,
                "PostgreSQL",
                now.timestamp() - (sent + received) / 2,
                MAX_DATABASE_SKEW,
                "synchronise the clocks (NTP) of this host and the database",
            )
        except DATABASE_ERRORS as error:
            report.add("database", "fail", f"reading PostgreSQL at {shown} failed: {describe(error)}")
        finally:
            with contextlib.suppress(*CONNECTION_ERRORS):
                await asyncio.wait_for(connection.close(), 5)

    async def _missing_database(self, url: str) -> None:
        """The daemon creates a missing database when its role may: say whether it may."""
        parts = urlsplit(url)
        name = unquote(parts.path[1:])
        maintenance = urlunsplit(parts._replace(path="/postgres"))
        may: bool | None = None
        with contextlib.suppress(*DATABASE_ERRORS):
            connection = await asyncio.wait_for(asyncpg.connect(maintenance), 30)
            try:
                may = bool(await connection.fetchval(queries.MAY_CREATE_DATABASE))
            finally:
                await connection.close()
        if may:
            self.report.add(
                "database", "ok", f"database {name!r} does not exist yet: the first start creates it"
            )
        else:
            self.report.add(
                "database",
                "fail",
                f"database {name!r} does not exist at {mask_url(url)} and the role may not create it",
                f'as an administrator: CREATE DATABASE "{name}"; '
                f'GRANT CREATE ON DATABASE "{name}" TO the capture role',
            )


def _management_detail(message: str, where: str) -> str:
    if "CERTIFICATE_VERIFY_FAILED" in message:
        start = message.find("certificate verify failed")
        reason = message[start:].split(" (", 1)[0] if start >= 0 else "CERTIFICATE_VERIFY_FAILED"
        return f"the management API's TLS certificate at {where} is not trusted: {reason}"
    return message


def _management_fix(message: str, user: str) -> str:
    if "set_user_tags" in message:
        return f"rabbitmqctl set_user_tags {user} management"
    if "rejected the credentials" in message:
        return "check the user and password of RABBIT_ARCHIVE_MANAGEMENT_URL (or RABBIT_ARCHIVE_AMQP_URL)"
    if "CERTIFICATE_VERIFY_FAILED" in message or "certificate verify failed" in message:
        return "trust the management API's certificate: RABBIT_ARCHIVE_MANAGEMENT_CA_FILE=/path/to/ca.pem"
    if "unreachable" in message:
        return "check RABBIT_ARCHIVE_MANAGEMENT_URL and that the rabbitmq_management plugin is enabled"
    return ""


def _database_fix(error: BaseException) -> str:
    if isinstance(error, ssl.SSLError):
        return "trust the server's certificate (sslrootcert= in RABBIT_ARCHIVE_DATABASE_URL)"
    return "check RABBIT_ARCHIVE_DATABASE_URL and that PostgreSQL runs"


async def check(settings: Settings) -> Report:
    """Run every check of `rabbit-capture check`."""
    return await Preflight(settings).run()
