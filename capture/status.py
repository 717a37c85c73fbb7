"""`rabbit-capture status`: what is bound, what is skipped, lag, rows stored, newest capture."""

import asyncio
import contextlib
from datetime import datetime
from typing import Any

import aiormq

from archive import queries
from archive.db import CONNECTION_ERRORS, create_pool
from archive.errors import BrokerUnavailable, DatabaseUnavailable, describe
from archive.migrate import schema_version
from capture.discovery import BindingKeeper
from capture.management import ManagementApi, management_client
from capture.metrics import CaptureMetrics
from config.settings import Settings, mask_url


async def collect_status(settings: Settings) -> dict[str, Any]:
    """Gather the status report from the management API and the database."""
    async with management_client(settings) as client:
        api = ManagementApi(client)
        vhosts = settings.capture_vhosts
        if vhosts == ("*",):
            vhosts = tuple(await api.vhosts())
        keeper = BindingKeeper(settings, api, CaptureMetrics())
        exchanges: list[dict[str, Any]] = []
        skipped: list[dict[str, Any]] = []
        queue_depth = 0
        consumers = 0
        consumers_per_vhost: dict[str, int] = {}
        for vhost in vhosts:
            plan, current = await keeper.plan(vhost)
            by_exchange: dict[str, list[dict[str, Any]]] = {}
            for binding in sorted(current, key=lambda b: (b.exchange, b.routing_key)):
                by_exchange.setdefault(binding.exchange, []).append(
                    {"routing_key": binding.routing_key, "arguments": binding.arguments}
                )
            planned = {bound.exchange: bound for bound in plan.bound}
            for name, bindings in sorted(by_exchange.items()):
                bound = planned.get(name)
                exchanges.append(
                    {
                        "vhost": vhost,
                        "exchange": name,
                        "type": bound.type if bound else None,
                        "mode": bound.mode if bound else None,
                        "bindings": bindings,
                    }
                )
            skipped.extend(
                {"vhost": vhost, "exchange": s.exchange, "type": s.type, "reason": s.reason}
                for s in plan.skipped
            )
            # From the broker itself: the management API's counts lag by its stats interval.
            depth, consuming = await _queue_counts(settings.amqp_url_for(vhost), settings.queue)
            queue_depth += depth
            consumers += consuming
            consumers_per_vhost[vhost] = consuming
    report: dict[str, Any] = {
        "vhosts": list(vhosts),
        "queue": settings.queue,
        "exchanges": exchanges,
        "skipped": skipped,
        "queue_depth": queue_depth,
        "consumers": consumers,
        # Something consumes every archive queue: a daemon is running (one per queue is active).
        "capturing": bool(consumers_per_vhost) and all(count > 0 for count in consumers_per_vhost.values()),
    }
    report.update(await _database_status(settings))
    return report


async def _queue_counts(url: str, queue: str) -> tuple[int, int]:
    """(messages ready, consumers) of the archive queue; (0, 0) when it does not exist."""
    try:
        connection = await asyncio.wait_for(aiormq.connect(url), 15)
    except (aiormq.exceptions.AMQPError, OSError, TimeoutError) as error:
        raise BrokerUnavailable(f"cannot reach RabbitMQ at {mask_url(url)}: {describe(error)}") from None
    try:
        channel = await connection.channel()
        try:
            declared = await channel.queue_declare(queue, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return 0, 0
        return int(declared.message_count or 0), int(declared.consumer_count or 0)
    finally:
        with contextlib.suppress(aiormq.exceptions.AMQPError, OSError, TimeoutError):
            await asyncio.wait_for(connection.close(), 5)


async def _database_status(settings: Settings) -> dict[str, Any]:
    pool = await create_pool(settings.database_url, max_size=1)
    try:
        async with pool.acquire() as connection:
            version = await schema_version(connection)
            rows, newest, recent = 0, None, []
            if version is not None:
                rows = await connection.fetchval(queries.COUNT_MESSAGES)
                newest = await connection.fetchval(queries.NEWEST_CAPTURE)
                recent = [dict(row.items()) for row in await connection.fetch(queries.RECENT_BY_EXCHANGE)]
    except CONNECTION_ERRORS as error:
        raise DatabaseUnavailable(f"reading status: {describe(error)}") from error
    finally:
        await pool.close()
    return {
        "rows": rows,
        "newest_captured_at": newest.isoformat() if isinstance(newest, datetime) else None,
        "schema_version": version,
        "stored_by_exchange": recent,
    }
