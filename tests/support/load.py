"""A publisher that runs in a background thread during outage tests, with publisher confirms."""

import asyncio
import threading
from collections.abc import Callable

import aio_pika
import pika


class BackgroundPublisher:
    """Publishes m-first..m-(count-1) to an exchange from its own thread, each confirmed by the broker."""

    def __init__(
        self,
        amqp_url: str,
        exchange: str,
        count: int,
        *,
        rate: float | None = None,
        routing_key: Callable[[int], str] = lambda index: f"load.{index % 10}",
        body_size: int = 256,
        first: int = 0,
    ) -> None:
        self.amqp_url = amqp_url
        self.exchange = exchange
        self.count = count
        self.rate = rate
        self.routing_key = routing_key
        self.body_size = body_size
        self.first = first
        self.confirmed = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="test-publisher", daemon=True)

    def start(self) -> "BackgroundPublisher":
        """Start publishing in the background."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop early (the messages confirmed so far stay published)."""
        self._stop.set()

    def join(self, timeout: float = 120) -> int:
        """Wait until done; returns how many were confirmed; re-raises a publishing error."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError(f"publisher still running after {timeout}s ({self.confirmed} confirmed)")
        if self.error is not None:
            raise self.error
        return self.confirmed

    def _run(self) -> None:
        try:
            asyncio.run(self._publish())
        except BaseException as error:  # reported by join()
            self.error = error

    async def _publish(self) -> None:
        connection = await aio_pika.connect(self.amqp_url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.get_exchange(self.exchange, ensure=False)
            padding = b"x" * self.body_size
            window = 200 if self.rate is None else max(1, int(self.rate / 20))
            loop = asyncio.get_running_loop()
            started = loop.time()
            index = self.first
            while index < self.count and not self._stop.is_set():
                batch = range(index, min(self.count, index + window))
                await asyncio.gather(
                    *(
                        exchange.publish(
                            aio_pika.Message(
                                padding,
                                message_id=f"m-{i}",
                                headers={"seq": i},
                                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                            ),
                            routing_key=self.routing_key(i),
                        )
                        for i in batch
                    )
                )
                index = batch.stop
                self.confirmed = index
                if self.rate is not None:
                    ahead = started + (index - self.first) / self.rate - loop.time()
                    if ahead > 0:
                        await asyncio.sleep(ahead)


def queue_depth(host: str, port: int, vhost: str, queue: str) -> int:
    """Messages ready in a queue right now (passive declare, exact unlike the management stats)."""
    parameters = pika.ConnectionParameters(
        host=host, port=port, virtual_host=vhost, credentials=pika.PlainCredentials("guest", "guest")
    )
    connection = pika.BlockingConnection(parameters)
    try:
        result = connection.channel().queue_declare(queue, passive=True)
        return int(result.method.message_count)
    finally:
        connection.close()
