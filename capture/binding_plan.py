"""Decides which bindings the archive queue should have, from what the management API listed.

Pure: the caller fetches `/api/exchanges/{vhost}`, `/api/bindings/{vhost}` and the policies,
this module turns them into a plan and into the difference with the bindings that exist now.
"""

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Literal, cast

Mode = Literal["all", "mirror"]

# Exchanges that pick ONE of their queues per message: binding the archive there would take
# messages away from the real consumers, so they are never bound, whatever the mode.
SINGLE_DELIVERY_TYPES = frozenset({"x-consistent-hash", "x-random", "x-modulus-hash", "x-local-random"})

# Types known to copy every message to every matching queue; anything else is left alone.
COPYING_TYPES = frozenset({"topic", "fanout", "headers", "direct"})

DELAYED_TYPE = "x-delayed-message"
BROKER_INTERNAL_PREFIX = "amq.rabbitmq."
ALTERNATE_EXCHANGE = "alternate-exchange"

# A headers binding with x-match=all and no header keys matches every message.
_HEADERS_MATCH_ALL: dict[str, Any] = {"x-match": "all"}


def _canonical_json(arguments: Mapping[str, Any]) -> str:
    return json.dumps(dict(arguments), sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True, slots=True, order=True)
class ArchiveBinding:
    """One binding of the archive queue: exchange, routing key and (hashable) arguments."""

    exchange: str
    routing_key: str
    arguments_json: str = "{}"

    @property
    def arguments(self) -> dict[str, Any]:
        """The binding arguments as a fresh dict."""
        return cast(dict[str, Any], json.loads(self.arguments_json))

    @classmethod
    def of(
        cls, exchange: str, routing_key: str, arguments: Mapping[str, Any] | None = None
    ) -> "ArchiveBinding":
        """Build a binding, storing the arguments as canonical JSON."""
        return cls(exchange, routing_key, _canonical_json(arguments or {}))


@dataclass(frozen=True, slots=True)
class Skipped:
    """An exchange the archive does not bind, and why."""

    exchange: str
    type: str
    reason: str


@dataclass(frozen=True, slots=True)
class BoundExchange:
    """An exchange the archive binds, how, and with which bindings (possibly none yet)."""

    exchange: str
    type: str
    mode: Mode
    bindings: tuple[ArchiveBinding, ...]


@dataclass(frozen=True, slots=True)
class BindingPlan:
    """Every exchange considered: the ones bound with their bindings, the ones skipped."""

    bound: tuple[BoundExchange, ...]
    skipped: tuple[Skipped, ...]

    @property
    def bindings(self) -> frozenset[ArchiveBinding]:
        """All bindings the archive queue should have."""
        return frozenset(b for exchange in self.bound for b in exchange.bindings)


@dataclass(frozen=True, slots=True)
class Reconciliation:
    """What to bind and unbind so that the archive queue's bindings match the plan."""

    to_bind: tuple[ArchiveBinding, ...]
    to_unbind: tuple[ArchiveBinding, ...]


@dataclass(frozen=True, slots=True)
class _OtherBinding:
    routing_key: str
    arguments: Mapping[str, Any]


def _mapping(value: Any) -> Mapping[str, Any]:
    # The management API has encoded empty arguments as [] in some versions; anything that is
    # not a mapping means "no arguments".
    return cast(Mapping[str, Any], value) if isinstance(value, Mapping) else {}


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _is_archive_destination(item: Mapping[str, Any], archive_queue: str) -> bool:
    # destination_type is always present in real listings; a missing one is taken as a queue so
    # that the archive's own bindings are never mistaken for someone else's.
    return item.get("destination_type", "queue") == "queue" and item.get("destination") == archive_queue


def _single_delivery_reason(type_name: str) -> str:
    return f"{type_name} delivers each message to one queue only; binding would steal messages"


_NOT_COPYING = "not known to copy every message to every queue"


def _unknown_reason(type_name: str) -> str:
    return f"unknown exchange type '{type_name}': {_NOT_COPYING}"


def _routing_type(exchange_type: str, arguments: Mapping[str, Any]) -> tuple[str | None, str]:
    """The type whose rules apply to the exchange, or None and the reason it is skipped."""
    if exchange_type == DELAYED_TYPE:
        # The delayed-message plugin routes with the type named in x-delayed-type once the delay
        # has passed, so the same rules (and the same dangers) apply.
        delayed = arguments.get("x-delayed-type")
        if not isinstance(delayed, str) or not delayed:
            return None, "x-delayed-message without an x-delayed-type argument: routing unknown"
        if delayed in SINGLE_DELIVERY_TYPES:
            return None, f"x-delayed-type {_single_delivery_reason(delayed)}"
        if delayed not in COPYING_TYPES:
            return None, f"unknown x-delayed-type '{delayed}': {_NOT_COPYING}"
        return delayed, ""
    if exchange_type in SINGLE_DELIVERY_TYPES:
        return None, _single_delivery_reason(exchange_type)
    if exchange_type not in COPYING_TYPES:
        return None, _unknown_reason(exchange_type)
    return exchange_type, ""


def _has_alternate_exchange(exchange: Mapping[str, Any], policies: Mapping[str, Mapping[str, Any]]) -> bool:
    if isinstance(_mapping(exchange.get("arguments")).get(ALTERNATE_EXCHANGE), str):
        return True
    policy = exchange.get("policy")
    if not isinstance(policy, str):
        return False
    return isinstance(_mapping(policies.get(policy)).get(ALTERNATE_EXCHANGE), str)


def _headers_arguments(arguments: Mapping[str, Any]) -> dict[str, Any]:
    # A headers binding without x-match means x-match=all; spelling it out collapses the two
    # forms into one archive binding.
    copied = dict(arguments)
    copied.setdefault("x-match", "all")
    return copied


def _exchange_bindings(
    name: str, routing_type: str, mode: Mode, others: Sequence[_OtherBinding]
) -> set[ArchiveBinding]:
    if routing_type == "direct" or (routing_type == "topic" and mode == "mirror"):
        # A direct exchange has no wildcard: the archive can only copy the keys others use.
        return {ArchiveBinding.of(name, other.routing_key) for other in others}
    if routing_type == "topic":
        return {ArchiveBinding.of(name, "#")}
    if routing_type == "fanout":
        if mode == "all" or others:
            return {ArchiveBinding.of(name, "")}
        return set()
    # headers
    if mode == "all":
        return {ArchiveBinding.of(name, "", _HEADERS_MATCH_ALL)}
    return {ArchiveBinding.of(name, "", _headers_arguments(other.arguments)) for other in others}


def _classify(
    exchange: Mapping[str, Any],
    name: str,
    exchange_type: str,
    include: Sequence[str],
    exclude: Sequence[str],
) -> tuple[str | None, str]:
    """The type whose rules bind the exchange, or None and the reason it is skipped."""
    if name == "":
        return None, "default exchange"
    if name.startswith(BROKER_INTERNAL_PREFIX):
        return None, "internal to the broker (amq.rabbitmq.*)"
    if any(fnmatchcase(name, pattern) for pattern in exclude):
        return None, "excluded by RABBIT_ARCHIVE_EXCLUDE"
    if not any(fnmatchcase(name, pattern) for pattern in include):
        return None, "not matched by RABBIT_ARCHIVE_INCLUDE"
    if not exchange_type:
        return None, "exchange type missing from the management API listing"
    return _routing_type(exchange_type, _mapping(exchange.get("arguments")))


def plan_bindings(
    exchanges: Iterable[Mapping[str, Any]],
    bindings: Iterable[Mapping[str, Any]],
    *,
    archive_queue: str,
    include: Sequence[str] = ("*",),
    exclude: Sequence[str] = (),
    mode: Literal["all", "mirror"] = "all",
    policies: Mapping[str, Mapping[str, Any]] | None = None,
) -> BindingPlan:
    """Decide, per exchange, whether and how the archive queue is bound."""
    if mode not in ("all", "mirror"):
        raise ValueError(f"binding mode must be 'all' or 'mirror', not {mode!r}")
    known_policies = policies or {}

    others: dict[str, list[_OtherBinding]] = {}
    for item in bindings:
        source = item.get("source")
        if not isinstance(source, str) or not source:
            continue
        if _is_archive_destination(item, archive_queue):
            continue
        others.setdefault(source, []).append(
            _OtherBinding(_text(item.get("routing_key")), _mapping(item.get("arguments")))
        )

    bound: dict[str, BoundExchange] = {}
    skipped: dict[str, Skipped] = {}
    for exchange in exchanges:
        name = exchange.get("name")
        if not isinstance(name, str) or name in bound or name in skipped:
            # Nameless items cannot be bound or reported; repeated names are listed once.
            continue
        exchange_type = _text(exchange.get("type"))
        routing_type, reason = _classify(exchange, name, exchange_type, include, exclude)
        if routing_type is None:
            skipped[name] = Skipped(name, exchange_type, reason)
            continue
        # Binding everything makes every message routable, which would stop unroutable messages
        # from reaching the alternate exchange; mirroring keeps that behaviour intact.
        effective: Mode = mode
        if mode == "all" and _has_alternate_exchange(exchange, known_policies):
            effective = "mirror"
        planned = _exchange_bindings(name, routing_type, effective, others.get(name, []))
        bound[name] = BoundExchange(name, exchange_type, effective, tuple(sorted(planned)))

    return BindingPlan(
        bound=tuple(bound[name] for name in sorted(bound)),
        skipped=tuple(skipped[name] for name in sorted(skipped)),
    )


def current_archive_bindings(
    bindings: Iterable[Mapping[str, Any]], archive_queue: str
) -> frozenset[ArchiveBinding]:
    """The archive queue's existing bindings, without the implicit default-exchange one."""
    current: set[ArchiveBinding] = set()
    for item in bindings:
        source = item.get("source")
        # Every queue is implicitly bound to the default exchange under its own name; that
        # binding cannot be removed and is not the archive's doing.
        if not isinstance(source, str) or not source:
            continue
        if _is_archive_destination(item, archive_queue):
            current.add(
                ArchiveBinding.of(source, _text(item.get("routing_key")), _mapping(item.get("arguments")))
            )
    return frozenset(current)


def reconcile(plan: BindingPlan, current: Iterable[ArchiveBinding]) -> Reconciliation:
    """The bindings to add and to remove so that the current ones become the planned ones."""
    wanted = plan.bindings
    present = frozenset(current)
    return Reconciliation(
        to_bind=tuple(sorted(wanted - present)),
        to_unbind=tuple(sorted(present - wanted)),
    )


def broker_terms(
    listed: Iterable[ArchiveBinding], aliases: Mapping[ArchiveBinding, ArchiveBinding]
) -> frozenset[ArchiveBinding]:
    """The archive's bindings as listed, with each one the broker shows in its own form
    replaced by the planned binding it is (see BindingKeeper._learn_aliases)."""
    return frozenset(aliases.get(binding, binding) for binding in listed)


@dataclass(frozen=True, slots=True)
class ExchangeState:
    """What the archive does with one exchange after a round: for `status` and the log."""

    exchange: str
    type: str
    # bound, skipped, refused (no permission), failed (another broker error), unrepresentable
    state: str
    reason: str


def exchange_states(
    plan: BindingPlan,
    refused: Mapping[str, tuple[float, str, str]],
    unrepresentable: Mapping[ArchiveBinding, str],
) -> list[ExchangeState]:
    """Every exchange of the plan with its state and reason, sorted by name."""
    blocked: dict[str, str] = {}
    for binding, reason in sorted(unrepresentable.items()):
        blocked.setdefault(
            binding.exchange, f"binding {binding.routing_key!r} cannot be sent as listed: {reason}"
        )
    states = []
    for bound in plan.bound:
        if bound.exchange in refused:
            _, kind, text = refused[bound.exchange]
            states.append(ExchangeState(bound.exchange, bound.type, kind, text))
        elif bound.exchange in blocked:
            states.append(
                ExchangeState(bound.exchange, bound.type, "unrepresentable", blocked[bound.exchange])
            )
        else:
            states.append(ExchangeState(bound.exchange, bound.type, "bound", bound.mode))
    states.extend(ExchangeState(s.exchange, s.type, "skipped", s.reason) for s in plan.skipped)
    return sorted(states, key=lambda state: state.exchange)


TRACE_EXCHANGE = "amq.rabbitmq.trace"
# The tracer publishes a copy of each publish with routing key "publish.<exchange>": for the
# default exchange (name "") that is exactly "publish.", which no other exchange's copy has.
DEFAULT_EXCHANGE_TRACES = "publish."


def with_default_exchange_traces(plan: BindingPlan) -> BindingPlan:
    """SOURCE=bindings+default: the plan plus the tracer's copies of default-exchange publishes."""
    trace = BoundExchange(
        TRACE_EXCHANGE, "topic", "all", (ArchiveBinding.of(TRACE_EXCHANGE, DEFAULT_EXCHANGE_TRACES),)
    )
    # The default exchange itself is captured through the tracer: no binding of its own.
    default = BoundExchange("", "direct", "all", ())
    return BindingPlan(
        bound=(default, *plan.bound, trace),
        skipped=tuple(skipped for skipped in plan.skipped if skipped.exchange not in (TRACE_EXCHANGE, "")),
    )
