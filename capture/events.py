"""Instant discovery: the broker's event exchange says when exchanges and bindings change.

With the rabbitmq_event_exchange plugin on, RabbitMQ publishes `exchange.created`,
`binding.created` and friends to `amq.rabbitmq.event` in one vhost ("/" unless configured
otherwise), each with a `vhost` header. The daemon listens there and wakes the binding
keeper of that vhost at once; the periodic re-read stays as the safety net, and without the
plugin (or the right to read the event exchange) discovery is periodic only.
"""

import asyncio
import contextlib
import logging
from collections.abc import Callable

import aiormq
import aiormq.abc

from rabbit_archive.archive import content_header, frames
from rabbit_archive.archive.amqp_codec import CodecError, decode_properties
from rabbit_archive.archive.stopping import sleep_unless
from rabbit_archive.config.settings import Settings, mask_url

log = logging.getLogger(__name__)

EVENT_EXCHANGE = "amq.rabbitmq.event"
# Events that can change what the archive queue should be bound to.
TOPOLOGY_EVENTS = (
    "exchange.created",
    "exchange.deleted",
    "binding.created",
    "binding.deleted",
    "policy.set",
    "policy.cleared",
)
RETRY_SECONDS = 30.0


def event_vhost(properties_raw: bytes) -> str | None:
    """The `vhost` header of an event message."""
    try:
        headers = decode_properties(properties_raw).headers or []
    except CodecError:
        return None
    for key, (letter, value) in headers:
        if key == b"vhost" and letter == "S" and isinstance(value, bytes):
            return value.decode("utf-8", "replace")
    return None


async def watch_topology_events(
    settings: Settings, vhost: str, nudge: Callable[[str], None], stop: asyncio.Event
) -> None:
    """Call nudge(vhost) for every topology event until stop; reconnects, never fails the daemon."""
    url = settings.amqp_url_for(vhost)
    reported = False
    while not stop.is_set():
        connection: aiormq.abc.AbstractConnection | None = None
        try:
            connection = await asyncio.wait_for(
                frames.connect(url, vhost, client_properties={"connection_name": "rabbit-capture events"}), 15
            )
            channel = await connection.channel()
            declared = await channel.queue_declare("", exclusive=True, auto_delete=True)
            queue = declared.queue or ""
            for key in TOPOLOGY_EVENTS:
                await channel.queue_bind(queue, EVENT_EXCHANGE, key)

            async def on_event(message: aiormq.abc.DeliveredMessage) -> None:
                changed = event_vhost(content_header.raw_properties(message.header))
                if changed is not None:
                    nudge(changed)

            await channel.basic_consume(queue, on_event, no_ack=True)
            log.info("watching_topology_events", extra={"url": mask_url(url)})
            reported = False
            closing = asyncio.ensure_future(connection.closing)
            stopping = asyncio.ensure_future(stop.wait())
            try:
                await asyncio.wait([closing, stopping], return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in (closing, stopping):
                    waiter.cancel()
        except (aiormq.exceptions.AMQPError, OSError, TimeoutError, ConnectionError) as error:
            if not reported:
                # Plugin off, no permission, or the broker away: periodic discovery carries on.
                log.info(
                    "topology_events_unavailable",
                    extra={"url": mask_url(url), "error": str(error).splitlines()[0] if str(error) else ""},
                )
                reported = True
        finally:
            if connection is not None and not connection.is_closed:
                with contextlib.suppress(aiormq.exceptions.AMQPError, OSError, TimeoutError):
                    await asyncio.wait_for(connection.close(), 5)
        if not stop.is_set():
            await sleep_unless(stop, RETRY_SECONDS)
