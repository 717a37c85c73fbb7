"""Groups deliveries into batches for one writer (group commit); pure: no clock, no I/O.

A batch is due as soon as the writer is idle and something is buffered: a delivery that arrives
while the writer is idle is written at once, and one that arrives during a write goes with the
next batch, which starts when that write ends. So under a light load a delivery waits for at
most one write besides its own, and under a heavy one batches grow by themselves to what arrives
during a write, up to max_count deliveries and max_bytes. The writer is never idle while
something is buffered. No timer decides when a batch goes: the writer's own pace does.

One more write may run beside the one in progress, when the consumer allows it and a batch
full by bytes is waiting: with large rows PostgreSQL's single COPY backend is the bound, and a
second connection uses the other core (see capture/consumer.py).
"""

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Delivery:
    """One message as the broker delivered it to the archive queue, not yet stored."""

    delivery_tag: int
    redelivered: bool
    exchange: str
    routing_key: str
    properties_raw: bytes
    body: bytes
    # What the store worked out ahead for this delivery (ArchiveStore.prepare), if anything.
    prepared: Any = None

    @property
    def size(self) -> int:
        """Bytes this delivery holds in memory, roughly."""
        return len(self.body) + len(self.properties_raw) + 64


@dataclass(slots=True)
class Batcher:
    """Collects deliveries while a batch is written; the next batch is due when the write ends."""

    max_count: int
    max_bytes: int
    _items: list[Delivery] = field(default_factory=list)
    # Each buffered delivery's size, worked out once as it was added.
    _sizes: list[int] = field(default_factory=list)
    _bytes: int = 0
    # Writes in progress: taken and not yet written(); at most two.
    _writing: int = 0

    def add(self, delivery: Delivery) -> int:
        """Append a delivery; returns the bytes now buffered (as `bytes`), saving the caller a call."""
        size = delivery.size
        self._items.append(delivery)
        self._sizes.append(size)
        self._bytes += size
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    @property
    def bytes(self) -> int:
        """Bytes of the buffered deliveries, roughly."""
        return self._bytes

    @property
    def full(self) -> bool:
        """True when the buffered deliveries fill a batch (by count or bytes)."""
        return len(self._items) >= self.max_count or self._bytes >= self.max_bytes

    @property
    def writing(self) -> bool:
        """True between take() and written(): a batch is being written."""
        return self._writing > 0

    def due(self, *, beside: bool = False) -> bool:
        """True when a batch should be taken now: something is buffered and the writer is idle.

        With `beside`, also when one write is in progress and a batch full by bytes waits: it
        may be written beside that one (take(beside=True)).
        """
        if not self._items:
            return False
        if not self._writing:
            return True
        return beside and self._writing == 1 and self._bytes >= self.max_bytes

    def take(self, *, beside: bool = False) -> list[Delivery]:
        """Start a write: remove and return up to max_count items (max_bytes unless one is larger).

        Until written() the writer is busy and nothing is due (but a second, full batch when the
        caller allows one beside); what arrives meanwhile forms the next batch.
        """
        if self._writing and not (beside and self._writing == 1):
            raise RuntimeError("a batch is already being written")
        items, sizes = self._items, self._sizes
        if len(items) <= self.max_count and self._bytes <= self.max_bytes:
            count, size = len(items), self._bytes  # all of it fits: no need to look at each
        else:
            count, size = 0, 0
            for item_size in sizes:
                if count and (count >= self.max_count or size + item_size > self.max_bytes):
                    break
                count += 1
                size += item_size
        batch, self._items = items[:count], items[count:]
        self._sizes = sizes[count:]
        self._bytes -= size
        # Taking from an empty buffer starts no write.
        self._writing += bool(batch)
        return batch

    def written(self) -> None:
        """A write started by take() ended (committed or abandoned): the next batch may start."""
        self._writing = max(self._writing - 1, 0)

    def clear(self) -> int:
        """Forget every buffered delivery (their channel is gone); returns how many."""
        dropped = len(self._items)
        self._items = []
        self._sizes = []
        self._bytes = 0
        return dropped
