"""Groups deliveries into batches closed by count, bytes or age; pure, time comes in as an argument."""

from dataclasses import dataclass, field


@dataclass(slots=True)
class Delivery:
    """One message as the broker delivered it to the archive queue, not yet stored."""

    delivery_tag: int
    redelivered: bool
    exchange: str
    routing_key: str
    properties_raw: bytes
    body: bytes

    @property
    def size(self) -> int:
        """Bytes this delivery holds in memory, roughly."""
        return len(self.body) + len(self.properties_raw) + 64


@dataclass(slots=True)
class Batcher:
    """Collects deliveries until a batch is full (count or bytes) or its oldest item is too old."""

    max_count: int
    max_bytes: int
    max_age: float
    _items: list[Delivery] = field(default_factory=list)
    _bytes: int = 0
    _first_at: float = 0.0

    def add(self, delivery: Delivery, now: float) -> None:
        """Append a delivery received at time `now`."""
        if not self._items:
            self._first_at = now
        self._items.append(delivery)
        self._bytes += delivery.size

    def __len__(self) -> int:
        return len(self._items)

    @property
    def bytes(self) -> int:
        """Bytes of the buffered deliveries, roughly."""
        return self._bytes

    @property
    def full(self) -> bool:
        """True when the batch should be written without waiting any longer."""
        return len(self._items) >= self.max_count or self._bytes >= self.max_bytes

    def due(self, now: float) -> bool:
        """True when there is something to write and it is full or old enough."""
        return bool(self._items) and (self.full or now - self._first_at >= self.max_age)

    def wait_time(self, now: float) -> float | None:
        """Seconds until the current batch is due; None when empty (wait for a delivery)."""
        if not self._items:
            return None
        if self.full:
            return 0.0
        return max(0.0, self._first_at + self.max_age - now)

    def take(self) -> list[Delivery]:
        """Remove and return up to max_count items (and at most max_bytes unless one is larger)."""
        items = self._items
        count, size = 0, 0
        for item in items:
            if count and (count >= self.max_count or size + item.size > self.max_bytes):
                break
            count += 1
            size += item.size
        batch, rest = items[:count], items[count:]
        self._items = rest
        self._bytes -= size
        # A remainder keeps the old start time: it is at least that old in the worst case,
        # so it is written no later than max_age after its first delivery.
        return batch

    def clear(self) -> int:
        """Forget every buffered delivery (their channel is gone); returns how many."""
        dropped = len(self._items)
        self._items = []
        self._bytes = 0
        return dropped
