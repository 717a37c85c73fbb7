"""Every name RabbitMQ accepts is captured and replayed byte for byte, and never stops capture.

Names are generated across the legal space (any UTF-8 up to 255 bytes: non-ASCII letters,
emoji, spaces, tabs, brackets, backticks, quotes, NUL, exactly 255 bytes), declared on the
real broker with pika (which, unlike pamqp, only checks the 255-byte limit), bound by the
running daemon, published, found in the archive with the exact name, and replayed to the
original exchange, to another such exchange and into such a queue. Meanwhile an ordinary
exchange receives a steady stream that must be archived without a gap.
"""

import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import httpx
import pika
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from tests.acceptance.test_replay import ok, replay_command
from tests.conftest import run_sql
from tests.support.daemon import CaptureProcess, wait_for
from tests.support.load import BackgroundPublisher

pytestmark = pytest.mark.acceptance

# Characters frameworks put in names (generic .NET type names, shell-ish punctuation).
SPECIAL = "`[]<>,$%&'()*!?=^{|}~\"; \\\t.#/:@+-_"
ANY_CHARACTER = st.characters(codec="utf-8", exclude_categories=("Cs",))


def _fit(text: str, size: int = 255) -> str:
    """Cut to at most `size` UTF-8 bytes on a character boundary."""
    return text.encode("utf-8")[:size].decode("utf-8", "ignore")


def _exactly_255_bytes(text: str) -> str:
    cut = _fit(text)
    return cut + "x" * (255 - len(cut.encode("utf-8")))


# RabbitMQ 3.10 answers declare-ok to an exchange or queue name holding CR or LF, then cannot
# find it again (NOT_FOUND on the next passive declare or publish; measured): such a name can
# carry no message, so it is outside the space to test.
BROKER_UNUSABLE = frozenset("\r\n")


def names() -> st.SearchStrategy[str]:
    """Exchange and queue names RabbitMQ accepts (the amq. prefix is reserved by the broker)."""
    return st.one_of(
        st.text(ANY_CHARACTER, min_size=1, max_size=80).map(_fit),
        st.text(st.sampled_from(SPECIAL + "aZ9éßж日本語🐇"), min_size=1, max_size=60),
        st.text(ANY_CHARACTER, max_size=90).map(_exactly_255_bytes),
    ).filter(lambda name: not name.startswith("amq.") and not set(name) & BROKER_UNUSABLE)


def target_names() -> st.SearchStrategy[str]:
    """Names given on the command line (--to-queue, --to-exchange): argv cannot carry NUL."""
    return names().filter(lambda name: "\x00" not in name)


def routing_keys() -> st.SearchStrategy[str]:
    return st.one_of(
        st.text(ANY_CHARACTER, max_size=80).map(_fit),
        st.text(st.sampled_from(SPECIAL + "aé🐇"), max_size=60),
        st.text(ANY_CHARACTER, max_size=90).map(_exactly_255_bytes),
    )


DOTNET = (
    "MassTransit.Fault`1[[Contoso.Orders.OrderSubmitted, Contoso.Orders, Version=1.0.0.0, Culture=neutral]]"
)
REGRESSIONS = [
    # (exchange, routing key, target queue, target exchange)
    (DOTNET, "Contoso.Orders.OrderSubmitted", DOTNET + " queue", DOTNET + " copy"),
    ("заказы", "события.создан", "очередь заказов", "копия"),
    ("注文 🐇", "注文.作成", "キュー", "交換"),
    ("with space\tand tab", "key with space", "q (1)", "e [2]"),
    ("x" * 255, "k" * 255, "q" * 255, "e" * 255),
    ("é" * 127 + "x", "ü" * 127 + "k", "ö" * 127 + "q", "ä" * 127 + "e"),
    # A target name cannot hold NUL: it comes from the command line.
    ("nul\x00inside", "key\x00nul", "q nul", "e nul"),
    (SPECIAL, SPECIAL, SPECIAL + "q", SPECIAL + "e"),
]


class Broker:
    """pika on the test vhost plus the management API, for declaring and reading names."""

    def __init__(self, channel: Any, management: httpx.Client, vhost: str) -> None:
        self.channel = channel
        self.management = management
        self.vhost = vhost

    def archive_bound_to(self, exchange: str) -> bool:
        path = f"/api/queues/{quote(self.vhost, safe='')}/rabbit-archive/bindings"
        return any(item.get("source") == exchange for item in self.management.get(path).json())

    def get_one(self, queue: str, timeout: float = 20) -> tuple[Any, bytes]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            method, _properties, body = self.channel.basic_get(queue, auto_ack=True)
            if method is not None:
                return method, body
            time.sleep(0.05)
        raise AssertionError(f"nothing arrived in queue {queue!r}")

    def assert_empty(self, queue: str) -> None:
        method, _, _ = self.channel.basic_get(queue, auto_ack=True)
        assert method is None, f"queue {queue!r} holds another message"


def stored_names(database_url: str, message_id: str) -> list[tuple[bytes, bytes, bytes]]:
    rows = run_sql(
        database_url,
        "SELECT coalesce(exchange_raw, convert_to(exchange, 'UTF8')),"
        " coalesce(routing_key_raw, convert_to(routing_key, 'UTF8')), body"
        " FROM rabbit_archive.messages WHERE message_id = $1 AND replay_id IS NULL",
        message_id,
    )
    return [(bytes(row[0]), bytes(row[1]), bytes(row[2])) for row in rows]


def test_every_legal_name_is_captured_and_replayed_while_ordinary_traffic_goes_on(
    start_capture: Callable[..., CaptureProcess],
    capture_env: dict[str, str],
    pika_channel: Any,
    management: httpx.Client,
    vhost: str,
    amqp_url: str,
    database_url: str,
) -> None:
    daemon = start_capture()
    broker = Broker(pika_channel, management, vhost)
    pika_channel.exchange_declare("ordinary", "topic", durable=True)
    pika_channel.queue_declare("ordinary-consumer", durable=True)
    pika_channel.queue_bind("ordinary-consumer", "ordinary", "#")
    daemon.wait_bound("ordinary")
    ordinary = BackgroundPublisher(amqp_url, "ordinary", 1_000_000, rate=200).start()
    env = dict(capture_env)
    seen: set[str] = set()
    checked: list[str] = []

    @settings(
        max_examples=9,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(names(), routing_keys(), target_names(), target_names())
    def check(exchange: str, routing_key: str, target_queue: str, target_exchange: str) -> None:
        # Each example uses new names: a name seen before would be declared already. Rejected (not
        # returned from) so that hypothesis draws another in its place: skipped examples used to
        # count, and a run that drew a few repeats fell short of the examples asserted below.
        assume(not {exchange, target_queue, target_exchange} & seen and len({exchange, target_exchange}) == 2)
        seen.update({exchange, target_queue, target_exchange})
        token = uuid.uuid4().hex
        original_queue = f"original-{token}"
        copy_queue = f"copy-{token}"
        pika_channel.exchange_declare(exchange, "topic")
        pika_channel.queue_declare(original_queue)
        pika_channel.queue_bind(original_queue, exchange, "#")
        pika_channel.exchange_declare(target_exchange, "fanout")
        pika_channel.queue_declare(copy_queue)
        pika_channel.queue_bind(copy_queue, target_exchange)
        pika_channel.queue_declare(target_queue)
        wait_for(lambda: broker.archive_bound_to(exchange), 15, what=f"archive bound to {exchange!r}")

        body = token.encode() + bytes(range(256))
        pika_channel.basic_publish(
            exchange, routing_key, body, pika.BasicProperties(message_id=token), mandatory=True
        )
        method, received = broker.get_one(original_queue)
        assert received == body
        wait_for(lambda: stored_names(database_url, token), 15, what="the archived message")
        assert stored_names(database_url, token) == [
            (exchange.encode("utf-8"), routing_key.encode("utf-8"), body)
        ]

        # Back to its original exchange, as the broker routed it first.
        ok(replay_command(env, "run", "--message-id", token, "--yes"))
        method, received = broker.get_one(original_queue)
        assert (method.exchange, method.routing_key, received) == (exchange, routing_key, body)
        broker.assert_empty(original_queue)
        # Straight into a queue with such a name, and through another such exchange.
        ok(replay_command(env, "run", "--message-id", token, "--to-queue", target_queue, "--yes"))
        method, received = broker.get_one(target_queue)
        assert (method.exchange, method.routing_key, received) == ("", target_queue, body)
        ok(replay_command(env, "run", "--message-id", token, "--to-exchange", target_exchange, "--yes"))
        method, received = broker.get_one(copy_queue)
        assert (method.exchange, method.routing_key, received) == (target_exchange, routing_key, body)
        found = ok(replay_command(env, "find", "--message-id", token, "--count"))
        assert found.strip() == "1"
        checked.append(exchange)

    for regression in reversed(REGRESSIONS):
        check = example(*regression)(check)
    try:
        check()
    finally:
        ordinary.stop()
    published = ordinary.join()
    # Every regression example and most generated ones went the whole way.
    assert len(checked) >= len(REGRESSIONS) + 8, checked
    assert daemon.process is not None
    assert daemon.process.poll() is None, daemon.log()

    def ordinary_rows() -> int:
        return int(
            run_sql(database_url, "SELECT count(*) FROM rabbit_archive.messages WHERE exchange = 'ordinary'")[
                0
            ][0]
        )

    wait_for(lambda: ordinary_rows() >= published, 30, what=f"{published} ordinary messages")
    assert ordinary_rows() == published
    assert published > 0


def test_names_pamqp_refuses_do_not_stop_capture_across_a_restart(
    start_capture: Callable[..., CaptureProcess],
    pika_channel: Any,
    management: httpx.Client,
    vhost: str,
    database_url: str,
) -> None:
    """The first discovery round of a new daemon meets such names: it binds them and goes on."""
    broker = Broker(pika_channel, management, vhost)
    odd = [DOTNET, "заказы", "with space\tand tab", "x" * 255]
    for name in odd:
        pika_channel.exchange_declare(name, "fanout")
    pika_channel.exchange_declare("plain", "topic")
    for _ in range(2):
        daemon = start_capture()
        for name in [*odd, "plain"]:
            wait_for(lambda name=name: broker.archive_bound_to(name), 15, what=f"archive bound to {name!r}")
        for name in [*odd, "plain"]:
            pika_channel.basic_publish(name, "k", name.encode(), mandatory=False)
        for name in [*odd, "plain"]:
            wait_for(
                lambda name=name: run_sql(
                    database_url, "SELECT 1 FROM rabbit_archive.messages WHERE exchange = $1", name
                ),
                15,
                what=f"a message of {name!r}",
            )
        assert daemon.process is not None
        assert daemon.process.poll() is None, daemon.log()
        assert daemon.stop() == 0
        run_sql(database_url, "DELETE FROM rabbit_archive.messages")
