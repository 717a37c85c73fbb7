"""Replays made by the installed `rabbit-replay` reach the inbox example consumer as the contract says.

The capture daemon archives what a producer publishes; the example consumer (examples/inbox_consumer.py)
applies payments through rabbit_archive.inbox; replays to the original exchange, with
`--new-message-id` and `--to-queue` then arrive at the same consumer.
"""

import json
import time
from collections.abc import Callable
from typing import Any

import pika
import pytest

from tests.acceptance.test_replay import json_lines, ok, replay_command
from tests.conftest import run_sql
from tests.support.daemon import CaptureProcess, wait_for
from tests.support.inbox import EXCHANGE, QUEUE, Consumer, fresh_database
from tests.support.services import Services

pytestmark = pytest.mark.acceptance


def publish(channel: Any, body: dict[str, Any], **properties: Any) -> None:
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
            publish(pika_channel, {"account": "alice", "amount_cents": 1000}, message_id="pay-1")
            # pika sets no message_id unless told to: this one is keyed by its digest.
            publish(
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
