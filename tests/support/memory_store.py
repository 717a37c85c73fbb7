"""An in-memory ArchiveStore with the same transaction semantics as capture.store.PostgresStore.

Each call is one transaction: it either applies all its changes or none. A fault can be
injected into the next call: `"refuse"` (nothing applied, DatabaseUnavailable raised) or
`"lost_reply"` (everything applied, then DatabaseUnavailable raised, as when the COMMIT
reply is lost).
"""

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from rabbit_archive.archive.errors import DatabaseUnavailable
from rabbit_archive.capture.batching import Delivery
from rabbit_archive.capture.store import WriteResult, identify


@dataclass
class PendingRow:
    fingerprint: bytes
    batch_id: int
    session_id: int
    vhost: str


@dataclass
class MemoryStore:
    """Rows (vhost, exchange, routing key, property bytes, body) and pending fingerprints."""

    strip_delivery_count: bool = True
    rows: list[tuple[str, str, str, bytes, bytes]] = field(default_factory=list)
    pending: list[PendingRow] = field(default_factory=list)
    fault: str | None = None

    def _take_fault(self) -> str | None:
        fault, self.fault = self.fault, None
        return fault

    def prepare(self, vhost: str, delivery: Delivery) -> None:
        """Nothing to do ahead: rows are made in write_batch."""

    async def write_batch(
        self,
        vhost: str,
        deliveries: Sequence[Delivery],
        batch_id: int,
        forget: Sequence[int],
        *,
        retry: bool = False,
        session_id: int = 0,
        forget_other_sessions: bool = False,
        ids_taken: asyncio.Event | None = None,
        before_commit: Callable[[], Awaitable[None]] | None = None,
    ) -> WriteResult:
        fault = self._take_fault()
        if fault == "refuse":
            raise DatabaseUnavailable("injected: database refused the batch")
        pending = [row for row in self.pending if row.batch_id not in set(forget)]
        rows = list(self.rows)
        result = WriteResult()
        if retry and any(row.batch_id == batch_id for row in pending):
            result.already_committed = True
        else:
            if ids_taken is not None:
                ids_taken.set()
            prepared = [
                (delivery, *identify(vhost, delivery, strip_delivery_count=self.strip_delivery_count))
                for delivery in deliveries
            ]
            wanted = Counter(digest for delivery, _, digest in prepared if delivery.redelivered)
            claimed: Counter[bytes] = Counter()
            moved = []
            for row in pending:  # oldest first, one row of an earlier session per redelivered copy
                if row.session_id != session_id and wanted[row.fingerprint] > claimed[row.fingerprint]:
                    claimed[row.fingerprint] += 1
                    # Moves to this batch: a lost ack of it leaves the row for the next redelivery.
                    moved.append(PendingRow(row.fingerprint, batch_id, session_id, vhost))
                else:
                    moved.append(row)
            pending = moved
            for delivery, properties_raw, digest in prepared:
                if delivery.redelivered and claimed[digest]:
                    claimed[digest] -= 1
                    result.duplicates += 1
                    continue
                rows.append((vhost, delivery.exchange, delivery.routing_key, properties_raw, delivery.body))
                pending.append(PendingRow(digest, batch_id, session_id, vhost))
                result.stored += 1
            if forget_other_sessions:
                pending = [row for row in pending if row.vhost != vhost or row.session_id == session_id]
            if before_commit is not None:
                await before_commit()  # what it raises applies nothing
        self.rows, self.pending = rows, pending
        if fault == "lost_reply":
            raise DatabaseUnavailable("injected: COMMIT reply lost")
        return result

    async def forget_pending(self, batch_ids: Sequence[int]) -> None:
        fault = self._take_fault()
        if fault == "refuse":
            raise DatabaseUnavailable("injected: database refused the delete")
        self.pending = [row for row in self.pending if row.batch_id not in set(batch_ids)]
        if fault == "lost_reply":
            raise DatabaseUnavailable("injected: reply lost")
