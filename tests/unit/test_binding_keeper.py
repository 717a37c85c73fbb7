"""The binding keeper's rounds against an in-memory broker: isolation per binding, and mirror mode
converging when the broker lists arguments in another form than they were sent."""

import asyncio
from typing import Any

import aiormq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pamqp import commands

from rabbit_archive.archive.amqp_codec import decode_table
from rabbit_archive.capture.discovery import BindingKeeper, Channels
from rabbit_archive.capture.metrics import CaptureMetrics
from rabbit_archive.config.settings import Settings

VHOST = "v"


def _shortstr(payload: bytes, position: int) -> tuple[str, int]:
    length = payload[position]
    return payload[position + 1 : position + 1 + length].decode(), position + 1 + length


def _view(letter_value: tuple[str, Any]) -> Any:
    letter, value = letter_value
    if letter == "S":
        return value.decode()
    if letter == "F":
        return {key.decode(): _view(item) for key, item in value}
    if letter == "A":
        return [_view(item) for item in value]
    return value


class FakeBroker:
    """Bindings as a broker holds them, listed the way a management API might show them."""

    def __init__(self, exchanges: list[dict[str, Any]], others: list[dict[str, Any]], show: Any) -> None:
        self.exchanges = exchanges
        self.others = others
        self.show = show
        self.archive: list[tuple[str, str, dict[str, Any]]] = []
        self.log: list[tuple[str, str]] = []
        self.refuse: dict[str, aiormq.exceptions.ChannelClosed] = {}

    def rpc(self, frame: Any) -> None:
        payload = frame.marshal()
        _queue, position = _shortstr(payload, 2)
        exchange, position = _shortstr(payload, position)
        key, position = _shortstr(payload, position)
        if isinstance(frame, commands.Queue.Bind):
            position += 1  # nowait
        table, _ = decode_table(payload, position)
        arguments = {k.decode(): _view(v) for k, v in table}
        if exchange in self.refuse:
            raise self.refuse[exchange]
        if isinstance(frame, commands.Queue.Bind):
            self.archive.append((exchange, key, arguments))
            self.log.append(("bind", exchange))
        else:
            self.archive.remove((exchange, key, arguments))
            self.log.append(("unbind", exchange))

    def listed_bindings(self) -> list[dict[str, Any]]:
        ours = [
            {
                "source": exchange,
                "destination": "rabbit-archive",
                "destination_type": "queue",
                "routing_key": key,
                "arguments": self.show(arguments),
            }
            for exchange, key, arguments in self.archive
        ]
        return [*self.others, *ours]


class FakeApi:
    def __init__(self, broker: FakeBroker) -> None:
        self.broker = broker

    async def exchanges(self, vhost: str) -> list[dict[str, Any]]:
        return self.broker.exchanges

    async def bindings(self, vhost: str) -> list[dict[str, Any]]:
        return self.broker.listed_bindings()

    async def policies(self, vhost: str) -> dict[str, dict[str, Any]]:
        return {}

    async def queue(self, vhost: str, name: str) -> dict[str, Any] | None:
        return {"messages": 0}


class FakeChannel:
    is_closed = False

    def __init__(self, broker: FakeBroker) -> None:
        self.broker = broker

    async def rpc(self, frame: Any) -> None:
        self.broker.rpc(frame)


class FakeConnection:
    def __init__(self, broker: FakeBroker) -> None:
        self.broker = broker

    async def channel(self) -> FakeChannel:
        return FakeChannel(self.broker)


def keeper_for(broker: FakeBroker, mode: str = "mirror") -> tuple[BindingKeeper, Channels]:
    settings_ = Settings(_env_file=None, binding_mode=mode)  # type: ignore[call-arg]
    keeper = BindingKeeper(settings_, FakeApi(broker), CaptureMetrics())  # type: ignore[arg-type]
    return keeper, Channels(FakeConnection(broker))  # type: ignore[arg-type]


def headers_binding(exchange: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {
        "source": exchange,
        "destination": "consumer",
        "destination_type": "queue",
        "routing_key": "",
        "arguments": arguments,
    }


def as_floats(value: Any) -> Any:
    """A listing that shows every integer as a float (1 -> 1.0), as a JSON encoder might."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return float(value)
    if isinstance(value, dict):
        return {k: as_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [as_floats(v) for v in value]
    return value


SCALARS = st.one_of(st.booleans(), st.integers(-(2**40), 2**40), st.text(max_size=5))


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=5), SCALARS, min_size=1, max_size=4))
def test_mirror_mode_converges_when_the_listing_shows_arguments_differently(
    arguments: dict[str, Any],
) -> None:
    arguments = {"x-match": "all", **arguments}
    broker = FakeBroker(
        [{"name": "hdr", "type": "headers"}], [headers_binding("hdr", arguments)], show=as_floats
    )
    keeper, channels = keeper_for(broker)

    async def rounds() -> None:
        for _ in range(6):
            await keeper.reconcile_once(channels, VHOST)

    asyncio.run(rounds())
    # Bound once and never unbound and bound again (each flap would miss messages).
    assert broker.log == [("bind", "hdr")]
    assert keeper.states[VHOST][0].state == "bound"


def test_one_refused_binding_costs_only_its_exchange() -> None:
    exchanges = [{"name": name, "type": "topic"} for name in ("a", "b", "c")]
    broker = FakeBroker(exchanges, [], show=lambda arguments: arguments)
    broker.refuse["b"] = aiormq.exceptions.ChannelPreconditionFailed("PRECONDITION_FAILED - odd plugin")
    keeper, channels = keeper_for(broker, mode="all")

    async def rounds() -> None:
        for _ in range(3):
            await keeper.reconcile_once(channels, VHOST)

    asyncio.run(rounds())
    assert sorted(exchange for exchange, _, _ in broker.archive) == ["a", "c"]
    states = {state.exchange: state for state in keeper.states[VHOST]}
    assert states["b"].state == "failed"
    assert "odd plugin" in states["b"].reason
    assert (states["a"].state, states["c"].state) == ("bound", "bound")
    # Tried once, then left alone until REFUSED_RETRY has passed.
    assert broker.log.count(("bind", "a")) == 1


@pytest.mark.parametrize("arguments", [{"x-match": "all", "big": 2**64}, {"x-match": "all", "n": [2**70]}])
def test_an_unrepresentable_binding_is_reported_and_the_rest_bound(arguments: dict[str, Any]) -> None:
    broker = FakeBroker(
        [{"name": "hdr", "type": "headers"}, {"name": "t", "type": "topic"}],
        [headers_binding("hdr", arguments)],
        show=lambda arguments: arguments,
    )
    keeper, channels = keeper_for(broker)
    broker.others.append(
        {"source": "t", "destination": "c", "destination_type": "queue", "routing_key": "k", "arguments": {}}
    )
    asyncio.run(keeper.reconcile_once(channels, VHOST))
    asyncio.run(keeper.reconcile_once(channels, VHOST))
    states = {state.exchange: state for state in keeper.states[VHOST]}
    assert states["hdr"].state == "unrepresentable"
    assert "64-bit" in states["hdr"].reason
    assert states["t"].state == "bound"
    assert broker.archive == [("t", "k", {})]
