"""Keeps the archive queue bound to every exchange the plan asks for, re-reading the broker periodically."""

import asyncio
import logging

import aiormq
import aiormq.abc

from archive.errors import BrokerUnavailable, UsageError
from capture.binding_plan import (
    ArchiveBinding,
    BindingPlan,
    current_archive_bindings,
    plan_bindings,
    reconcile,
)
from capture.management import ManagementApi
from capture.metrics import CaptureMetrics
from config.settings import Settings

log = logging.getLogger("rabbit_archive.capture.discovery")


class BindingKeeper:
    """Reads exchanges and bindings through the management API and binds or unbinds to match."""

    def __init__(self, settings: Settings, api: ManagementApi, metrics: CaptureMetrics) -> None:
        self._settings = settings
        self._api = api
        self._metrics = metrics
        self._reported_skips: dict[str, set[tuple[str, str]]] = {}

    async def plan(self, vhost: str) -> tuple[BindingPlan, frozenset[ArchiveBinding]]:
        """The bindings the archive queue should have in the vhost, and those it has."""
        exchanges, bindings, policies = await asyncio.gather(
            self._api.exchanges(vhost), self._api.bindings(vhost), self._api.policies(vhost)
        )
        settings = self._settings
        plan = plan_bindings(
            exchanges,
            bindings,
            archive_queue=settings.queue,
            include=settings.include,
            exclude=settings.exclude,
            mode=settings.binding_mode,
            policies=policies,
        )
        return plan, current_archive_bindings(bindings, settings.queue)

    async def keep(self, connection: aiormq.abc.AbstractConnection, vhost: str, stop: asyncio.Event) -> None:
        """Reconcile now and every DISCOVERY_INTERVAL until stop; ends with the connection."""
        channel: aiormq.abc.AbstractChannel | None = None
        while not stop.is_set():
            if channel is None or channel.is_closed:
                # A binding to an exchange deleted meanwhile closes the channel (NOT_FOUND);
                # the connection lives on and the next round opens a fresh channel.
                channel = await connection.channel()
            try:
                await self.reconcile_once(channel, vhost)
            except (BrokerUnavailable, UsageError) as error:
                self._metrics.errors.labels("discovery").inc()
                log.warning("discovery_failed", extra={"vhost": vhost, "error": str(error)})
            except aiormq.exceptions.ChannelClosed as error:
                self._metrics.errors.labels("discovery").inc()
                log.warning("binding_refused", extra={"vhost": vhost, "error": str(error)})
            try:
                async with asyncio.timeout(self._settings.discovery_interval):
                    await stop.wait()
            except TimeoutError:
                pass

    async def reconcile_once(self, channel: aiormq.abc.AbstractChannel, vhost: str) -> None:
        """One round: bind what is missing, unbind what is no longer wanted."""
        plan, current = await self.plan(vhost)
        changes = reconcile(plan, current)
        queue = self._settings.queue
        for binding in changes.to_bind:
            await channel.queue_bind(
                queue, binding.exchange, binding.routing_key, arguments=binding.arguments
            )
            log.info(
                "bound",
                extra={"vhost": vhost, "exchange": binding.exchange, "routing_key": binding.routing_key},
            )
        for binding in changes.to_unbind:
            await channel.queue_unbind(
                queue, binding.exchange, binding.routing_key, arguments=binding.arguments
            )
            log.info(
                "unbound",
                extra={"vhost": vhost, "exchange": binding.exchange, "routing_key": binding.routing_key},
            )
        self._metrics.bound_exchanges.labels(vhost).set(sum(1 for bound in plan.bound if bound.bindings))
        self._metrics.skipped_exchanges.labels(vhost).set(len(plan.skipped))
        skips = {(skipped.exchange, skipped.reason) for skipped in plan.skipped}
        for exchange, reason in sorted(skips - self._reported_skips.get(vhost, set())):
            if exchange and not exchange.startswith("amq.rabbitmq."):
                log.info("exchange_skipped", extra={"vhost": vhost, "exchange": exchange, "reason": reason})
        self._reported_skips[vhost] = skips
        queue_info = await self._api.queue(vhost, queue)
        if queue_info is not None:
            self._metrics.queue_depth.labels(vhost).set(queue_info.get("messages", 0) or 0)
