"""Unit tests of the database error boundary: the database's state means retry, one row's data means split."""

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any, cast

import asyncpg
import pytest

from rabbit_archive.archive.db import CONNECTION_ERRORS, database_error
from rabbit_archive.archive.errors import AccessRefused, DatabaseRefused, DatabaseUnavailable
from rabbit_archive.archive.migrate import apply_migrations, migrations, schema_version
from rabbit_archive.archive.records import MESSAGE_COLUMNS
from rabbit_archive.capture import daemon
from rabbit_archive.capture.batching import Delivery
from rabbit_archive.capture.health import Health
from rabbit_archive.capture.store import PostgresStore

POISON = b"poison"
_BODY = MESSAGE_COLUMNS.index("body")
_PROPERTIES = MESSAGE_COLUMNS.index("properties")

# What the database's own state makes PostgreSQL answer, with the cause an operator reads.
REFUSALS: list[tuple[asyncpg.PostgresError, str]] = [
    (asyncpg.ReadOnlySQLTransactionError("cannot execute COPY FROM in a read-only transaction"), "read-only"),
    (asyncpg.DiskFullError("could not extend file: No space left on device"), "disk is full"),
    (asyncpg.QueryCanceledError("canceling statement due to statement timeout"), "cancelled"),
    (asyncpg.SerializationError("could not serialize access due to concurrent update"), "serialization"),
    (asyncpg.DeadlockDetectedError("deadlock detected"), "deadlock"),
    (asyncpg.LockNotAvailableError("canceling statement due to lock timeout"), "lock"),
    (asyncpg.OutOfMemoryError("out of memory"), "out of resources"),
    (asyncpg.InsufficientPrivilegeError("permission denied for table messages"), "permission denied"),
    (asyncpg.UndefinedTableError('relation "rabbit_archive.messages" does not exist'), "refused"),
    (asyncpg.InFailedSQLTransactionError("current transaction is aborted"), "refused"),
]

# What one row's content makes PostgreSQL answer: only that row is stored the poison way.
DATA_ERRORS: list[asyncpg.PostgresError] = [
    asyncpg.UntranslatableCharacterError("unsupported Unicode escape sequence"),
    asyncpg.CharacterNotInRepertoireError("invalid byte sequence for encoding UTF8: 0x00"),
    asyncpg.ProgramLimitExceededError("total size of jsonb object elements exceeds the maximum"),
    asyncpg.InvalidTextRepresentationError("invalid input syntax for type json"),
]

# The server or the socket is gone: retried as well, but not reported as a refusal.
LOST: list[BaseException] = [
    asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
    asyncpg.AdminShutdownError("terminating connection due to administrator command"),
    asyncpg.CannotConnectNowError("the database system is starting up"),
    ConnectionResetError("connection reset by peer"),
    asyncpg.InternalClientError("cannot switch to state 15; another operation (2) is in progress"),
    TimeoutError(),
]


def _ids(cases: list[Any]) -> list[str]:
    return [type(case[0] if isinstance(case, tuple) else case).__name__ for case in cases]


class FakeConnection:
    """Answers the store's and the migrator's calls in memory; `fail` decides which call raises."""

    def __init__(self, fail: Callable[[str, Any], BaseException | None]) -> None:
        self.fail = fail
        self.copied: list[tuple[str, list[tuple[Any, ...]]]] = []

    def _check(self, what: str, detail: Any) -> None:
        error = self.fail(what, detail)
        if error is not None:
            raise error

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        yield

    async def execute(self, query: str, *args: Any) -> str:
        self._check("execute", query)
        return "OK"

    async def fetchval(self, query: str, *args: Any) -> Any:
        self._check("fetchval", query)
        return 0

    async def fetch(self, query: str, *args: Any) -> list[Any]:
        self._check("fetch", query)
        if "schema_migrations" in query:
            return [{"version": migration.version} for migration in migrations()]
        return []

    async def copy_records_to_table(self, table: str, *, records: list[tuple[Any, ...]], **_: Any) -> str:
        self._check("copy", (table, records))
        self.copied.append((table, list(records)))
        return "COPY"


class FakePool:
    """The part of asyncpg.Pool the store uses, handing out one FakeConnection."""

    def __init__(self, connection: FakeConnection) -> None:
        self.connection = connection
        self.closed = False

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[FakeConnection]:
        yield self.connection
        # Giving a connection back resets it: a lost session can fail there too.
        self.connection._check("release", None)

    async def execute(self, query: str, *args: Any) -> str:
        return await self.connection.execute(query, *args)

    async def close(self) -> None:
        self.closed = True


def store_failing(fail: Callable[[str, Any], BaseException | None]) -> tuple[PostgresStore, FakeConnection]:
    connection = FakeConnection(fail)
    return PostgresStore(FakePool(connection)), connection  # type: ignore[arg-type]


def deliveries(*bodies: bytes) -> list[Delivery]:
    return [
        Delivery(tag, False, "orders", f"key.{tag}", b"\x00\x00", body) for tag, body in enumerate(bodies, 1)
    ]


def on_copy(error: BaseException) -> Callable[[str, Any], BaseException | None]:
    """Fail every COPY of messages."""
    return lambda what, detail: error if what == "copy" and detail[0] == "messages" else None


def on_poison_copy(error: BaseException) -> Callable[[str, Any], BaseException | None]:
    """Fail a COPY of messages holding a poison row whose views were not yet replaced."""

    def fail(what: str, detail: Any) -> BaseException | None:
        if what != "copy" or detail[0] != "messages":
            return None
        for row in detail[1]:
            if row[_BODY] == POISON and "$unstorable" not in row[_PROPERTIES]:
                return error
        return None

    return fail


def always(error: BaseException) -> Callable[[str, Any], BaseException | None]:
    return lambda what, detail: error


@pytest.mark.parametrize(("error", "cause"), REFUSALS, ids=_ids(REFUSALS))
def test_a_refusal_of_the_database_becomes_database_refused_naming_its_cause(
    error: asyncpg.PostgresError, cause: str
) -> None:
    translated = database_error(error, "writing a batch")
    assert isinstance(translated, DatabaseRefused)
    assert isinstance(translated, DatabaseUnavailable)  # so every retry path already handles it
    text = str(translated)
    assert text.startswith("writing a batch: ")
    assert cause in text
    assert str(error) in text
    assert "\n" not in text


@pytest.mark.parametrize("error", LOST, ids=_ids(LOST))
def test_a_lost_database_stays_database_unavailable(error: BaseException) -> None:
    assert isinstance(error, CONNECTION_ERRORS)
    translated = database_error(error, "creating partitions")
    assert type(translated) is DatabaseUnavailable
    assert str(translated).startswith("creating partitions: ")


@pytest.mark.parametrize(("error", "cause"), REFUSALS, ids=_ids(REFUSALS))
async def test_a_batch_the_database_refuses_is_retried_whole_not_split(
    error: asyncpg.PostgresError, cause: str
) -> None:
    store, connection = store_failing(on_copy(error))
    with pytest.raises(DatabaseRefused, match=cause) as raised:
        await store.write_batch("/", deliveries(b"a", b"b", POISON, b"d"), batch_id=7, forget=[])
    assert raised.value.__cause__ is error
    assert connection.copied == []  # no row was taken for poison: the batch stays unacknowledged


@pytest.mark.parametrize(("error", "cause"), REFUSALS, ids=_ids(REFUSALS))
async def test_a_refusal_while_a_batch_is_being_split_still_retries_the_whole_batch(
    error: asyncpg.PostgresError, cause: str
) -> None:
    data_error = asyncpg.UntranslatableCharacterError("unsupported Unicode escape sequence")
    calls = 0

    def fail(what: str, detail: Any) -> BaseException | None:
        nonlocal calls
        if what != "copy" or detail[0] != "messages":
            return None
        calls += 1
        # The first attempt meets the bad row; then the database goes read-only, full, ...
        return data_error if calls == 1 else error

    store, _ = store_failing(fail)
    with pytest.raises(DatabaseRefused, match=cause):
        await store.write_batch("/", deliveries(b"a", POISON), batch_id=7, forget=[])


@pytest.mark.parametrize("error", LOST, ids=_ids(LOST))
async def test_a_batch_that_loses_the_database_is_retried(error: BaseException) -> None:
    store, _ = store_failing(on_copy(error))
    with pytest.raises(DatabaseUnavailable):
        await store.write_batch("/", deliveries(b"a"), batch_id=7, forget=[])


@pytest.mark.parametrize("error", LOST, ids=_ids(LOST))
async def test_a_batch_whose_connection_fails_on_release_is_retried(error: BaseException) -> None:
    # PostgreSQL restarted after the rows were sent: the commit's outcome is unknown, and the
    # retry's BATCH_COMMITTED check decides.
    store, _ = store_failing(lambda what, _detail: error if what == "release" else None)
    with pytest.raises(DatabaseUnavailable):
        await store.write_batch("/", deliveries(b"a"), batch_id=7, forget=[])


@pytest.mark.parametrize("error", DATA_ERRORS, ids=_ids(DATA_ERRORS))
async def test_a_data_error_of_one_row_still_splits_the_batch(error: asyncpg.PostgresError) -> None:
    store, connection = store_failing(on_poison_copy(error))
    result = await store.write_batch("/", deliveries(b"a", b"b", POISON, b"d", b"e"), batch_id=7, forget=[])
    assert (result.stored, result.unstorable) == (5, 1)
    stored = [row for table, rows in connection.copied if table == "messages" for row in rows]
    assert sorted(row[_BODY] for row in stored) == sorted([b"a", b"b", POISON, b"d", b"e"])
    poison_row = next(row for row in stored if row[_BODY] == POISON)
    assert str(error) in poison_row[_PROPERTIES]


@pytest.mark.parametrize(("error", "cause"), REFUSALS, ids=_ids(REFUSALS))
async def test_forgetting_fingerprints_reports_a_refusal(error: asyncpg.PostgresError, cause: str) -> None:
    store, _ = store_failing(always(error))
    with pytest.raises(DatabaseRefused, match=cause):
        await store.forget_pending([1, 2])


@pytest.mark.parametrize(("error", "cause"), REFUSALS, ids=_ids(REFUSALS))
async def test_partition_upkeep_and_retention_report_a_refusal(
    error: asyncpg.PostgresError, cause: str
) -> None:
    store, _ = store_failing(always(error))
    with pytest.raises(DatabaseRefused, match=cause):
        await store.ensure_partitions(3)
    with pytest.raises(DatabaseRefused, match=cause):
        await store.prune(timedelta(days=30))


# A role without the rights is the operator's to fix: AccessRefused, tested below.
STATE_REFUSALS = [case for case in REFUSALS if not isinstance(case[0], asyncpg.InsufficientPrivilegeError)]


@pytest.mark.parametrize(("error", "cause"), STATE_REFUSALS, ids=_ids(STATE_REFUSALS))
async def test_migrations_report_a_refusal(error: asyncpg.PostgresError, cause: str) -> None:
    connection = FakeConnection(lambda what, detail: error if "CREATE SCHEMA" in str(detail) else None)
    with pytest.raises(DatabaseRefused, match=cause):
        await apply_migrations(connection)  # type: ignore[arg-type]
    with pytest.raises(DatabaseRefused, match=cause):
        await schema_version(FakeConnection(always(error)))  # type: ignore[arg-type]


async def test_migrations_without_the_rights_still_stop_at_start() -> None:
    denied = asyncpg.InsufficientPrivilegeError("permission denied for database archive")
    connection = FakeConnection(lambda what, detail: denied if "CREATE SCHEMA" in str(detail) else None)
    with pytest.raises(AccessRefused):
        await apply_migrations(connection)  # type: ignore[arg-type]


async def test_the_daemon_waits_for_a_read_only_database_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    read_only = asyncpg.ReadOnlySQLTransactionError("cannot execute CREATE SCHEMA in a read-only transaction")
    attempts: list[FakePool] = []

    async def create_pool(url: str, **_: Any) -> FakePool:
        # Read-only for the first two attempts, then writable (the failover is over).
        error = read_only if len(attempts) < 2 else None
        attempts.append(FakePool(FakeConnection(lambda what, detail: error if what == "execute" else None)))
        return attempts[-1]

    async def no_sleep(stop: asyncio.Event, seconds: float) -> None:
        pass

    monkeypatch.setattr(daemon, "create_pool", create_pool)
    monkeypatch.setattr(daemon, "sleep_unless", no_sleep)
    health = Health()
    settings: Any = type("S", (), {"database_url": "postgresql://db/archive"})()
    pool = await daemon.open_database(settings, asyncio.Event(), health)
    assert pool is cast(object, attempts[-1])
    assert len(attempts) == 3
    assert [attempt.closed for attempt in attempts] == [True, True, False]
    health.vhosts = ("/",)
    health.set_consuming("/", True)
    health.set_bound("/", True)
    assert health.ready() == (True, "ok")


async def test_partition_upkeep_keeps_retrying_a_refusing_database(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    stop = asyncio.Event()
    delays: list[float] = []

    async def sleep(stop_event: asyncio.Event, seconds: float) -> None:
        delays.append(seconds)
        if len(delays) == 4:
            stop.set()

    disk_full = asyncpg.DiskFullError("could not extend file: No space left on device")
    store, _ = store_failing(always(disk_full))
    monkeypatch.setattr(daemon, "sleep_unless", sleep)
    settings: Any = type("S", (), {"partition_days_ahead": 3, "retention": timedelta(days=30)})()
    await daemon._maintain_partitions(store, settings, stop)
    assert len(delays) == 4
    assert all(delay < daemon.MAINTENANCE_INTERVAL for delay in delays)
    failures = [record for record in caplog.records if record.getMessage() == "maintenance_failed"]
    assert len(failures) == 4
    assert "disk is full" in failures[0].__dict__["error"]


def test_readiness_is_lost_while_writes_fail() -> None:
    health = Health(vhosts=("/",))
    health.set_consuming("/", True)
    health.set_bound("/", True)
    health.set_database_ok(True)
    assert health.ready()[0]
    health.set_database_ok(False)  # what the consumer does on DatabaseUnavailable
    ready, reason = health.ready()
    assert not ready
    assert "database" in reason


def test_readiness_waits_for_the_first_binding_round_which_later_sessions_do_not_repeat() -> None:
    health = Health(vhosts=("a", "b"))
    health.set_database_ok(True)
    health.set_consuming("a", True)
    health.set_consuming("b", True)
    health.set_bound("a", True)
    ready, reason = health.ready()
    assert not ready
    assert reason == "bindings not made yet in vhost 'b'"
    health.set_bound("b", True)
    assert health.ready() == (True, "ok")
    # A reconnect: the broker kept the bindings, so consuming again is enough.
    health.set_consuming("b", False)
    assert health.ready() == (False, "not consuming vhost 'b'")
    health.set_consuming("b", True)
    assert health.ready() == (True, "ok")
    # The archive queue deleted (the broker cancels the consumer): ready once bound again.
    health.set_bound("b", False)
    assert health.ready() == (False, "bindings not made yet in vhost 'b'")
    health.set_bound("b", True)
    assert health.ready() == (True, "ok")
