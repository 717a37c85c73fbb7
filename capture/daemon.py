"""`rabbit-capture run`: wires settings, database, broker sessions, discovery and the HTTP endpoint."""

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import asyncpg

from rabbit_archive.archive.db import DATABASE_ERRORS, create_pool, database_error, remember_timestamps
from rabbit_archive.archive.errors import (
    ArchiveError,
    BrokerUnavailable,
    DatabaseUnavailable,
)
from rabbit_archive.archive.migrate import apply_migrations
from rabbit_archive.archive.signals import stop_on_signals
from rabbit_archive.archive.stopping import Backoff, sleep_unless
from rabbit_archive.capture.consumer import VhostCapture
from rabbit_archive.capture.coverage import CoverageEvent, CoverageLog
from rabbit_archive.capture.discovery import BindingKeeper
from rabbit_archive.capture.events import watch_topology_events
from rabbit_archive.capture.health import Health
from rabbit_archive.capture.http import HealthServer
from rabbit_archive.capture.management import ManagementApi, VhostRefused, management_client
from rabbit_archive.capture.metrics import CaptureMetrics
from rabbit_archive.capture.store import PostgresStore
from rabbit_archive.config.settings import Settings, mask_url

log = logging.getLogger(__name__)

MAINTENANCE_INTERVAL = 600.0
COVERAGE_INTERVAL = 5.0


async def open_database(
    settings: Settings, stop: asyncio.Event, health: Health
) -> "asyncpg.Pool[asyncpg.Record] | None":
    """Connect (creating the database if allowed) and migrate, retrying until it works or stop."""
    backoff = Backoff(first=0.5, cap=10.0)
    while not stop.is_set():
        try:
            # A write that hangs on a half-open connection times out and is retried.
            pool = await create_pool(
                settings.database_url,
                create_database=True,
                max_size=4,
                command_timeout=60,
                init=remember_timestamps,
            )
            try:
                applied = await _migrate(pool)
            except BaseException:
                await pool.close()
                raise
            if applied:
                log.info("schema_migrated", extra={"versions": applied})
            health.set_database_ok(True)
            return pool
        except DatabaseUnavailable as error:
            # Unreachable, or refusing (read-only after a failover, disk full): wait, not exit.
            health.set_database_ok(False)
            delay = backoff.next()
            log.warning("database_unavailable", extra={"error": str(error), "retry_in": round(delay, 1)})
            await sleep_unless(stop, delay)
    return None


async def check_management_access(api: ManagementApi, vhosts: tuple[str, ...], *, isolated: bool) -> None:
    """Stop at start, in one line (AccessRefused), when the management API refuses the user.

    A management API that cannot be reached is only logged: discovery retries it. With
    several vhosts, one the user may not see is left to its capture task, which reports it
    and tries again; only a refusal of the user as such (login, tag) stops the daemon.
    """
    for vhost in vhosts:
        try:
            await api.exchanges(vhost)
        except VhostRefused as error:
            if not isolated:
                raise
            log.error("vhost_unavailable", extra={"vhost": vhost, "error": str(error)})
        except BrokerUnavailable as error:
            log.warning("management_unavailable", extra={"error": str(error)})
            return


async def _migrate(pool: "asyncpg.Pool[asyncpg.Record]") -> list[int]:
    """Apply the schema on one connection of the pool."""
    try:
        async with pool.acquire() as connection:
            return await apply_migrations(connection)
    except DATABASE_ERRORS as error:
        raise database_error(error, "applying the archive schema") from None


async def _heartbeat(health: Health, stop: asyncio.Event) -> None:
    while not stop.is_set():
        health.beat()
        await sleep_unless(stop, 1.0)


async def _maintain_partitions(store: PostgresStore, settings: Settings, stop: asyncio.Event) -> None:
    # A database that refuses (read-only, disk full, a lock timeout) is reported and retried;
    # capture goes on meanwhile (rows of a day without its partition land in the default one).
    backoff = Backoff(first=5.0, cap=60.0)
    while not stop.is_set():
        try:
            created = await store.ensure_partitions(settings.partition_days_ahead)
            if created:
                log.info("partitions_created", extra={"count": created})
            if settings.retention is not None:
                dropped = await store.prune(settings.retention)
                if dropped:
                    log.info("retention_pruned", extra={"partitions": dropped})
            analyzed = await store.analyze_closed_partitions()
            if analyzed:
                log.info("partitions_analyzed", extra={"partitions": analyzed})
        except DatabaseUnavailable as error:
            delay = backoff.next()
            log.warning("maintenance_failed", extra={"error": str(error), "retry_in": round(delay, 1)})
            await sleep_unless(stop, delay)
            continue
        backoff.reset()
        await sleep_unless(stop, MAINTENANCE_INTERVAL)


async def _record_coverage(coverage: CoverageLog, stop: asyncio.Event) -> None:
    """Write the coverage history every few seconds, and once more on the way out."""
    try:
        while not stop.is_set():
            await coverage.flush()
            await sleep_unless(stop, COVERAGE_INTERVAL)
    finally:
        await coverage.flush()


async def _capture(settings: Settings, stop: asyncio.Event, health: Health, metrics: CaptureMetrics) -> None:
    pool = await open_database(settings, stop, health)
    if pool is None:
        return
    store = PostgresStore(pool, strip_delivery_count=settings.queue_type == "quorum")
    try:
        async with management_client(settings) as client:
            api = ManagementApi(client, on_request=metrics.management_requests.inc)
            vhosts = settings.capture_vhosts
            isolated = vhosts == ("*",) or len(vhosts) > 1
            if vhosts == ("*",):
                vhosts = tuple(await api.vhosts())
            await check_management_access(api, vhosts, isolated=isolated)
            health.vhosts = vhosts
            coverage = CoverageLog(pool)
            for vhost in vhosts:
                coverage.note(CoverageEvent(vhost, None, "source", settings.source))
            keeper = BindingKeeper(settings, api, metrics, pool, coverage)
            tracing = settings.source in ("firehose", "bindings+default")
            async with _tracing(api, vhosts, tracing), asyncio.TaskGroup() as group:
                group.create_task(_heartbeat(health, stop), name="heartbeat")
                group.create_task(_maintain_partitions(store, settings, stop), name="partitions")
                group.create_task(_record_coverage(coverage, stop), name="coverage")
                if settings.source != "firehose":
                    group.create_task(
                        watch_topology_events(settings, settings.event_vhost, keeper.nudge, stop),
                        name="topology-events",
                    )
                for vhost in vhosts:
                    capture = VhostCapture(
                        settings, vhost, store, metrics, health, stop, keeper, isolated=isolated
                    )
                    group.create_task(capture.run(), name=f"capture:{vhost}")
    finally:
        await pool.close()


@contextlib.asynccontextmanager
async def _tracing(api: ManagementApi, vhosts: tuple[str, ...], wanted: bool) -> AsyncIterator[None]:
    """For SOURCE=firehose: tracing on in each vhost while capturing, then as it was before."""
    if not wanted:
        yield
        return
    before = {vhost: await api.tracing(vhost) for vhost in vhosts}
    try:
        for vhost in vhosts:
            await api.set_tracing(vhost, True)
        log.info("tracing_on", extra={"vhosts": list(vhosts)})
        yield
    finally:
        for vhost, was_on in before.items():
            if not was_on:
                try:
                    await api.set_tracing(vhost, False)
                except ArchiveError as error:
                    log.error("tracing_not_restored", extra={"vhost": vhost, "error": str(error)})
        log.info("tracing_restored", extra={"vhosts": list(vhosts)})


async def _outcome(main: "asyncio.Task[None]") -> None:
    """Wait for the capture task; surface the first ArchiveError of its task group."""
    try:
        await main
    except asyncio.CancelledError:
        return
    except BaseExceptionGroup as group:
        matched, _ = group.split(ArchiveError)
        if matched is None:
            raise
        first: BaseException = matched
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from None


async def run_daemon(settings: Settings) -> None:
    """Run until SIGTERM/SIGINT; raise ArchiveError for what the operator must fix."""
    stop = asyncio.Event()
    health = Health()
    metrics = CaptureMetrics()
    server = HealthServer(settings.http_host, settings.http_port, health, metrics)
    server.start()
    log.info(
        "starting",
        extra={
            "amqp_url": mask_url(settings.amqp_url),
            "database_url": mask_url(settings.database_url),
            "management_url": settings.management_base,
            "http_port": server.port,
        },
    )
    try:
        with stop_on_signals(stop, logged=True):
            main = asyncio.create_task(_capture(settings, stop, health, metrics), name="capture")
            stopping = asyncio.create_task(stop.wait(), name="stop-signal")
            await asyncio.wait({main, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not main.done():
                # Phase two of shutdown: the grace period is over, cancel whatever is left.
                done, _ = await asyncio.wait({main}, timeout=settings.shutdown_grace)
                if not done:
                    log.warning("shutdown_deadline", extra={"grace_seconds": settings.shutdown_grace})
                    main.cancel()
            stopping.cancel()
            await _outcome(main)
    finally:
        server.stop()
    log.info("stopped")
