"""Connections to the archive database, created on first use when the role may."""

import contextlib
from typing import Any, TypeAlias
from urllib.parse import unquote, urlsplit, urlunsplit

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from rabbit_archive.archive import queries
from rabbit_archive.archive.errors import AccessRefused, DatabaseRefused, DatabaseUnavailable, describe
from rabbit_archive.config.settings import mask_url

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
    # What asyncpg raises when PostgreSQL ends the session during a transaction and the pool
    # then resets the connection ("cannot switch to state 15; another operation (2) is in
    # progress", asyncpg issue 784). The pool has already terminated that connection, so a
    # retry gets a fresh one: met in a PostgreSQL restart under load.
    asyncpg.InternalClientError,
    TimeoutError,
)

# Every error a database call can end with that is not a bug of ours: the connection errors
# above, anything PostgreSQL answers with, and a prepared statement outdated by DDL.
DATABASE_ERRORS: tuple[type[BaseException], ...] = (
    *CONNECTION_ERRORS,
    asyncpg.PostgresError,
    asyncpg.OutdatedSchemaCacheError,
)

# What an operator should read for the refusals that come from the database's own state.
_CAUSES: tuple[tuple[type[asyncpg.PostgresError], str], ...] = (
    (
        asyncpg.ReadOnlySQLTransactionError,
        "the database is read-only (a standby, or default_transaction_read_only)",
    ),
    (asyncpg.DiskFullError, "the database's disk is full"),
    (asyncpg.InsufficientResourcesError, "the database is out of resources"),
    (asyncpg.QueryCanceledError, "the statement was cancelled (statement_timeout or an operator)"),
    (asyncpg.DeadlockDetectedError, "a deadlock was detected"),
    (asyncpg.SerializationError, "a serialization failure"),
    (asyncpg.TransactionRollbackError, "the transaction was rolled back"),
    (asyncpg.LockNotAvailableError, "a lock was not available in time (lock_timeout)"),
    (asyncpg.InsufficientPrivilegeError, "permission denied"),
)


def database_error(error: BaseException, doing: str) -> DatabaseUnavailable:
    """The project's error for a driver error met while `doing` something: both mean retry later.

    PostgreSQL's own refusals become DatabaseRefused, naming the cause; lost or unreachable
    servers DatabaseUnavailable.
    """
    if isinstance(error, asyncpg.PostgresError) and not isinstance(error, CONNECTION_ERRORS):
        cause = next((text for kind, text in _CAUSES if isinstance(error, kind)), "PostgreSQL refused it")
        return DatabaseRefused(f"{doing}: {cause}: {describe(error)}")
    return DatabaseUnavailable(f"{doing}: {describe(error)}")


def _database_name(url: str) -> str:
    path = urlsplit(url).path
    return unquote(path[1:]) if len(path) > 1 else ""


def _maintenance_url(url: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path="/postgres"))


async def _create_database(url: str) -> None:
    name = _database_name(url)
    connection = await asyncpg.connect(_maintenance_url(url))
    try:
        statement = await connection.fetchval(queries.CREATE_DATABASE, name)
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
