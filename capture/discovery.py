"""Keeps the archive queue bound to every exchange the plan asks for, re-reading the broker periodically."""

import asyncio
import logging
import time
from urllib.parse import unquote, urlsplit

import aiormq
import aiormq.abc

from archive.errors import AccessRefused, BrokerUnavailable, UsageError, reply_text
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

# An exchange whose binding the broker refused (no read permission) is tried again after this
# many seconds, not every round: each refusal is a channel error in the broker's log.
REFUSED_RETRY = 60.0


class ArchiveQueueRefused(AccessRefused):
    """The broker refused binding the archive queue itself: no exchange can be captured."""


class BindingKeeper:
    """Reads exchanges and bindings through the management API and binds or unbinds to match."""

    def __init__(self, settings: Settings, api: ManagementApi, metrics: CaptureMetrics) -> None:
        self._settings = settings
        self._api = api
        self._metrics = metrics
        self._reported_skips: dict[str, set[tuple[str, str]]] = {}
        # vhost -> exchange -> when the broker last refused binding it.
        self._refused: dict[str, dict[str, float]] = {}
        self._user = unquote(urlsplit(settings.amqp_url).username or "guest")
        # Set by topology events (capture.events) to reconcile a vhost before its interval ends.
        self._nudged: dict[str, asyncio.Event] = {}

    def nudge(self, vhost: str) -> None:
        """Reconcile the vhost now (an exchange or binding changed)."""
        event = self._nudged.get(vhost)
        if event is not None:
            event.set()

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
        """Reconcile now and every DISCOVERY_INTERVAL until stop; ends with the connection.

        Raises ArchiveQueueRefused when the broker refuses the archive queue itself (no write
        permission on it): the daemon cannot do its job and says so in one line.
        """
        channels = Channels(connection)
        nudged = self._nudged.setdefault(vhost, asyncio.Event())
        while not stop.is_set():
            nudged.clear()
            try:
                await self.reconcile_once(channels, vhost)
            except ArchiveQueueRefused:
                raise
            except (BrokerUnavailable, UsageError) as error:
                # Includes a management API refusing the user after the start-up check passed
                # (an LDAP outage, a tag removed): binding goes on with what is bound.
                self._metrics.errors.labels("discovery").inc()
                log.warning("discovery_failed", extra={"vhost": vhost, "error": str(error)})
            except aiormq.exceptions.ChannelClosed as error:
                self._metrics.errors.labels("discovery").inc()
                log.warning("binding_failed", extra={"vhost": vhost, "error": reply_text(error)})
            waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(nudged.wait())]
            try:
                await asyncio.wait(
                    waiters, timeout=self._settings.discovery_interval, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                for waiter in waiters:
                    waiter.cancel()

    async def reconcile_once(self, channels: "Channels", vhost: str) -> None:
        """One round: bind what is missing, unbind what is no longer wanted.

        An exchange the user may not read is logged once, left unbound (tried again after
        REFUSED_RETRY seconds) and does not stop the other exchanges from being bound.
        """
        plan, current = await self.plan(vhost)
        changes = reconcile(plan, current)
        planned = {bound.exchange for bound in plan.bound}
        refused = {name: since for name, since in self._refused.get(vhost, {}).items() if name in planned}
        self._refused[vhost] = refused
        for binding in changes.to_bind:
            if self._waiting(vhost, binding.exchange):
                continue
            if await self._change(channels, vhost, binding, bind=True):
                refused.pop(binding.exchange, None)
                log.info(
                    "bound",
                    extra={"vhost": vhost, "exchange": binding.exchange, "routing_key": binding.routing_key},
                )
        for binding in changes.to_unbind:
            if self._waiting(vhost, binding.exchange):
                continue
            if await self._change(channels, vhost, binding, bind=False):
                log.info(
                    "unbound",
                    extra={"vhost": vhost, "exchange": binding.exchange, "routing_key": binding.routing_key},
                )
        self._metrics.bound_exchanges.labels(vhost).set(
            sum(1 for bound in plan.bound if bound.bindings and bound.exchange not in refused)
        )
        self._metrics.skipped_exchanges.labels(vhost).set(len(plan.skipped))
        skips = {(skipped.exchange, skipped.reason) for skipped in plan.skipped}
        for exchange, reason in sorted(skips - self._reported_skips.get(vhost, set())):
            if exchange and not exchange.startswith("amq.rabbitmq."):
                log.info("exchange_skipped", extra={"vhost": vhost, "exchange": exchange, "reason": reason})
        self._reported_skips[vhost] = skips
        queue_info = await self._api.queue(vhost, self._settings.queue)
        if queue_info is not None:
            self._metrics.queue_depth.labels(vhost).set(queue_info.get("messages", 0) or 0)

    def refused_exchanges(self, vhost: str) -> list[str]:
        """Exchanges of the vhost the broker refused to bind for lack of read permission."""
        return sorted(self._refused.get(vhost, {}))

    def _waiting(self, vhost: str, exchange: str) -> bool:
        since = self._refused.get(vhost, {}).get(exchange)
        return since is not None and time.monotonic() - since < REFUSED_RETRY

    async def _change(self, channels: "Channels", vhost: str, binding: ArchiveBinding, *, bind: bool) -> bool:
        """Bind or unbind one binding; False when the broker refused it for this exchange."""
        queue = self._settings.queue
        channel = await channels.get()
        try:
            if bind:
                await channel.queue_bind(
                    queue, binding.exchange, binding.routing_key, arguments=binding.arguments
                )
            else:
                await channel.queue_unbind(
                    queue, binding.exchange, binding.routing_key, arguments=binding.arguments
                )
        except aiormq.exceptions.ChannelAccessRefused as error:
            text = reply_text(error)
            if "access to queue" in text:
                raise ArchiveQueueRefused(
                    f"RabbitMQ refused to bind queue {queue!r} in vhost {vhost!r} ({text}): "
                    f"user {self._user!r} needs write permission on the queue (its write regex must match "
                    f"{queue!r})"
                ) from None
            self._refuse(vhost, binding.exchange, text)
            return False
        except aiormq.exceptions.ChannelNotFoundEntity as error:
            text = reply_text(error)
            if "no queue" in text:
                raise
            # The exchange was deleted since the listing; the next round no longer plans it.
            log.info("binding_skipped", extra={"vhost": vhost, "exchange": binding.exchange, "error": text})
            return False
        return True

    def _refuse(self, vhost: str, exchange: str, text: str) -> None:
        refused = self._refused.setdefault(vhost, {})
        if exchange not in refused:
            self._metrics.errors.labels("discovery").inc()
            kind = (
                "topic read permission for routing key '#'"
                if "access to topic" in text
                else "read permission"
            )
            log.warning(
                "binding_refused",
                extra={
                    "vhost": vhost,
                    "exchange": exchange,
                    "problem": (
                        f"user {self._user!r} lacks {kind} on exchange {exchange!r}: its messages are not "
                        "captured (the other exchanges are); grant it to capture them"
                    ),
                    "error": text,
                },
            )
        refused[exchange] = time.monotonic()


class Channels:
    """The keeper's channel, opened again after the broker closed it for a refused binding."""

    def __init__(self, connection: aiormq.abc.AbstractConnection) -> None:
        self._connection = connection
        self._channel: aiormq.abc.AbstractChannel | None = None

    async def get(self) -> aiormq.abc.AbstractChannel:
        """An open channel."""
        if self._channel is None or self._channel.is_closed:
            self._channel = await self._connection.channel()
        return self._channel
