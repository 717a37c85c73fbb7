"""What /healthz and /readyz report, shared between the event loop and the HTTP thread."""

import threading
import time
from dataclasses import dataclass, field

# The event loop beats every second; a loop stuck for this long is reported unhealthy.
STALL_SECONDS = 30.0


@dataclass
class Health:
    """Liveness and readiness facts, written by the capture loop and read by the HTTP thread."""

    vhosts: tuple[str, ...] = ()
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _consuming: set[str] = field(default_factory=set)
    # Vhosts whose bindings have been reconciled once: before that, a message published to an
    # exchange (or, with SOURCE=bindings+default, straight into a queue) may reach no binding.
    _bound: set[str] = field(default_factory=set)
    _database_ok: bool = False
    _beat: float = field(default_factory=time.monotonic)

    def beat(self) -> None:
        """Record that the event loop is running."""
        self._beat = time.monotonic()

    def set_consuming(self, vhost: str, consuming: bool) -> None:
        """Record whether the archive queue of a vhost is being consumed."""
        with self._lock:
            if consuming:
                self._consuming.add(vhost)
            else:
                self._consuming.discard(vhost)

    def set_bound(self, vhost: str, bound: bool) -> None:
        """Record whether the archive queue of a vhost has been bound as planned.

        Bindings outlive a lost connection; not a deleted archive queue, which the broker
        reports by cancelling the consumer.
        """
        with self._lock:
            if bound:
                self._bound.add(vhost)
            else:
                self._bound.discard(vhost)

    def set_database_ok(self, ok: bool) -> None:
        """Record whether the last database operation succeeded."""
        self._database_ok = ok

    def live(self) -> tuple[bool, str]:
        """Liveness: the event loop is not stuck."""
        stalled = time.monotonic() - self._beat
        if stalled > STALL_SECONDS:
            return False, f"event loop stalled for {stalled:.0f}s"
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        """Readiness: every vhost consumed and bound, and the database writable."""
        live, reason = self.live()
        if not live:
            return False, reason
        with self._lock:
            missing = [vhost for vhost in self.vhosts if vhost not in self._consuming]
            unbound = [vhost for vhost in self.vhosts if vhost not in self._bound]
        problems = []
        if not self.vhosts:
            problems.append("starting")
        if missing:
            problems.append("not consuming vhost " + ", ".join(repr(v) for v in missing))
        if unbound:
            problems.append("bindings not made yet in vhost " + ", ".join(repr(v) for v in unbound))
        if not self._database_ok:
            problems.append("database unavailable")
        if problems:
            return False, "; ".join(problems)
        return True, "ok"
