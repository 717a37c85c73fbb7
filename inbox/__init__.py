"""Idempotent consumers: process each RabbitMQ message once, whether it is an original or a replay.

For consumers built on aio-pika and asyncpg (README "Handling replays in your consumers", which
also gives the same pattern as plain SQL for other languages)::

    inbox = Inbox(pool, consumer="billing")
    await inbox.setup()
    await queue.consume(inbox.handler(handle))  # handle(message, connection), once per key
"""

from rabbit_archive.inbox.inbox import (
    Connection,
    Handler,
    Inbox,
    InboxError,
    InboxStats,
    InboxTransaction,
    Observer,
    Outcome,
)
from rabbit_archive.inbox.key import canonical_form, message_key
from rabbit_archive.inbox.sql import DEFAULT_TABLE, table_name

__all__ = [
    "DEFAULT_TABLE",
    "Connection",
    "Handler",
    "Inbox",
    "InboxError",
    "InboxStats",
    "InboxTransaction",
    "Observer",
    "Outcome",
    "canonical_form",
    "message_key",
    "table_name",
]
