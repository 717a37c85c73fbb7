"""The few error types the archive's callers handle; driver exceptions are translated into these."""


class ArchiveError(Exception):
    """Base of the errors rabbit-archive reports in one line."""

    exit_code = 1


class DatabaseUnavailable(ArchiveError):
    """PostgreSQL cannot be reached or refused the connection."""


class DatabaseRefused(DatabaseUnavailable):
    """PostgreSQL is reachable but refuses the work for a reason of its own state.

    Read-only (a standby after a failover, default_transaction_read_only), disk full, a
    statement cancelled, a lock or serialization conflict: retried like an unreachable
    database, never the fault of one message.
    """


class BrokerUnavailable(ArchiveError):
    """RabbitMQ (AMQP or the management API) cannot be reached."""


class UsageError(ArchiveError):
    """The operator asked for something that cannot be done as asked."""

    exit_code = 2


class QueueMismatch(UsageError):
    """The archive queue exists with arguments other than the configured ones."""


class AccessRefused(UsageError):
    """RabbitMQ or PostgreSQL refused an operation: the configured user lacks a permission."""


def describe(error: BaseException) -> str:
    """A short, secret-free description of a driver or socket error: its first line."""
    text = str(error) or type(error).__name__
    return text.splitlines()[0]


def reply_text(error: BaseException) -> str:
    """The broker's reply text of a channel or connection close (the error's description otherwise)."""
    for argument in getattr(error, "args", ()):
        text = getattr(argument, "reply_text", None)
        if text:
            return str(text)
    return describe(error)
