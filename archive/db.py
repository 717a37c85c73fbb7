"""Connections to the archive database, created on first use when the role may."""

import contextlib
from datetime import UTC, date, datetime, timedelta, timezone
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


# asyncpg's stand-ins for PostgreSQL's infinite timestamps (naive), and their wire values.
_INFINITY = datetime.max
_NEGATIVE_INFINITY = datetime.min
_PG_INFINITY = 2**63 - 1
_PG_NEGATIVE_INFINITY = -(2**63)
# asyncpg writes the microseconds of its stand-ins as the infinities, however they came about.
_INFINITY_MICROSECONDS = 252455615999999999
_NEGATIVE_INFINITY_MICROSECONDS = -63082281600000000
_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)


class RememberingTimestamptz:
    """asyncpg's conversion of timestamptz, done in Python, the last value encoded remembered.

    Every row of a capture batch carries the same captured_at, and asyncpg converted it again for
    each row (astimezone and a subtraction on Python objects): 1.3 µs of the 2.8 µs its COPY took to
    encode a 512-byte message's row. Registered with format="tuple" (PostgreSQL's microseconds since
    2000-01-01 UTC, written by asyncpg); every other value converts exactly as asyncpg's own codec
    does (tests/integration/test_db_codecs.py compares the two over generated values).
    """

    def __init__(self) -> None:
        self._value: object = None
        self._encoded: tuple[int] = (0,)

    def encode(self, value: object) -> tuple[int]:
        """(microseconds since 2000-01-01 UTC,) of a datetime, or of a date at local midnight."""
        if value is self._value:
            return self._encoded
        encoded = (_microseconds(value),)
        self._value, self._encoded = value, encoded
        return encoded

    @staticmethod
    def decode(parts: tuple[int]) -> datetime:
        """The aware datetime (UTC) of PostgreSQL's microseconds, or asyncpg's infinities."""
        (microseconds,) = parts
        if microseconds == _PG_INFINITY:
            return _INFINITY
        if microseconds == _PG_NEGATIVE_INFINITY:
            return _NEGATIVE_INFINITY
        seconds, rest = divmod(microseconds, 1_000_000)
        return _PG_EPOCH + timedelta(0, seconds, rest)


def _microseconds(value: object) -> int:
    if not isinstance(value, datetime):
        if not isinstance(value, date):
            raise TypeError(
                f"expected a datetime.date or datetime.datetime instance, got {type(value).__name__!r}"
            )
        local = datetime.now(UTC).astimezone().utcoffset()
        value = datetime(value.year, value.month, value.day, tzinfo=timezone(local or timedelta(0)))
    if value == _INFINITY:
        return _PG_INFINITY
    if value == _NEGATIVE_INFINITY:
        return _PG_NEGATIVE_INFINITY
    delta = value.astimezone(UTC) - _PG_EPOCH
    microseconds = (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds
    if microseconds == _INFINITY_MICROSECONDS:
        return _PG_INFINITY
    if microseconds == _NEGATIVE_INFINITY_MICROSECONDS:
        return _PG_NEGATIVE_INFINITY
    return microseconds


async def remember_timestamps(connection: Connection) -> None:
    """A pool's init: timestamptz through RememberingTimestamptz, one per connection."""
    codec = RememberingTimestamptz()
    await connection.set_type_codec(
        "timestamptz", schema="pg_catalog", encoder=codec.encode, decoder=codec.decode, format="tuple"
    )
