"""Integration tests of the archive schema: migrations match schema.sql, run once, partition by UTC day."""

import asyncio
import glob
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, date, datetime, timedelta, timezone
from importlib import resources
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from rabbit_archive.archive import queries
from rabbit_archive.archive.migrate import apply_migrations, latest_version, migrations, schema_version

pytestmark = pytest.mark.integration

ADMIN_URL = os.environ.get("RABBIT_ARCHIVE_TEST_DATABASE_URL", "postgresql://root@127.0.0.1:5432/postgres")

CreateDatabase = Callable[[], Awaitable[str]]


def database_url(name: str) -> str:
    return urlunsplit(urlsplit(ADMIN_URL)._replace(path=f"/{name}"))


@pytest.fixture
async def create_database() -> AsyncIterator[CreateDatabase]:
    """Creates fresh, empty databases on demand; all of them are dropped at the end."""
    created: list[str] = []
    admin = await asyncpg.connect(ADMIN_URL)

    async def create() -> str:
        name = f"test_schema_{uuid.uuid4().hex}"
        await admin.execute(f'CREATE DATABASE "{name}"')
        created.append(name)
        return database_url(name)

    try:
        yield create
    finally:
        try:
            for name in created:
                await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


def find_pg_dump() -> str:
    """pg_dump on PATH, else the newest one Debian's postgresql packages install."""
    found = shutil.which("pg_dump")
    if found:
        return found
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/pg_dump"),
        key=lambda path: int(path.split("/")[4]) if path.split("/")[4].isdigit() else 0,
    )
    assert candidates, "pg_dump is needed to compare schemas: install postgresql-client"
    return candidates[-1]


async def dump_schema(url: str) -> str:
    """The DDL of schema rabbit_archive, without the per-run \\restrict keys of newer pg_dump."""
    process = await asyncio.create_subprocess_exec(
        find_pg_dump(),
        "--schema-only",
        "--no-owner",
        "--no-privileges",
        "--schema=rabbit_archive",
        f"--dbname={url}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    lines = [
        line
        for line in out.decode().splitlines()
        if not line.startswith(("\\restrict", "\\unrestrict", "-- Dumped from", "-- Dumped by"))
    ]
    return "\n".join(lines)


async def test_migrations_produce_the_canonical_schema(create_database: CreateDatabase) -> None:
    migrated_url, canonical_url = await create_database(), await create_database()

    connection = await asyncpg.connect(migrated_url)
    try:
        await apply_migrations(connection)
    finally:
        await connection.close()

    schema_sql = resources.files("rabbit_archive.archive").joinpath("schema.sql").read_text("utf-8")
    connection = await asyncpg.connect(canonical_url)
    try:
        await connection.execute(schema_sql)
    finally:
        await connection.close()

    migrated, canonical = await dump_schema(migrated_url), await dump_schema(canonical_url)
    # Sanity: the dump did see the tables, so an empty-vs-empty comparison cannot pass.
    assert "CREATE TABLE rabbit_archive.messages" in canonical
    assert "CREATE FUNCTION rabbit_archive.ensure_partitions" in canonical
    assert migrated == canonical


async def test_migrations_are_idempotent(create_database: CreateDatabase) -> None:
    connection = await asyncpg.connect(await create_database())
    try:
        assert await schema_version(connection) is None
        applied = await apply_migrations(connection)
        assert applied == [migration.version for migration in migrations()]
        assert applied[-1] == latest_version()
        assert await schema_version(connection) == latest_version()

        assert await apply_migrations(connection) == []
        assert await schema_version(connection) == latest_version()
        rows = await connection.fetch("SELECT version, name FROM rabbit_archive.schema_migrations")
        assert sorted((row["version"], row["name"]) for row in rows) == [
            (migration.version, migration.name) for migration in migrations()
        ]
    finally:
        await connection.close()


async def test_concurrent_migrations_apply_each_version_once(create_database: CreateDatabase) -> None:
    url = await create_database()
    first, second = await asyncpg.connect(url), await asyncpg.connect(url)
    try:
        results = await asyncio.gather(apply_migrations(first), apply_migrations(second))
        all_versions = [migration.version for migration in migrations()]
        assert sorted(results) == [[], all_versions]
        versions = await first.fetch(
            "SELECT version, count(*) AS n FROM rabbit_archive.schema_migrations GROUP BY version"
        )
        assert {row["version"]: row["n"] for row in versions} == dict.fromkeys(all_versions, 1)
        assert await schema_version(second) == latest_version()
    finally:
        await first.close()
        await second.close()


async def migrate_before(connection: asyncpg.Connection, version: int) -> None:
    """Apply the migrations older than `version`, as a database of an earlier release has them."""
    await connection.execute(queries.MIGRATIONS_BOOTSTRAP)
    for migration in migrations():
        if migration.version < version:
            await connection.execute(migration.sql)
            await connection.execute(queries.RECORD_MIGRATION, migration.version, migration.name)


async def test_fingerprints_pending_at_the_upgrade_to_one_row_per_batch_are_kept(
    create_database: CreateDatabase,
) -> None:
    """A daemon that crashed before 0011 left a row per fingerprint: the upgrade must keep them all."""
    connection = await asyncpg.connect(await create_database())
    try:
        await migrate_before(connection, 11)
        first, second, third = (bytes([n]) * 16 for n in (1, 2, 3))
        await connection.executemany(
            "INSERT INTO rabbit_archive.capture_pending"
            " (fingerprint, batch_id, session_id, vhost, created_at) VALUES ($1, $2, $3, $4, $5)",
            [
                (second, 7, 70, "v", datetime(2026, 1, 1, 0, 0, 2, tzinfo=UTC)),
                (first, 7, 70, "v", datetime(2026, 1, 1, 0, 0, 1, tzinfo=UTC)),
                (second, 7, 70, "v", datetime(2026, 1, 1, 0, 0, 3, tzinfo=UTC)),
                (third, 8, 80, "w", datetime(2026, 1, 1, 0, 0, 4, tzinfo=UTC)),
            ],
        )
        assert await apply_migrations(connection) == [migration.version for migration in migrations()[10:]]
        rows = await connection.fetch(
            "SELECT batch_id, session_id, vhost, created_at, fingerprints"
            " FROM rabbit_archive.capture_pending_batches ORDER BY batch_id"
        )
        assert [tuple(row) for row in rows] == [
            (7, 70, "v", datetime(2026, 1, 1, 0, 0, 1, tzinfo=UTC), first + second + second),
            (8, 80, "w", datetime(2026, 1, 1, 0, 0, 4, tzinfo=UTC), third),
        ]
        assert await connection.fetchval("SELECT to_regclass('rabbit_archive.capture_pending')") is None
    finally:
        await connection.close()


async def test_fingerprints_an_old_daemon_commits_while_the_upgrade_runs_are_kept(
    create_database: CreateDatabase,
) -> None:
    """The upgrade waits for a batch of the old version in flight and carries its fingerprints over."""
    url = await create_database()
    connection, old_daemon = await asyncpg.connect(url), await asyncpg.connect(url)
    try:
        await migrate_before(connection, 11)
        in_flight = old_daemon.transaction()
        await in_flight.start()
        # A retried batch of the old version reads the table first (did it commit?), then writes.
        await old_daemon.fetchval(
            "SELECT EXISTS (SELECT 1 FROM rabbit_archive.capture_pending WHERE batch_id = 1)"
        )
        upgrade = asyncio.ensure_future(apply_migrations(connection))
        await asyncio.sleep(0.5)
        await old_daemon.execute(
            "INSERT INTO rabbit_archive.capture_pending (fingerprint, batch_id, session_id, vhost)"
            " VALUES ($1, 1, 10, 'v')",
            b"\x01" * 16,
        )
        assert not upgrade.done()  # waiting for the batch in flight
        await in_flight.commit()
        await asyncio.wait_for(upgrade, timeout=10)
        rows = await connection.fetch(
            "SELECT batch_id, session_id, vhost, fingerprints FROM rabbit_archive.capture_pending_batches"
        )
        assert [tuple(row) for row in rows] == [(1, 10, "v", b"\x01" * 16)]
    finally:
        await connection.close()
        await old_daemon.close()


async def partitions(connection: asyncpg.Connection) -> list[str]:
    rows = await connection.fetch(
        """
        SELECT child.relname
        FROM pg_inherits
        JOIN pg_class child ON child.oid = pg_inherits.inhrelid
        WHERE pg_inherits.inhparent = 'rabbit_archive.messages'::regclass
        ORDER BY child.relname
        """
    )
    return [row["relname"] for row in rows]


async def insert_message(connection: asyncpg.Connection, captured_at: datetime) -> str:
    """Insert one message captured at that instant; returns the partition it landed in."""
    partition: str = await connection.fetchval(
        """
        INSERT INTO rabbit_archive.messages (
            captured_at, vhost, exchange, routing_key, redelivered,
            properties_raw, properties, body, body_size
        )
        VALUES ($1, '/', 'orders', 'order.created', false, '\\x0000'::bytea, '{}'::jsonb, 'hi'::bytea, 2)
        RETURNING tableoid::regclass::text
        """,
        captured_at,
    )
    return partition


async def test_ensure_partitions_creates_daily_utc_partitions(create_database: CreateDatabase) -> None:
    connection = await asyncpg.connect(await create_database())
    try:
        await apply_migrations(connection)
        # A session far from UTC: the partition bounds must still be UTC midnights.
        await connection.execute("SET TIME ZONE 'Pacific/Auckland'")
        first_day = date(2031, 3, 30)

        created = await connection.fetchval("SELECT rabbit_archive.ensure_partitions($1, 3)", first_day)
        assert created == 3
        daily = ["messages_20310330", "messages_20310331", "messages_20310401"]
        assert await partitions(connection) == sorted(["messages_default", *daily])

        # Idempotent: nothing new, and an overlapping range only adds the missing day.
        assert await connection.fetchval("SELECT rabbit_archive.ensure_partitions($1, 3)", first_day) == 0
        assert await partitions(connection) == sorted(["messages_default", *daily])
        overlapping = first_day + timedelta(days=2)
        assert await connection.fetchval("SELECT rabbit_archive.ensure_partitions($1, 2)", overlapping) == 1
        daily.append("messages_20310402")
        assert await partitions(connection) == sorted(["messages_default", *daily])

        utc = UTC
        tiny = timedelta(microseconds=1)
        cases = {
            datetime(2031, 3, 30, 0, 0, tzinfo=utc): "rabbit_archive.messages_20310330",
            datetime(2031, 3, 30, 12, 0, tzinfo=utc): "rabbit_archive.messages_20310330",
            datetime(2031, 3, 31, tzinfo=utc) - tiny: "rabbit_archive.messages_20310330",
            datetime(2031, 3, 31, 0, 0, tzinfo=utc): "rabbit_archive.messages_20310331",
            datetime(2031, 4, 1, 23, 59, 59, tzinfo=utc): "rabbit_archive.messages_20310401",
            datetime(2031, 4, 2, 0, 0, tzinfo=utc): "rabbit_archive.messages_20310402",
            datetime(2031, 3, 30, tzinfo=utc) - tiny: "rabbit_archive.messages_default",
            datetime(2031, 4, 3, 0, 0, tzinfo=utc): "rabbit_archive.messages_default",
            # Local midnight in Auckland (UTC+13 then) is still the previous UTC day.
            datetime(2031, 3, 31, 0, 30, tzinfo=timezone(timedelta(hours=13))): (
                "rabbit_archive.messages_20310330"
            ),
        }
        landed = {captured_at: await insert_message(connection, captured_at) for captured_at in cases}
        assert landed == cases
        assert await connection.fetchval("SELECT count(*) FROM rabbit_archive.messages") == len(cases)
    finally:
        await connection.close()
