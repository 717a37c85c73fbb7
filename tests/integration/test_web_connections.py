"""The web console's database connections: every statement has a timeout, no transaction can write."""

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from rabbit_archive.archive.db import create_pool
from rabbit_archive.config.settings import Settings
from rabbit_archive.replay.web.app import Console, SlowQuery
from rabbit_archive.replay.web.server import console_database_url
from tests.support.services import Services

pytestmark = pytest.mark.integration


@pytest.fixture
async def console(services: Services) -> AsyncIterator[Console]:
    """A console on the server's postgres database with a 200 ms statement timeout."""
    url = console_database_url(services.database_url("postgres"), 0.2)
    pool = await create_pool(url, min_size=1, max_size=2)
    try:
        yield Console(Settings(database_url=url, web_statement_timeout=0.2), pool)
    finally:
        await pool.close()


@pytest.mark.timeout(30)
async def test_console_statements_have_a_timeout_and_transactions_are_read_only(console: Console) -> None:
    # Twice: the pool's RESET ALL on release goes back to the startup parameters, not the defaults.
    for _ in range(2):
        async with console.connection("reading settings") as connection:
            settings: dict[str, Any] = {
                name: await connection.fetchval(f"SHOW {name}")
                for name in ("statement_timeout", "default_transaction_read_only", "application_name")
            }
            assert settings == {
                "statement_timeout": "200ms",
                "default_transaction_read_only": "on",
                "application_name": "rabbit-replay web",
            }
            with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
                await connection.execute("CREATE TEMPORARY SEQUENCE console_cannot_write")
            await connection.execute("SET statement_timeout = 0")
    with pytest.raises(SlowQuery) as caught:
        async with console.connection("searching") as connection:
            await connection.execute("SELECT pg_sleep(2)")
    assert "searching took longer than 0.2 s" in str(caught.value)
    assert "narrow the search" in str(caught.value)
