"""The daemon's Prometheus metrics, on a registry of its own so that tests can run several daemons."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class CaptureMetrics:
    """Every metric the capture daemon exports on /metrics (README.md explains each)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.messages_stored = Counter(
            "rabbit_archive_messages_stored",
            "Messages committed to the archive.",
            ["vhost", "exchange"],
            registry=self.registry,
        )
        self.bytes_stored = Counter(
            "rabbit_archive_bytes_stored",
            "Body bytes committed to the archive.",
            ["vhost", "exchange"],
            registry=self.registry,
        )
        self.duplicates_skipped = Counter(
            "rabbit_archive_duplicates_skipped",
            "Redelivered messages recognised as already stored and not stored again.",
            ["vhost"],
            registry=self.registry,
        )
        self.dropped_messages = Counter(
            "rabbit_archive_dropped_messages",
            "Messages the archive queue dropped (oldest first) because QUEUE_MAX_BYTES was reached.",
            ["vhost", "exchange"],
            registry=self.registry,
        )
        self.unstorable_messages = Counter(
            "rabbit_archive_unstorable_messages",
            "Messages stored with raw bytes only because their views could not be stored.",
            ["vhost"],
            registry=self.registry,
        )
        self.batch_seconds = Histogram(
            "rabbit_archive_batch_write_seconds",
            "Time to write and commit one batch.",
            ["vhost"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "rabbit_archive_batch_messages",
            "Messages per committed batch.",
            ["vhost"],
            buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000),
            registry=self.registry,
        )
        self.batches_beside = Counter(
            "rabbit_archive_batches_beside",
            "Batches written beside another on a second database connection (rows of large messages).",
            ["vhost"],
            registry=self.registry,
        )
        self.bound_exchanges = Gauge(
            "rabbit_archive_bound_exchanges",
            "Exchanges the archive queue is bound to.",
            ["vhost"],
            registry=self.registry,
        )
        self.skipped_exchanges = Gauge(
            "rabbit_archive_skipped_exchanges",
            "Exchanges left alone (default, internal, excluded, one-queue types).",
            ["vhost"],
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "rabbit_archive_queue_depth",
            "Messages waiting in the archive queue (capture lag), as of the last discovery.",
            ["vhost"],
            registry=self.registry,
        )
        self.unbound_exchanges = Gauge(
            "rabbit_archive_unbound_exchanges",
            "Exchanges the plan binds but the broker refused or that cannot be sent as listed.",
            ["vhost", "state"],
            registry=self.registry,
        )
        self.discovery_rounds = Counter(
            "rabbit_archive_discovery_rounds",
            "Rounds of reading exchanges and bindings (about four management API calls each).",
            ["vhost"],
            registry=self.registry,
        )
        self.management_requests = Counter(
            "rabbit_archive_management_requests",
            "Requests made to the management API.",
            registry=self.registry,
        )
        self.vhost_unavailable = Gauge(
            "rabbit_archive_vhost_unavailable",
            "1 while a vhost cannot be captured (missing, no permissions, refused); retried.",
            ["vhost"],
            registry=self.registry,
        )
        self.trace_properties_lost = Counter(
            "rabbit_archive_trace_properties_lost",
            "SOURCE=firehose: trace copies stored as they came, flagged with x-rabbit-archive-trace-lost, "
            "because the broker's copy does not hold a property exactly (a timestamp, as 32 bits).",
            ["vhost"],
            registry=self.registry,
        )
        self.uncaptured_rate = Gauge(
            "rabbit_archive_uncaptured_messages_per_second",
            "Messages per second published to exchanges the archive does not capture (broker's rate).",
            ["vhost", "exchange", "reason"],
            registry=self.registry,
        )
        self.errors = Counter(
            "rabbit_archive_errors",
            "Failures by kind (broker, database, discovery); each is retried.",
            ["kind"],
            registry=self.registry,
        )
        self.connected = Gauge(
            "rabbit_archive_consuming",
            "1 while the archive queue of the vhost is being consumed.",
            ["vhost"],
            registry=self.registry,
        )
