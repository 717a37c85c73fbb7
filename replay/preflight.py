"""`rabbit-replay check`: whether a replay could run here, asked of the servers without changing anything.

PostgreSQL: the archive schema and the privileges replays need (README "Least privilege":
USAGE on the schema, SELECT on messages and schema_migrations, SELECT, INSERT and UPDATE on
replays). RabbitMQ: the target broker and vhost let the user in, every exchange a replay
would publish to exists, and the user may write to it. Write is asked with exchange.unbind
from a source exchange that does not exist, with arguments nobody binds with: the broker
checks write on the destination first (for the default exchange, on `amq.default`, as it does
for a publish) and then refuses or answers "not found" about the source, so nothing is ever
unbound and nothing is published.
"""

import asyncio
import contextlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import aiormq
import aiormq.abc
import asyncpg

from rabbit_archive.archive import frames, queries
from rabbit_archive.archive.checks import Probes, Report, connection_failure, probe_arguments
from rabbit_archive.archive.db import DATABASE_ERRORS
from rabbit_archive.archive.errors import ArchiveError, describe
from rabbit_archive.config.settings import Settings, mask_url
from rabbit_archive.replay import history
from rabbit_archive.replay.operations import WRITE_HISTORY

# A publish to the default exchange is checked against this name.
DEFAULT_EXCHANGE = "amq.default"


@dataclass(frozen=True)
class Targets:
    """Where a replay would publish: one exchange, one queue, or the original exchanges."""

    to_exchange: str | None = None
    to_queue: str | None = None
    exchanges: tuple[str, ...] = ()
    target_url: str | None = None


def write_refused(reply: str, probe_source: str) -> bool:
    """Whether a refused exchange.unbind was refused for write on its destination.

    The broker checks write on the destination, then read on the source; a refusal that
    names the (made-up) source means write was granted.
    """
    return f"exchange '{probe_source}'" not in reply


class ReplayPreflight:
    """Runs every check of `rabbit-replay check`."""

    def __init__(self, settings: Settings, targets: Targets) -> None:
        self.settings = settings
        self.targets = targets
        self.url = targets.target_url or settings.replay_target_url or settings.amqp_url
        parts = urlsplit(self.url)
        self.vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
        self.user = unquote(parts.username or "guest")
        self.report = Report()

    async def run(self) -> Report:
        """Every check; unreachable servers are findings too."""
        exchanges = await self._database()
        await self._broker(exchanges)
        return self.report

    async def _database(self) -> list[str]:
        """The archive's schema and the replay role's privileges; the original exchanges to check."""
        url, report = self.settings.database_url, self.report
        try:
            connection = await asyncio.wait_for(asyncpg.connect(url), 30)
        except DATABASE_ERRORS as error:
            report.add(
                "database",
                "fail",
                f"cannot use PostgreSQL at {mask_url(url)}: {describe(error)}",
                "check RABBIT_ARCHIVE_DATABASE_URL",
            )
            return list(self.targets.exchanges)
        try:
            report.add("database", "ok", f"connected to {mask_url(url)}")
            try:
                await history.check_schema(connection)
                report.add("schema_version", "ok", "the archive schema is there and recent enough")
            except ArchiveError as error:
                report.add("schema_version", "fail", str(error))
            rows = await connection.fetch(
                queries.MISSING_PRIVILEGES,
                [privilege for privilege, _ in WRITE_HISTORY],
                [table for _, table in WRITE_HISTORY],
            )
            role = await connection.fetchval(queries.CURRENT_USER)
            for row in rows:
                missing = str(row[0])
                report.add(
                    "database_rights",
                    "fail",
                    f"PostgreSQL role {role!r} lacks {missing}",
                    grant_for(missing, str(role)),
                )
            if not rows:
                report.add("database_rights", "ok", f"role {role!r} may read the archive and write replays")
            return await self._original_exchanges(connection)
        except DATABASE_ERRORS as error:
            report.add("database", "fail", f"reading PostgreSQL at {mask_url(url)} failed: {describe(error)}")
            return list(self.targets.exchanges)
        finally:
            with contextlib.suppress(*DATABASE_ERRORS):
                await asyncio.wait_for(connection.close(), 5)

    async def _original_exchanges(self, connection: "asyncpg.Connection[asyncpg.Record]") -> list[str]:
        targets = self.targets
        if targets.exchanges or targets.to_exchange or targets.to_queue:
            return list(targets.exchanges)
        # Nothing named: the exchanges archived from the target vhost over the last day.
        try:
            rows = await connection.fetch(queries.RECENT_BY_EXCHANGE)
        except asyncpg.InsufficientPrivilegeError:
            return []
        return sorted({row["exchange"] for row in rows if row["vhost"] == self.vhost and row["exchange"]})

    async def _broker(self, exchanges: Sequence[str]) -> None:
        report, targets = self.report, self.targets
        try:
            connection = await asyncio.wait_for(
                frames.connect(
                    self.url, self.vhost, client_properties={"connection_name": "rabbit-replay check"}
                ),
                30,
            )
        except (aiormq.exceptions.AMQPError, OSError, TimeoutError) as error:
            detail, fix = connection_failure(error, mask_url(self.url), self.user, self.vhost)
            report.add("broker", "fail", detail, fix, self.vhost)
            return
        try:
            report.add("broker", "ok", f"connected to {mask_url(self.url)}", vhost=self.vhost)
            probes = Probes(connection)
            wanted = list(exchanges)
            if targets.to_exchange is not None:
                wanted.append(targets.to_exchange)
            if targets.to_queue is not None:
                exists, _ = await probes.ask(frames.queue_declare(targets.to_queue, passive=True))
                if exists == "not_found":
                    report.add(
                        "target",
                        "fail",
                        f"queue {targets.to_queue!r} does not exist in vhost {self.vhost!r}",
                        "check --to-queue (a replay never declares its target)",
                        self.vhost,
                    )
                await self._write(probes, DEFAULT_EXCHANGE, existing=True)
            for exchange in dict.fromkeys(wanted):
                exists, _ = await probes.ask(frames.exchange_declare(exchange, passive=True))
                if exists == "not_found":
                    report.add(
                        "target",
                        "fail",
                        f"exchange {exchange!r} does not exist in vhost {self.vhost!r}",
                        "declare it, or replay elsewhere (--to-exchange, --to-queue)",
                        self.vhost,
                    )
                    continue
                await self._write(probes, exchange, existing=exists == "accepted")
            if not wanted and targets.to_queue is None:
                report.add(
                    "permissions",
                    "warn",
                    "no exchange to check: none named and none archived from this vhost over the last day",
                    "name them: --exchange NAME (repeatable), --to-exchange or --to-queue",
                    self.vhost,
                )
        finally:
            with contextlib.suppress(aiormq.exceptions.AMQPError, OSError, TimeoutError):
                await asyncio.wait_for(connection.close(), 5)

    async def _write(self, probes: Probes, exchange: str, *, existing: bool) -> None:
        source = f"rabbit-archive-check-{uuid.uuid4().hex}"
        answer, text = await probes.ask(frames.exchange_unbind(exchange, source, "", probe_arguments()))
        if answer == "refused" and write_refused(text, source):
            self.report.add(
                "permissions",
                "fail",
                f"user {self.user!r} may not publish to exchange {exchange!r}: {text}",
                f"give it write on {exchange!r} in vhost {self.vhost!r}, e.g. rabbitmqctl set_permissions -p "
                f"{self.vhost} {self.user} '^$' '^({_regex(exchange)}|...)$' '^$' "
                "(see 'Least privilege' in README.md)",
                self.vhost,
            )
        elif answer in ("refused", "not_found", "accepted") and existing:
            self.report.add(
                "permissions", "ok", f"user {self.user!r} may publish to {exchange!r}", vhost=self.vhost
            )
        elif answer == "failed":
            self.report.add(
                "permissions", "fail", f"asking for write on {exchange!r} failed: {text}", vhost=self.vhost
            )


def _regex(name: str) -> str:
    return "".join("\\" + ch if ch in ".^$*+?()[]{}|\\" else ch for ch in name)


def grant_for(missing: str, role: str) -> str:
    """The GRANT for one line of MISSING_PRIVILEGES ('SELECT on rabbit_archive.messages')."""
    privilege, _, target = missing.partition(" on ")
    if target.startswith("schema "):
        return f'GRANT {privilege} ON SCHEMA {target.removeprefix("schema ")} TO "{role}"'
    return f'GRANT {privilege} ON {target} TO "{role}"'


async def check(settings: Settings, targets: Targets) -> Report:
    """Run every check of `rabbit-replay check`."""
    return await ReplayPreflight(settings, targets).run()
