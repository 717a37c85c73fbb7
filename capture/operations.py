"""What the `rabbit-capture` commands other than `run` do, one async function each (the CLI only prints)."""

from datetime import timedelta
from typing import Any

from rabbit_archive.archive.checks import Report
from rabbit_archive.archive.db import create_pool
from rabbit_archive.archive.migrate import apply_migrations
from rabbit_archive.capture.preflight import Preflight
from rabbit_archive.capture.status import collect_status
from rabbit_archive.capture.store import prune as prune_partitions
from rabbit_archive.config import Settings


async def migrate(settings: Settings) -> list[int]:
    """Apply the schema (creating the database if it is missing); the versions applied."""
    pool = await create_pool(settings.database_url, create_database=True, max_size=1)
    try:
        async with pool.acquire() as connection:
            return await apply_migrations(connection)
    finally:
        await pool.close()


async def prune(settings: Settings, older_than: timedelta) -> int:
    """Drop the daily partitions entirely older than now - older_than; how many."""
    pool = await create_pool(settings.database_url, max_size=1)
    try:
        return await prune_partitions(pool, older_than)
    finally:
        await pool.close()


async def status(settings: Settings) -> dict[str, Any]:
    """The `status --json` report (README "Operations")."""
    return await collect_status(settings)


async def check(settings: Settings) -> Report:
    """The `check` preflight: every problem capture would meet, each with its fix; changes nothing."""
    return await Preflight(settings).run()
