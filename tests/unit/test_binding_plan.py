"""Unit tests for capture.binding_plan: which bindings the archive queue gets, and how they change."""

from typing import Any, Literal

import pytest

from rabbit_archive.capture.binding_plan import (
    ArchiveBinding,
    BindingPlan,
    BoundExchange,
    Reconciliation,
    Skipped,
    current_archive_bindings,
    plan_bindings,
    reconcile,
)

ARCHIVE = "rabbit-archive"
B = ArchiveBinding.of
MATCH_ALL = {"x-match": "all"}


def exchange(
    name: str,
    type_: str | None = "topic",
    arguments: dict[str, Any] | None = None,
    policy: str | None = None,
    internal: bool = False,
) -> dict[str, Any]:
    item: dict[str, Any] = {
        "name": name,
        "durable": True,
        "auto_delete": False,
        "internal": internal,
        "arguments": arguments or {},
        "vhost": "/",
        "user_who_performed_action": "guest",
    }
    if type_ is not None:
        item["type"] = type_
    if policy is not None:
        item["policy"] = policy
    return item


def binding(
    source: str,
    destination: str,
    routing_key: str = "",
    arguments: dict[str, Any] | None = None,
    destination_type: str = "queue",
) -> dict[str, Any]:
    return {
        "source": source,
        "vhost": "/",
        "destination": destination,
        "destination_type": destination_type,
        "routing_key": routing_key,
        "arguments": arguments or {},
        "properties_key": routing_key or "~",
    }


def plan(
    exchanges: list[dict[str, Any]],
    bindings: list[dict[str, Any]] | None = None,
    mode: Literal["all", "mirror"] = "all",
    **kwargs: Any,
) -> BindingPlan:
    return plan_bindings(exchanges, bindings or [], archive_queue=ARCHIVE, mode=mode, **kwargs)


def only_bound(result: BindingPlan) -> BoundExchange:
    assert len(result.bound) == 1, result
    return result.bound[0]


def only_skipped(result: BindingPlan) -> Skipped:
    assert len(result.skipped) == 1, result
    assert result.bound == ()
    return result.skipped[0]


# ArchiveBinding


def test_archive_binding_arguments_are_canonical_and_hashable() -> None:
    one = B("ex", "", {"b": 1, "a": "x"})
    other = B("ex", "", {"a": "x", "b": 1})
    assert one == other
    assert hash(one) == hash(other)
    assert one.arguments_json == '{"a":"x","b":1}'
    assert one.arguments == {"a": "x", "b": 1}
    assert B("ex", "k").arguments_json == "{}"
    assert B("ex", "k", None) == ArchiveBinding("ex", "k")


def test_archive_binding_arguments_returns_a_fresh_dict() -> None:
    item = B("ex", "", MATCH_ALL)
    item.arguments["x-match"] = "any"
    assert item.arguments == MATCH_ALL


# topic


def test_topic_all_binds_hash() -> None:
    result = plan([exchange("events", "topic")], [binding("events", "q1", "order.*")])
    bound = only_bound(result)
    assert bound == BoundExchange("events", "topic", "all", (B("events", "#"),))
    assert result.bindings == frozenset({B("events", "#")})


def test_topic_mirror_binds_each_distinct_key() -> None:
    result = plan(
        [exchange("events", "topic")],
        [
            binding("events", "q1", "order.*"),
            binding("events", "q2", "order.*"),
            binding("events", "other-ex", "#.audit", destination_type="exchange"),
        ],
        mode="mirror",
    )
    bound = only_bound(result)
    assert bound.mode == "mirror"
    assert bound.bindings == (B("events", "#.audit"), B("events", "order.*"))


def test_topic_mirror_without_other_bindings_is_listed_empty() -> None:
    result = plan([exchange("events", "topic")], mode="mirror")
    assert only_bound(result) == BoundExchange("events", "topic", "mirror", ())
    assert result.bindings == frozenset()


# fanout


def test_fanout_all_binds_empty_key_even_without_other_bindings() -> None:
    result = plan([exchange("broadcast", "fanout")])
    assert only_bound(result) == BoundExchange("broadcast", "fanout", "all", (B("broadcast", ""),))


def test_fanout_mirror_binds_once_when_others_are_bound() -> None:
    result = plan(
        [exchange("broadcast", "fanout")],
        [binding("broadcast", "q1"), binding("broadcast", "q2", "ignored")],
        mode="mirror",
    )
    assert only_bound(result).bindings == (B("broadcast", ""),)


def test_fanout_mirror_without_others_binds_nothing() -> None:
    result = plan(
        [exchange("broadcast", "fanout")],
        [binding("broadcast", ARCHIVE)],
        mode="mirror",
    )
    assert only_bound(result) == BoundExchange("broadcast", "fanout", "mirror", ())


# headers


def test_headers_all_binds_match_all_without_keys() -> None:
    result = plan([exchange("hdr", "headers")], [binding("hdr", "q1", "", {"x-match": "any"})])
    bound = only_bound(result)
    assert bound.mode == "all"
    assert bound.bindings == (B("hdr", "", {"x-match": "all"}),)
    assert bound.bindings[0].arguments == {"x-match": "all"}


def test_headers_mirror_copies_each_distinct_arguments_dict() -> None:
    result = plan(
        [exchange("hdr", "headers")],
        [
            binding("hdr", "q1", "", {"x-match": "any", "format": "pdf", "type": "report"}),
            binding("hdr", "q2", "", {"type": "report", "format": "pdf", "x-match": "any"}),
            binding("hdr", "q3", "", {"x-match": "all", "format": "zip"}),
            binding("hdr", "ex2", "", {"region": "eu"}, destination_type="exchange"),
        ],
        mode="mirror",
    )
    bound = only_bound(result)
    assert set(bound.bindings) == {
        B("hdr", "", {"x-match": "any", "format": "pdf", "type": "report"}),
        B("hdr", "", {"x-match": "all", "format": "zip"}),
        # no x-match means all; spelled out so both forms collapse into one binding
        B("hdr", "", {"x-match": "all", "region": "eu"}),
    }
    assert len(bound.bindings) == 3


def test_headers_mirror_implicit_and_explicit_all_collapse() -> None:
    result = plan(
        [exchange("hdr", "headers")],
        [
            binding("hdr", "q1", "", {"k": 1}),
            binding("hdr", "q2", "", {"k": 1, "x-match": "all"}),
        ],
        mode="mirror",
    )
    assert only_bound(result).bindings == (B("hdr", "", {"k": 1, "x-match": "all"}),)


# direct


@pytest.mark.parametrize("mode", ["all", "mirror"])
def test_direct_binds_every_key_others_bind(mode: Literal["all", "mirror"]) -> None:
    result = plan(
        [exchange("orders", "direct"), exchange("other", "direct")],
        [
            binding("orders", "q1", "created"),
            binding("orders", "q2", "created"),
            binding("orders", "q3", "paid"),
            binding("orders", "audit-ex", "refunded", destination_type="exchange"),
            binding("orders", ARCHIVE, "stale"),
            binding("other", "q4", "unrelated"),
        ],
        mode=mode,
    )
    orders = result.bound[0]
    assert orders.exchange == "orders"
    assert orders.mode == mode
    assert orders.bindings == (
        B("orders", "created"),
        B("orders", "paid"),
        B("orders", "refunded"),
    )
    assert B("orders", "stale") not in result.bindings


def test_direct_without_other_bindings_is_listed_empty() -> None:
    result = plan([exchange("orders", "direct")], [binding("orders", ARCHIVE, "old")])
    assert only_bound(result) == BoundExchange("orders", "direct", "all", ())


def test_exchange_named_like_the_archive_queue_counts_as_other() -> None:
    result = plan(
        [exchange("orders", "direct")],
        [binding("orders", ARCHIVE, "to-exchange", destination_type="exchange")],
    )
    assert only_bound(result).bindings == (B("orders", "to-exchange"),)


def test_bindings_from_another_exchange_do_not_count() -> None:
    result = plan(
        [exchange("a", "fanout"), exchange("b", "fanout")],
        [binding("a", "q1")],
        mode="mirror",
    )
    assert [(b.exchange, b.bindings) for b in result.bound] == [("a", (B("a", ""),)), ("b", ())]


# alternate exchange


@pytest.mark.parametrize(
    ("type_", "others", "expected"),
    [
        ("topic", [binding("ae-src", "q1", "a.b")], (B("ae-src", "a.b"),)),
        ("fanout", [], ()),
        ("headers", [binding("ae-src", "q1", "", {"k": "v"})], (B("ae-src", "", {"k": "v"} | MATCH_ALL),)),
    ],
)
def test_alternate_exchange_argument_forces_mirror_in_all_mode(
    type_: str, others: list[dict[str, Any]], expected: tuple[ArchiveBinding, ...]
) -> None:
    result = plan([exchange("ae-src", type_, {"alternate-exchange": "unrouted"})], others)
    assert only_bound(result) == BoundExchange("ae-src", type_, "mirror", expected)


def test_alternate_exchange_from_policy_forces_mirror_in_all_mode() -> None:
    exchanges = [
        exchange("with-policy", "topic", policy="ae-policy"),
        exchange("other-policy", "topic", policy="ha"),
        exchange("unknown-policy", "topic", policy="gone"),
    ]
    bindings = [binding(name, "q", "k") for name in ("with-policy", "other-policy", "unknown-policy")]
    policies = {"ae-policy": {"alternate-exchange": "unrouted"}, "ha": {"max-length": 10}}
    result = plan(exchanges, bindings, policies=policies)
    assert [(b.exchange, b.mode, b.bindings) for b in result.bound] == [
        ("other-policy", "all", (B("other-policy", "#"),)),
        ("unknown-policy", "all", (B("unknown-policy", "#"),)),
        ("with-policy", "mirror", (B("with-policy", "k"),)),
    ]


def test_alternate_exchange_without_policies_given_is_only_read_from_arguments() -> None:
    result = plan([exchange("x", "topic", policy="ae-policy")], [binding("x", "q", "k")])
    assert only_bound(result).mode == "all"


# never bound


@pytest.mark.parametrize("type_", ["x-consistent-hash", "x-random", "x-modulus-hash"])
@pytest.mark.parametrize("mode", ["all", "mirror"])
def test_single_delivery_exchanges_are_never_bound(type_: str, mode: Literal["all", "mirror"]) -> None:
    result = plan([exchange("shard", type_)], [binding("shard", "q1", "1")], mode=mode)
    skipped = only_skipped(result)
    assert skipped == Skipped(
        "shard",
        type_,
        f"{type_} delivers each message to one queue only; binding would steal messages",
    )
    assert result.bindings == frozenset()


@pytest.mark.parametrize("mode", ["all", "mirror"])
def test_unknown_type_is_skipped_as_unsafe(mode: Literal["all", "mirror"]) -> None:
    result = plan([exchange("odd", "x-foo")], [binding("odd", "q1", "k")], mode=mode)
    assert only_skipped(result) == Skipped(
        "odd",
        "x-foo",
        "unknown exchange type 'x-foo': not known to copy every message to every queue",
    )


def test_missing_type_is_skipped() -> None:
    skipped = only_skipped(plan([exchange("typeless", None)]))
    assert skipped.exchange == "typeless"
    assert skipped.type == ""
    assert "type missing" in skipped.reason


def test_default_and_broker_internal_exchanges_are_skipped() -> None:
    result = plan(
        [
            exchange("", "direct"),
            exchange("amq.rabbitmq.trace", "topic", internal=True),
            exchange("amq.rabbitmq.event", "topic"),
            exchange("amq.topic", "topic"),
        ],
        [binding("", "q1", "q1")],
    )
    assert result.skipped == (
        Skipped("", "direct", "default exchange"),
        Skipped("amq.rabbitmq.event", "topic", "internal to the broker (amq.rabbitmq.*)"),
        Skipped("amq.rabbitmq.trace", "topic", "internal to the broker (amq.rabbitmq.*)"),
    )
    assert result.bindings == frozenset({B("amq.topic", "#")})


def test_internal_exchanges_are_bound_like_others() -> None:
    result = plan([exchange("inner", "fanout", internal=True)])
    assert only_bound(result).bindings == (B("inner", ""),)


# include / exclude


def test_include_and_exclude_globs() -> None:
    names = ["orders", "orders.dlx", "billing", "Orders-x", "tmp.1", "amq.direct"]
    result = plan(
        [exchange(name, "fanout") for name in names],
        include=["orders*", "billing", "tmp.?", "amq.*"],
        exclude=["*.dlx", "tmp.*"],
    )
    assert [b.exchange for b in result.bound] == ["amq.direct", "billing", "orders"]
    assert result.skipped == (
        Skipped("Orders-x", "fanout", "not matched by RABBIT_ARCHIVE_INCLUDE"),
        Skipped("orders.dlx", "fanout", "excluded by RABBIT_ARCHIVE_EXCLUDE"),
        Skipped("tmp.1", "fanout", "excluded by RABBIT_ARCHIVE_EXCLUDE"),
    )


def test_empty_include_matches_nothing() -> None:
    result = plan([exchange("a", "fanout")], include=[])
    assert only_skipped(result).reason == "not matched by RABBIT_ARCHIVE_INCLUDE"


def test_default_exchange_reason_wins_over_include() -> None:
    result = plan([exchange("", "direct")], include=["orders"])
    assert only_skipped(result).reason == "default exchange"


# x-delayed-message


@pytest.mark.parametrize(
    ("delayed_type", "mode", "expected"),
    [
        ("topic", "all", (B("later", "#"),)),
        ("topic", "mirror", (B("later", "job.*"),)),
        ("fanout", "all", (B("later", ""),)),
        ("fanout", "mirror", (B("later", ""),)),
        ("headers", "all", (B("later", "", MATCH_ALL),)),
        ("direct", "all", (B("later", "job.*"),)),
        ("direct", "mirror", (B("later", "job.*"),)),
    ],
)
def test_delayed_message_follows_its_delayed_type(
    delayed_type: str, mode: Literal["all", "mirror"], expected: tuple[ArchiveBinding, ...]
) -> None:
    result = plan(
        [exchange("later", "x-delayed-message", {"x-delayed-type": delayed_type})],
        [binding("later", "q1", "job.*")],
        mode=mode,
    )
    assert only_bound(result) == BoundExchange("later", "x-delayed-message", mode, expected)


@pytest.mark.parametrize(
    ("arguments", "in_reason"),
    [
        ({"x-delayed-type": "x-consistent-hash"}, "x-consistent-hash delivers each message"),
        ({"x-delayed-type": "x-foo"}, "'x-foo': not known to copy every message"),
        ({}, "without an x-delayed-type"),
    ],
)
def test_delayed_message_with_unsafe_or_missing_delayed_type_is_skipped(
    arguments: dict[str, Any], in_reason: str
) -> None:
    skipped = only_skipped(plan([exchange("later", "x-delayed-message", arguments)]))
    assert skipped.type == "x-delayed-message"
    assert in_reason in skipped.reason


# tolerance and ordering


def test_tolerates_missing_keys_and_list_arguments() -> None:
    exchanges: list[dict[str, Any]] = [
        {"name": "t", "type": "topic"},
        {"name": "h", "type": "headers", "arguments": []},
        {"type": "fanout"},
    ]
    bindings: list[dict[str, Any]] = [
        {"source": "t", "destination": "q"},
        {"source": "h", "destination": "q", "routing_key": "", "arguments": []},
    ]
    result = plan_bindings(exchanges, bindings, archive_queue=ARCHIVE, mode="mirror")
    assert result.bindings == frozenset({B("t", ""), B("h", "", MATCH_ALL)})


def test_results_are_sorted_and_repeated_names_listed_once() -> None:
    result = plan(
        [exchange(name, "topic") for name in ("c", "a", "b", "a")]
        + [exchange("z", "x-random"), exchange("y", "x-random")],
    )
    assert [b.exchange for b in result.bound] == ["a", "b", "c"]
    assert [s.exchange for s in result.skipped] == ["y", "z"]


def test_invalid_mode_is_rejected() -> None:
    with pytest.raises(ValueError, match="binding mode"):
        plan_bindings([], [], archive_queue=ARCHIVE, mode="some")  # type: ignore[arg-type]


# current bindings and reconciliation


def test_current_archive_bindings_ignores_default_exchange_and_others() -> None:
    listed = [
        binding("", ARCHIVE, ARCHIVE),
        binding("events", ARCHIVE, "#"),
        binding("hdr", ARCHIVE, "", {"x-match": "all"}),
        binding("events", "q1", "order.*"),
        binding("events", ARCHIVE, "x", destination_type="exchange"),
    ]
    assert current_archive_bindings(listed, ARCHIVE) == frozenset({B("events", "#"), B("hdr", "", MATCH_ALL)})


def test_reconcile_binds_missing_and_unbinds_stale() -> None:
    result = plan(
        [exchange("events", "topic"), exchange("orders", "direct"), exchange("shard", "x-random")],
        [binding("orders", "q1", "paid"), binding("orders", "q1", "created")],
    )
    current = {B("events", "#"), B("orders", "refunded"), B("shard", "1")}
    changes = reconcile(result, current)
    assert changes.to_bind == (B("orders", "created"), B("orders", "paid"))
    assert changes.to_unbind == (B("orders", "refunded"), B("shard", "1"))


def test_reconcile_does_nothing_when_equal() -> None:
    listed = [binding("events", "q1", "a"), binding("hdr", "q1", "", {"k": 1})]
    result = plan([exchange("events", "topic"), exchange("hdr", "headers")], listed)
    listed += [binding("events", ARCHIVE, "#"), binding("hdr", ARCHIVE, "", MATCH_ALL)]
    changes = reconcile(result, current_archive_bindings(listed, ARCHIVE))
    assert changes.to_bind == ()
    assert changes.to_unbind == ()


def test_reconcile_compares_headers_arguments() -> None:
    result = plan([exchange("hdr", "headers")])
    changes = reconcile(result, [B("hdr", "", {"x-match": "any"})])
    assert changes.to_bind == (B("hdr", "", MATCH_ALL),)
    assert changes.to_unbind == (B("hdr", "", {"x-match": "any"}),)


def test_mirror_follows_other_bindings_as_they_change() -> None:
    exchanges = [exchange("orders", "direct")]
    before = [binding("orders", "q1", "paid"), binding("orders", ARCHIVE, "paid")]
    steady = reconcile(plan(exchanges, before), current_archive_bindings(before, ARCHIVE))
    assert steady == Reconciliation((), ())
    # q1 moved from "paid" to "shipped": the archive follows, its own "paid" binding is dropped
    after = [binding("orders", "q1", "shipped"), binding("orders", ARCHIVE, "paid")]
    changes = reconcile(plan(exchanges, after), current_archive_bindings(after, ARCHIVE))
    assert changes.to_bind == (B("orders", "shipped"),)
    assert changes.to_unbind == (B("orders", "paid"),)
