"""Replays made by the installed `rabbit-replay` reach the inbox example consumer as the contract says.

The capture daemon archives what a producer publishes; the example consumer (examples/inbox_consumer.py)
applies payments through rabbit_archive.inbox; replays to the original exchange, with
`--new-message-id` and `--to-queue` then arrive at the same consumer.
"""

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pika
import pytest

from rabbit_archive.archive.amqp_codec import Properties, encode_properties
from tests.acceptance.test_replay import json_lines, ok, replay_command
from tests.conftest import run_sql
from tests.support.daemon import CaptureProcess, wait_for
from tests.support.inbox import EXCHANGE, QUEUE, Consumer, fresh_database, publish, replay_copy
from tests.support.services import Services

pytestmark = pytest.mark.acceptance

README = Path(__file__).resolve().parents[2] / "README.md"


def publish_payment(channel: Any, body: dict[str, Any], **properties: Any) -> None:
    channel.basic_publish(
        EXCHANGE,
        "payment.eu",
        json.dumps(body).encode(),
        pika.BasicProperties(content_type="application/json", delivery_mode=2, **properties),
        mandatory=True,
    )


@pytest.mark.timeout(120)
def test_originals_and_their_replays_reach_the_inbox_consumer_once_unless_given_a_new_message_id(
    services: Services,
    amqp_url: str,
    capture_env: dict[str, str],
    start_capture: Callable[..., CaptureProcess],
    pika_channel: Any,
) -> None:
    archive_url = capture_env["RABBIT_ARCHIVE_DATABASE_URL"]
    daemon = start_capture()
    with fresh_database(services) as app_database:
        consumer = Consumer(amqp_url, app_database)
        try:
            consumer.wait_consuming()  # it declares the exchange, its queue and the binding
            daemon.wait_bound(EXCHANGE)
            publish_payment(pika_channel, {"account": "alice", "amount_cents": 1000}, message_id="pay-1")
            # pika sets no message_id unless told to: this one is keyed by its digest.
            publish_payment(
                pika_channel,
                {"account": "bob", "amount_cents": 250},
                headers={"tenant": "shop-1", "attempt": 1},
                timestamp=int(time.time()),
            )
            consumer.wait_handled(2)
            wait_for(
                lambda: run_sql(archive_url, "SELECT count(*) FROM rabbit_archive.messages")[0][0] == 2,
                30,
                what="2 archived messages",
            )

            # To the original exchange: the same message_id, so a duplicate.
            ok(replay_command(capture_env, "run", "--message-id", "pay-1", "--reason", "INC-1", "--yes"))
            consumer.wait_handled(3)
            # A fresh message_id: processed again, on purpose.
            ok(replay_command(capture_env, "run", "--message-id", "pay-1", "--new-message-id", "--yes"))
            consumer.wait_handled(4)
            # No message_id, straight into the queue through the default exchange: the digest
            # follows x-original-exchange / x-original-routing-key, so the key is the original's.
            ok(replay_command(capture_env, "run", "--body-json", "account=bob", "--to-queue", QUEUE, "--yes"))
            consumer.wait_handled(5)
            time.sleep(0.3)  # nothing more arrives
            events = consumer.handled()
        finally:
            consumer.close()

        history = sorted(json_lines(ok(replay_command(capture_env, "history", "--json"))), key=started)
        replays = [entry["replay_id"] for entry in history]
        assert [entry["confirmed"] for entry in history] == [1, 1, 1]
        outcomes = [(event["event"], event["key"], event["replay_id"]) for event in events]
        alice, bob, to_exchange, new_id, to_queue = outcomes
        assert alice == ("processed", "pay-1", None)
        assert bob[0] == "processed"
        assert bob[1].startswith("sha256:")
        assert to_exchange == ("duplicate", "pay-1", replays[0])
        assert new_id[0] == "processed"
        assert new_id[1] not in ("pay-1", bob[1])
        assert new_id[2] == replays[1]
        assert to_queue == ("duplicate", bob[1], replays[2])

        balances = run_sql(app_database, "SELECT account, balance_cents FROM balances ORDER BY 1")
        assert [tuple(row) for row in balances] == [("alice", 2000), ("bob", 250)]
        ledger = run_sql(app_database, "SELECT message_key, replay_id FROM ledger_entries ORDER BY id")
        assert [tuple(row) for row in ledger] == [("pay-1", None), (bob[1], None), (new_id[1], replays[1])]
        inbox = run_sql(app_database, "SELECT key, replay_id FROM rabbit_archive_inbox ORDER BY processed_at")
        assert [tuple(row) for row in inbox] == [("pay-1", None), (bob[1], None), (new_id[1], replays[1])]


def started(entry: dict[str, Any]) -> str:
    return str(entry["started_at"])


def readme_program() -> str:
    """The Python consumer of README's "Handling replays in your consumers", as printed there."""
    section = README.read_text().split("## Handling replays in your consumers", 1)[1].split("\n## ", 1)[0]
    [program] = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    return str(program)


@pytest.mark.timeout(60)
def test_the_readme_consumer_runs_as_written_and_ships_an_order_and_its_replay_once(
    services: Services, amqp_url: str, pika_channel: Any, tmp_path: Path
) -> None:
    program = tmp_path / "shipping.py"
    program.write_text(readme_program())
    log = tmp_path / "shipping.log"
    with fresh_database(services) as app_database, log.open("wb") as output:
        env = {**os.environ, "AMQP_URL": amqp_url, "DATABASE_URL": app_database}
        process = subprocess.Popen([sys.executable, str(program)], env=env, stdout=output, stderr=output)
        try:

            def consuming() -> bool:
                assert process.poll() is None, log.read_text()
                probe = pika_channel.connection.channel()  # a passive declare of no queue closes it
                try:
                    return bool(probe.queue_declare("shipping", passive=True).method.consumer_count)
                except pika.exceptions.ChannelClosedByBroker:
                    return False
                finally:
                    if probe.is_open:
                        probe.close()

            wait_for(consuming, 20, what="the README consumer")
            pika_channel.exchange_declare("orders", "fanout", durable=True)
            pika_channel.queue_bind("shipping", "orders")
            raw = encode_properties(Properties(content_type=b"application/json"))  # no message_id
            body = json.dumps({"id": "o-17", "address": "1 Quay Street"}).encode()
            copy = replay_copy(raw, "", "2b7e4f0e-8f7c-4d43-9a55-7d8c3b1f6a21", 1, exchange="orders")
            asyncio.run(publish(amqp_url, [("orders", "", raw, body), ("", "shipping", copy, body)]))

            def shipped() -> int:
                return int(run_sql(app_database, "SELECT count(*) FROM shipments")[0][0])

            wait_for(lambda: shipped() >= 1, 20, what="the shipment")
            time.sleep(1)  # the replay arrives right after the original
        finally:
            process.terminate()
            process.wait(10)
        # Both were acknowledged: nothing went back to the queue when the consumer stopped.
        assert pika_channel.queue_declare("shipping", passive=True).method.message_count == 0
        assert shipped() == 1
        keys = run_sql(app_database, "SELECT consumer, key FROM rabbit_archive_inbox")
        assert [row["consumer"] for row in keys] == ["shipping"]
        assert keys[0]["key"].startswith("sha256:")
