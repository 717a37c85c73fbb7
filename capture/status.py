"""`rabbit-capture status`: what is bound, what is skipped, lag, rows stored, newest capture."""

import asyncio
import contextlib
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import aiormq

from rabbit_archive.archive import frames, queries
from rabbit_archive.archive.db import DATABASE_ERRORS, create_pool, database_error
from rabbit_archive.archive.errors import BrokerUnavailable, describe
from rabbit_archive.archive.migrate import schema_version
from rabbit_archive.capture.binding_plan import BindingPlan, ExchangeState
from rabbit_archive.capture.coverage import uncaptured_rates
from rabbit_archive.capture.discovery import BindingKeeper
from rabbit_archive.capture.management import ManagementApi, management_client
from rabbit_archive.capture.metrics import CaptureMetrics
from rabbit_archive.config.settings import Settings, mask_url

# Recorded states that tell more than the plan's "bound": the daemon tried and could not.
_OVERRIDING = frozenset({"refused", "unrepresentable", "failed"})


def exchange_states(
    vhost: str, plan: BindingPlan, recorded: Mapping[str, Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Each exchange of the plan with its state and reason, the daemon's recorded failures on top.

    The plan says what should happen now; a recorded 'refused', 'unrepresentable' or 'failed'
    row says the daemon tried to bind a planned exchange and could not. Rows of exchanges the
    plan no longer has (deleted since) are left out.
    """
    states: list[dict[str, Any]] = []
    for bound in plan.bound:
        row = recorded.get(bound.exchange)
        if row is not None and row["state"] not in _OVERRIDING | {"bound"}:
            row = None  # recorded before the plan changed (INCLUDE, EXCLUDE, the type)
        state, reason = (row["state"], row["reason"]) if row is not None else ("bound", "")
        states.append(_state(vhost, bound.exchange, bound.type, state, reason, row))
    for skipped in plan.skipped:
        row = recorded.get(skipped.exchange)
        if row is not None and row["state"] != "skipped":
            row = None
        states.append(_state(vhost, skipped.exchange, skipped.type, "skipped", skipped.reason, row))
    return sorted(states, key=lambda item: item["exchange"])


def _state(
    vhost: str, exchange: str, type_: str, state: str, reason: str, row: Mapping[str, Any] | None
) -> dict[str, Any]:
    since = row["updated_at"] if row is not None else None
    return {
        "vhost": vhost,
        "exchange": exchange,
        "type": type_,
        "state": state,
        "reason": reason,
        # When the daemon recorded this state (None: only planned, nothing recorded yet).
        "since": since.isoformat() if isinstance(since, datetime) else None,
    }


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
        plans: dict[str, BindingPlan] = {}
        amqp_node = None
        for vhost in vhosts:
            plan, current = await keeper.plan(vhost)
            plans[vhost] = plan
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
            depth, consuming, amqp_node = await _queue_counts(settings.amqp_url_for(vhost), settings.queue)
            queue_depth += depth
            consumers += consuming
            consumers_per_vhost[vhost] = consuming
    database, recorded, lost = await _database_status(settings, list(vhosts))
    states = [
        item
        for vhost, plan in plans.items()
        for item in exchange_states(vhost, plan, recorded.get(vhost, {}))
    ]
    coverage = not_captured(settings, keeper, states, lost)
    report: dict[str, Any] = {
        "vhosts": list(vhosts),
        "queue": settings.queue,
        "exchanges": exchanges,
        "skipped": skipped,
        "exchange_states": states,
        "coverage": coverage,
        "queue_depth": queue_depth,
        # The node (host:port of AMQP_URL) that answered: with several hosts, the one in use.
        "amqp_node": amqp_node,
        "consumers": consumers,
        # Something consumes every archive queue: a daemon is running (one per queue is active).
        "capturing": bool(consumers_per_vhost) and all(count > 0 for count in consumers_per_vhost.values()),
    }
    report.update(database)
    return report


def not_captured(
    settings: Settings,
    keeper: BindingKeeper,
    states: list[dict[str, Any]],
    lost: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    """What the archive does not hold now: each item with vhost, exchange (None: the whole
    vhost), reason, the broker's publish rate where it counts one, and messages where known."""
    items: list[dict[str, Any]] = []
    by_vhost: dict[str, list[ExchangeState]] = {}
    for item in states:
        by_vhost.setdefault(item["vhost"], []).append(
            ExchangeState(item["exchange"], item["type"] or "", item["state"], item["reason"])
        )
    for vhost, vhost_states in by_vhost.items():
        for exchange, reason, rate in uncaptured_rates(keeper.listed(vhost), vhost_states):
            if exchange == "" and settings.source == "bindings":
                reason = "default exchange: no binding can see it (SOURCE=bindings+default captures it)"
            items.append(
                {"vhost": vhost, "exchange": exchange, "reason": reason, "rate": rate, "messages": None}
            )
    for row in lost:
        items.append(
            {
                "vhost": row["vhost"],
                "exchange": row["exchange"],
                "reason": row["reason"],
                "rate": None,
                "messages": row["messages"],
            }
        )
    return items


async def _queue_counts(url: str, queue: str) -> tuple[int, int, str]:
    """(messages ready, consumers) of the archive queue ((0, 0) when it does not exist), and
    the node (host:port of AMQP_URL) that answered."""
    try:
        connection = await asyncio.wait_for(frames.connect(url), 30)
    except (aiormq.exceptions.AMQPError, OSError, TimeoutError) as error:
        raise BrokerUnavailable(f"cannot reach RabbitMQ at {mask_url(url)}: {describe(error)}") from None
    node = frames.node_of(connection)
    try:
        channel = await connection.channel()
        try:
            declared = await frames.rpc(channel, frames.queue_declare(queue, passive=True))
        except aiormq.exceptions.ChannelNotFoundEntity:
            return 0, 0, node
        return int(declared.message_count or 0), int(declared.consumer_count or 0), node
    finally:
        with contextlib.suppress(aiormq.exceptions.AMQPError, OSError, TimeoutError):
            await asyncio.wait_for(connection.close(), 5)


async def _database_status(
    settings: Settings, vhosts: list[str]
) -> tuple[dict[str, Any], dict[str, dict[str, dict[str, Any]]], list[dict[str, Any]]]:
    """The database's part of the report, the recorded binding states by vhost and exchange, and
    the messages lost in the last hour and vhosts that could not be captured (coverage history)."""
    pool = await create_pool(settings.database_url, max_size=1)
    recorded: dict[str, dict[str, dict[str, Any]]] = {}
    lost: list[dict[str, Any]] = []
    try:
        async with pool.acquire() as connection:
            version = await schema_version(connection)
            rows, newest, recent = 0, None, []
            if version is not None:
                rows = await connection.fetchval(queries.COUNT_MESSAGES)
                newest = await connection.fetchval(queries.NEWEST_CAPTURE)
                recent = [dict(row.items()) for row in await connection.fetch(queries.RECENT_BY_EXCHANGE)]
                # A schema older than version 3 has no binding_state: the plan alone is shown.
                if await connection.fetchval(queries.BINDING_STATE_EXISTS):
                    for row in await connection.fetch(queries.BINDING_STATE, vhosts):
                        recorded.setdefault(row["vhost"], {})[row["exchange"]] = dict(row.items())
                if await connection.fetchval(queries.COVERAGE_EXISTS):
                    lost = [
                        dict(row.items()) for row in await connection.fetch(queries.RECENT_LOSSES, vhosts)
                    ]
    except DATABASE_ERRORS as error:
        raise database_error(error, "reading status") from None
    finally:
        await pool.close()
    report = {
        "rows": rows,
        "newest_captured_at": newest.isoformat() if isinstance(newest, datetime) else None,
        "schema_version": version,
        "stored_by_exchange": recent,
    }
    return report, recorded, lost
