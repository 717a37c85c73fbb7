"""What the daemon did with each exchange in its last discovery round, recorded for `status`.

`rabbit-capture status` runs in another process (often on another host), so the daemon writes
its per-exchange states (bound, skipped, refused, failed, unrepresentable) to PostgreSQL.
"""

import asyncpg

from rabbit_archive.archive import queries
from rabbit_archive.archive.db import CONNECTION_ERRORS, Connection
from rabbit_archive.archive.errors import DatabaseUnavailable, describe

# What the daemon can have done with an exchange (rabbit_archive.binding_state.state).
STATES = ("bound", "skipped", "refused", "unrepresentable", "failed")
_SAVE_ERRORS: tuple[type[BaseException], ...] = (*CONNECTION_ERRORS, asyncpg.PostgresError)


async def save_binding_states(
    connection_or_pool: "Connection | asyncpg.Pool[asyncpg.Record]",
    vhost: str,
    states: list[tuple[str, str, str, str]],
) -> None:
    """Replace the vhost's recorded (exchange, type, state, reason) rows, in one statement."""
    for _, _, state, _ in states:
        if state not in STATES:
            raise ValueError(f"binding state must be one of {', '.join(STATES)}, not {state!r}")
    columns = [[storable_text(row[index]) for row in states] for index in range(4)]
    try:
        await connection_or_pool.execute(queries.SAVE_BINDING_STATE, storable_text(vhost), *columns)
    except _SAVE_ERRORS as error:
        raise DatabaseUnavailable(f"recording binding states of vhost {vhost!r}: {describe(error)}") from None


def storable_text(text: str) -> str:
    """Text PostgreSQL accepts: NUL and unpaired surrogates (non-UTF-8 bytes) escaped."""
    if "\x00" not in text:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            pass
        else:
            return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")
