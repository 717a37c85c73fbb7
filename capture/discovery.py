"""Keeps the archive queue bound to every exchange the plan asks for, re-reading the broker periodically."""

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlsplit

import aiormq
import aiormq.abc
import asyncpg

from rabbit_archive.archive import frames
from rabbit_archive.archive.errors import (
    AccessRefused,
    BrokerUnavailable,
    DatabaseUnavailable,
    UsageError,
    reply_text,
)
from rabbit_archive.archive.stopping import sleep_unless
from rabbit_archive.capture.binding_plan import (
    ArchiveBinding,
    BindingPlan,
    ExchangeState,
    broker_terms,
    current_archive_bindings,
    exchange_states,
    plan_bindings,
    reconcile,
    with_default_exchange_traces,
)
from rabbit_archive.capture.binding_states import save_binding_states
from rabbit_archive.capture.coverage import CoverageLog, uncaptured_rates
from rabbit_archive.capture.management import ManagementApi
from rabbit_archive.capture.metrics import CaptureMetrics
from rabbit_archive.config.settings import Settings

log = logging.getLogger(__name__)

# An exchange whose binding the broker refused (no read permission) is tried again after this
# many seconds, not every round: each refusal is a channel error in the broker's log.
REFUSED_RETRY = 60.0
# Topology events are gathered for NUDGE_COALESCE seconds and start a round at most every
# NUDGE_MIN_INTERVAL seconds: a new exchange is bound within about half a second, and a burst
# of changes costs at most two rounds (eight management API calls) a second.
NUDGE_COALESCE = 0.05
NUDGE_MIN_INTERVAL = 0.5


async def _wait_any(stop: asyncio.Event, nudged: asyncio.Event, *, seconds: float) -> None:
    waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(nudged.wait())]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


class ArchiveQueueRefused(AccessRefused):
    """The broker refused binding the archive queue itself: no exchange can be captured."""


class BindingKeeper:
    """Reads exchanges and bindings through the management API and binds or unbinds to match."""

    def __init__(
        self,
        settings: Settings,
        api: ManagementApi,
        metrics: CaptureMetrics,
        pool: "asyncpg.Pool[asyncpg.Record] | None" = None,
        coverage: CoverageLog | None = None,
    ) -> None:
        self._settings = settings
        self._api = api
        self._metrics = metrics
        self._reported_skips: dict[str, set[tuple[str, str]]] = {}
        # vhost -> exchange -> (when, "refused" or "failed", the broker's reply) of its last refusal.
        self._refused: dict[str, dict[str, tuple[float, str, str]]] = {}
        # vhost -> planned binding -> why it cannot be sent to the broker as listed.
        self._unrepresentable: dict[str, dict[ArchiveBinding, str]] = {}
        # vhost -> binding as the management API lists it -> the planned binding it is.
        self._aliases: dict[str, dict[ArchiveBinding, ArchiveBinding]] = {}
        # vhost -> (bindings bound in the last round, what was listed before them).
        self._just_bound: dict[str, tuple[set[ArchiveBinding], frozenset[ArchiveBinding]]] = {}
        # vhost -> the per-exchange states of the last round (read by the HTTP status and tests).
        self.states: dict[str, list[ExchangeState]] = {}
        self._saved_states: dict[str, list[ExchangeState]] = {}
        self._pool = pool
        self.coverage = coverage
        # vhost -> the exchanges listed in the last round (with the broker's message rates).
        self._listed: dict[str, list[dict[str, Any]]] = {}
        self._uncaptured_labels: dict[str, set[tuple[str, str]]] = {}
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
        self._listed[vhost] = exchanges
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
        if settings.source == "bindings+default":
            plan = with_default_exchange_traces(plan)
        return plan, current_archive_bindings(bindings, settings.queue)

    async def keep(
        self,
        connection: aiormq.abc.AbstractConnection,
        vhost: str,
        stop: asyncio.Event,
        on_bound: Callable[[], None] = lambda: None,
    ) -> None:
        """Reconcile now and every DISCOVERY_INTERVAL until stop; ends with the connection.

        `on_bound` is called in each round once the bindings were made (exchanges the broker
        refused included, as they are reported and retried), before the round's reports.

        Raises ArchiveQueueRefused when the broker refuses the archive queue itself (no write
        permission on it): the daemon cannot do its job and says so in one line.
        """
        channels = Channels(connection)
        nudged = self._nudged.setdefault(vhost, asyncio.Event())
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            nudged.clear()
            started = loop.time()
            try:
                await self.reconcile_once(channels, vhost, on_bound)
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
            self._metrics.discovery_rounds.labels(vhost).inc()
            await _wait_any(stop, nudged, seconds=self._settings.discovery_interval)
            if nudged.is_set() and not stop.is_set():
                # A burst of topology events (an application creating and dropping bindings
                # all the time) becomes at most one round per NUDGE_MIN_INTERVAL.
                await sleep_unless(stop, max(NUDGE_COALESCE, NUDGE_MIN_INTERVAL - (loop.time() - started)))

    async def reconcile_once(
        self, channels: "Channels", vhost: str, on_bound: Callable[[], None] = lambda: None
    ) -> None:
        """One round: bind what is missing, unbind what is no longer wanted; then on_bound().

        An exchange the broker refuses to bind (no read permission, or any other channel
        error) is logged once, left unbound (tried again after REFUSED_RETRY seconds) and
        does not stop the other exchanges from being bound; a binding that cannot be sent
        as listed is left alone and reported.
        """
        plan, listed = await self.plan(vhost)
        planned = {bound.exchange for bound in plan.bound}
        wanted = plan.bindings
        refused = {name: entry for name, entry in self._refused.get(vhost, {}).items() if name in planned}
        self._refused[vhost] = refused
        unrepresentable = {
            binding: reason
            for binding, reason in self._unrepresentable.get(vhost, {}).items()
            if binding in wanted
        }
        self._unrepresentable[vhost] = unrepresentable
        aliases = self._learn_aliases(vhost, listed, wanted)
        current = broker_terms(listed, aliases)
        changes = reconcile(plan, current)
        bound_now: set[ArchiveBinding] = set()
        for binding in changes.to_bind:
            if self._waiting(vhost, binding.exchange) or binding in unrepresentable:
                continue
            if await self._change(channels, vhost, binding, bind=True):
                refused.pop(binding.exchange, None)
                bound_now.add(binding)
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
        self._just_bound[vhost] = (bound_now, listed)
        on_bound()
        states = exchange_states(plan, refused, unrepresentable)
        self.states[vhost] = states
        self._metrics.bound_exchanges.labels(vhost).set(sum(1 for state in states if state.state == "bound"))
        self._metrics.skipped_exchanges.labels(vhost).set(len(plan.skipped))
        for kind in ("refused", "failed", "unrepresentable"):
            self._metrics.unbound_exchanges.labels(vhost, kind).set(
                sum(1 for state in states if state.state == kind)
            )
        skips = {(skipped.exchange, skipped.reason) for skipped in plan.skipped}
        for exchange, reason in sorted(skips - self._reported_skips.get(vhost, set())):
            if exchange and not exchange.startswith("amq.rabbitmq."):
                log.info("exchange_skipped", extra={"vhost": vhost, "exchange": exchange, "reason": reason})
        self._reported_skips[vhost] = skips
        await self._save_states(vhost, states)
        await self._report_coverage(vhost, states)
        queue_info = await self._api.queue(vhost, self._settings.queue)
        if queue_info is not None:
            depth = queue_info.get("messages")
            self._metrics.queue_depth.labels(vhost).set(depth if isinstance(depth, int) else 0)

    def listed(self, vhost: str) -> list[dict[str, Any]]:
        """The exchanges of the vhost as the last round listed them (with the broker's rates)."""
        return self._listed.get(vhost, [])

    async def _report_coverage(self, vhost: str, states: list[ExchangeState]) -> None:
        """Coverage history, and the broker's rates of what the archive does not capture."""
        if self.coverage is not None:
            await self.coverage.exchange_states(vhost, states)
            # Written at once: a replay's verdict right after a binding must already see it.
            await self.coverage.flush()
        rates = uncaptured_rates(self._listed.get(vhost, []), states)
        gauge = self._metrics.uncaptured_rate
        for exchange, reason, rate in rates:
            gauge.labels(vhost, exchange or "(default)", reason).set(rate)
        shown = {(exchange or "(default)", reason) for exchange, reason, _ in rates}
        for old in self._uncaptured_labels.get(vhost, set()) - shown:
            gauge.remove(vhost, *old)
        self._uncaptured_labels[vhost] = shown

    def _learn_aliases(
        self, vhost: str, listed: frozenset[ArchiveBinding], wanted: frozenset[ArchiveBinding]
    ) -> dict[ArchiveBinding, ArchiveBinding]:
        """Bindings as the broker lists them -> as they were planned, learnt from last round's binds.

        The management API shows a binding's arguments in its own JSON form (a double 1.0,
        a nested table); when that differs from the planned form, comparing the two naively
        would unbind and bind again on alternate rounds, missing messages in between. The
        binding that appeared where one was just bound is taken as the broker's form of it.
        """
        aliases = self._aliases.setdefault(vhost, {})
        bound, before = self._just_bound.pop(vhost, (set(), frozenset()))
        for planned in bound:
            if planned in listed:
                continue
            appeared = [
                shown
                for shown in listed - before
                if (shown.exchange, shown.routing_key) == (planned.exchange, planned.routing_key)
                and shown not in wanted
            ]
            if len(appeared) == 1:
                aliases[appeared[0]] = planned
        # Forget aliases of bindings no longer planned or no longer there.
        for shown, planned in list(aliases.items()):
            if planned not in wanted or shown not in listed:
                del aliases[shown]
        return aliases

    async def _save_states(self, vhost: str, states: list["ExchangeState"]) -> None:
        """Record the round's per-exchange states for `status` (only when they changed)."""
        if self._pool is None or self._saved_states.get(vhost) == states:
            return
        try:
            await save_binding_states(
                self._pool,
                vhost,
                [(state.exchange, state.type, state.state, state.reason) for state in states],
            )
        except DatabaseUnavailable as error:
            # Status is informative: capture goes on, the next round tries again.
            log.info("binding_state_not_saved", extra={"vhost": vhost, "error": str(error)})
            return
        self._saved_states[vhost] = states

    def refused_exchanges(self, vhost: str) -> list[str]:
        """Exchanges of the vhost the broker refused to bind (tried again later)."""
        return sorted(self._refused.get(vhost, {}))

    def _waiting(self, vhost: str, exchange: str) -> bool:
        entry = self._refused.get(vhost, {}).get(exchange)
        return entry is not None and time.monotonic() - entry[0] < REFUSED_RETRY

    async def _change(self, channels: "Channels", vhost: str, binding: ArchiveBinding, *, bind: bool) -> bool:
        """Bind or unbind one binding; False when that one binding could not be changed.

        Whatever the broker or the frame encoder says about one binding costs only that
        binding's exchange for this round (and REFUSED_RETRY seconds): every other binding of
        the round still happens. Only a refusal about the archive queue itself is raised.
        """
        queue = self._settings.queue
        try:
            build = frames.queue_bind if bind else frames.queue_unbind
            frame = build(queue, binding.exchange, binding.routing_key, binding.arguments)
        except (frames.Unrepresentable, frames.NameTooLong) as error:
            self._mark_unrepresentable(vhost, binding, str(error))
            return False
        channel = await channels.get()
        try:
            await frames.rpc(channel, frame)
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
                # The archive queue was deleted under us: a new session declares it again.
                raise BrokerUnavailable(
                    f"archive queue {queue!r} in vhost {vhost!r} vanished ({text})"
                ) from None
            # The exchange was deleted since the listing; the next round no longer plans it.
            log.info("binding_skipped", extra={"vhost": vhost, "exchange": binding.exchange, "error": text})
            return False
        except aiormq.exceptions.ChannelClosed as error:
            # Any other channel error (a precondition, an argument the broker rejects, a
            # plugin's refusal) is about this binding only.
            self._refuse(vhost, binding.exchange, reply_text(error), kind="failed")
            return False
        return True

    def _mark_unrepresentable(self, vhost: str, binding: ArchiveBinding, reason: str) -> None:
        marked = self._unrepresentable.setdefault(vhost, {})
        if binding not in marked:
            self._metrics.errors.labels("discovery").inc()
            log.warning(
                "binding_unrepresentable",
                extra={
                    "vhost": vhost,
                    "exchange": binding.exchange,
                    "routing_key": binding.routing_key,
                    "problem": f"cannot be sent to the broker as listed ({reason}); not bound",
                },
            )
        marked[binding] = reason

    def _refuse(self, vhost: str, exchange: str, text: str, *, kind: str = "refused") -> None:
        refused = self._refused.setdefault(vhost, {})
        if exchange not in refused:
            self._metrics.errors.labels("discovery").inc()
            if kind == "refused":
                need = (
                    "topic read permission for routing key '#'"
                    if "access to topic" in text
                    else "read permission"
                )
                problem = (
                    f"user {self._user!r} lacks {need} on exchange {exchange!r}: its messages are not "
                    "captured (the other exchanges are); grant it to capture them"
                )
            else:
                problem = (
                    f"the broker refused binding exchange {exchange!r}: its messages are not captured "
                    f"(the other exchanges are); tried again in {REFUSED_RETRY:.0f} s"
                )
            log.warning(
                "binding_refused" if kind == "refused" else "binding_failed",
                extra={"vhost": vhost, "exchange": exchange, "problem": problem, "error": text},
            )
        refused[exchange] = (time.monotonic(), kind, text)


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
