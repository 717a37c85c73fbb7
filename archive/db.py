"""Connections to the archive database, created on first use when the role may."""

import contextlib
from typing import Any, TypeAlias
from urllib.parse import unquote, urlsplit, urlunsplit

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from archive.errors import AccessRefused, DatabaseUnavailable, describe
from config.settings import mask_url

# A connection of its own or one borrowed from a pool: both run the same queries.
Connection: TypeAlias = "asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]"

# Errors that mean "PostgreSQL is not there right now" rather than "the request was wrong".
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.InterfaceError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.TooManyConnectionsError,
    TimeoutError,
)


def _database_name(url: str) -> str:
    path = urlsplit(url).path
    return unquote(path[1:]) if len(path) > 1 else ""


def _maintenance_url(url: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path="/postgres"))


async def _create_database(url: str) -> None:
    name = _database_name(url)
    connection = await asyncpg.connect(_maintenance_url(url))
    try:
        # The server quotes the identifier (format %I): no name is ever spliced in by hand.
        statement = await connection.fetchval("SELECT format('CREATE DATABASE %I', $1::text)", name)
        # Another replica may have created it first.
        with contextlib.suppress(asyncpg.DuplicateDatabaseError):
            await connection.execute(statement)
    finally:
        await connection.close()


async def create_pool(
    url: str, *, min_size: int = 1, max_size: int = 4, create_database: bool = False, **kwargs: Any
) -> "asyncpg.Pool[asyncpg.Record]":
    """Open a pool on DATABASE_URL, creating the database first when asked and it is missing."""
    try:
        try:
            return await asyncpg.create_pool(url, min_size=min_size, max_size=max_size, **kwargs)
        except asyncpg.InvalidCatalogNameError:
            if not create_database:
                raise
            await _create_database(url)
            return await asyncpg.create_pool(url, min_size=min_size, max_size=max_size, **kwargs)
    except asyncpg.InvalidCatalogNameError:
        raise DatabaseUnavailable(
            f"database {_database_name(url)!r} does not exist at {mask_url(url)}: "
            "run 'rabbit-capture migrate' or create it"
        ) from None
    except asyncpg.InsufficientPrivilegeError as error:
        raise AccessRefused(
            f"PostgreSQL at {mask_url(url)} refused: {error.args[0] if error.args else error} "
            "(see 'Least privilege' in README.md)"
        ) from None
    except asyncpg.InvalidPasswordError:
        raise DatabaseUnavailable(f"PostgreSQL at {mask_url(url)} rejected the credentials") from None
    except CONNECTION_ERRORS as error:
        raise DatabaseUnavailable(f"cannot reach PostgreSQL at {mask_url(url)}: {describe(error)}") from None
