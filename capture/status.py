"""`rabbit-capture status`: what is bound, what is skipped, lag, rows stored, newest capture."""

from datetime import datetime
from typing import Any

from archive import queries
from archive.db import CONNECTION_ERRORS, create_pool
from archive.errors import DatabaseUnavailable, describe
from archive.migrate import schema_version
from capture.discovery import BindingKeeper
from capture.management import ManagementApi, management_client
from capture.metrics import CaptureMetrics
from config.settings import Settings


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
            queue = await api.queue(vhost, settings.queue)
            if queue is not None:
                queue_depth += int(queue.get("messages", 0) or 0)
                consumers += int(queue.get("consumers", 0) or 0)
    report: dict[str, Any] = {
        "vhosts": list(vhosts),
        "queue": settings.queue,
        "exchanges": exchanges,
        "skipped": skipped,
        "queue_depth": queue_depth,
        "consumers": consumers,
    }
    report.update(await _database_status(settings))
    return report


async def _database_status(settings: Settings) -> dict[str, Any]:
    pool = await create_pool(settings.database_url, max_size=1)
    try:
        async with pool.acquire() as connection:
            version = await schema_version(connection)
            rows, newest = 0, None
            if version is not None:
                rows = await connection.fetchval(queries.COUNT_MESSAGES)
                newest = await connection.fetchval(queries.NEWEST_CAPTURE)
    except CONNECTION_ERRORS as error:
        raise DatabaseUnavailable(f"reading status: {describe(error)}") from error
    finally:
        await pool.close()
    return {
        "rows": rows,
        "newest_captured_at": newest.isoformat() if isinstance(newest, datetime) else None,
        "schema_version": version,
    }
