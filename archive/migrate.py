"""Applies the numbered migrations in archive/migrations/ under an advisory lock."""

import re
from dataclasses import dataclass
from importlib import resources

import asyncpg

from rabbit_archive.archive import queries
from rabbit_archive.archive.db import DATABASE_ERRORS, Connection, database_error
from rabbit_archive.archive.errors import AccessRefused, describe

_NAME = re.compile(r"^(\d{4})_(\w+)\.sql$")


@dataclass(frozen=True)
class Migration:
    """One numbered SQL file."""

    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    """Every migration shipped with the package, in order."""
    found = []
    for entry in resources.files("rabbit_archive.archive").joinpath("migrations").iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), match.group(2), entry.read_text("utf-8")))
    return sorted(found, key=lambda migration: migration.version)


def latest_version() -> int:
    """The schema version this code expects."""
    return migrations()[-1].version


async def apply_migrations(connection: Connection) -> list[int]:
    """Bring the schema up to date; returns the versions applied now (empty when current).

    A role without the rights for it is one AccessRefused line, for the operator to fix; a
    database that cannot take the schema now (read-only, disk full, unreachable) is
    DatabaseUnavailable (DatabaseRefused), which the daemon retries.
    """
    try:
        return await _apply(connection)
    except asyncpg.InsufficientPrivilegeError as error:
        user = await connection.fetchval(queries.CURRENT_USER)
        raise AccessRefused(
            f"PostgreSQL refused to apply the archive schema as {user!r} ({describe(error)}): the "
            "capture role needs CREATE on the database and must own schema rabbit_archive "
            "(see 'Least privilege' in README.md)"
        ) from None
    except DATABASE_ERRORS as error:
        raise database_error(error, "applying the archive schema") from None


async def _apply(connection: Connection) -> list[int]:
    applied_now = []
    async with connection.transaction():
        await connection.execute(queries.MIGRATION_LOCK)
        await connection.execute(queries.MIGRATIONS_BOOTSTRAP)
        done = {row["version"] for row in await connection.fetch(queries.APPLIED_MIGRATIONS)}
        for migration in migrations():
            if migration.version in done:
                continue
            await connection.execute(migration.sql)
            await connection.execute(queries.RECORD_MIGRATION, migration.version, migration.name)
            applied_now.append(migration.version)
    return applied_now


async def schema_version(connection: Connection) -> int | None:
    """The newest applied migration, or None when the schema was never applied."""
    try:
        exists = await connection.fetchval(queries.SCHEMA_EXISTS)
        if not exists:
            return None
        version: int | None = await connection.fetchval(queries.SCHEMA_VERSION)
    except DATABASE_ERRORS as error:
        raise database_error(error, "reading the schema version") from None
    return version
