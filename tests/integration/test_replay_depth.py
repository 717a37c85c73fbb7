"""--max-queue-depth counts what the target queue's consumers hold unacknowledged, not only what is
ready: read from the management API (its statistics are refreshed every few seconds)."""

import asyncio
from typing import Any

import pika
import pytest

from rabbit_archive.config.settings import Settings
from rabbit_archive.replay.operations import unacknowledged_reader
from tests.support.services import Services

pytestmark = pytest.mark.integration


async def test_messages_held_unacknowledged_by_a_consumer_are_counted(
    services: Services, pika_channel: Any, amqp_url: str, vhost: str
) -> None:
    pika_channel.queue_declare("target")
    for n in range(30):
        pika_channel.basic_publish("", "target", f"m{n}".encode(), pika.BasicProperties())
    # A consumer with an unlimited prefetch that never acknowledges: the queue reads empty.
    holder = pika_channel.connection.channel()
    holder.basic_consume("target", lambda *_: None, auto_ack=False)
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, amqp_url=amqp_url, management_url=services.management_url
    )
    read = unacknowledged_reader(settings, vhost)
    held = 0
    for _ in range(40):  # the management statistics lag by their collection interval
        pika_channel.connection.process_data_events(0)
        held = await read("target") or 0
        if held == 30:
            break
        await asyncio.sleep(0.5)
    assert held == 30
    assert pika_channel.queue_declare("target", passive=True).method.message_count == 0


async def test_an_unreachable_management_api_counts_nothing_more(amqp_url: str, vhost: str) -> None:
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, amqp_url=amqp_url, management_url="http://127.0.0.1:1"
    )
    assert await unacknowledged_reader(settings, vhost)("target") is None
