"""The inbox table: its name checked and quoted, and every statement on it, built once per table.

The table name is the only identifier that comes from the caller. It is checked against a
narrow pattern and then quoted; values are always parameters.
"""

import re
from dataclasses import dataclass

__all__ = ["DEFAULT_TABLE", "MAX_IDENTIFIER", "SETUP_LOCK", "Statements", "TableName", "table_name"]

DEFAULT_TABLE = "rabbit_archive_inbox"
# PostgreSQL cuts a longer identifier to 63 bytes (with only a notice): refused instead.
MAX_IDENTIFIER = 63
# Lowercase only: such a name means the same table quoted or not, so hand-written SQL finds it.
_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]*")


@dataclass(frozen=True, slots=True)
class TableName:
    """A checked table name, optionally in a schema."""

    schema: str | None
    name: str

    @property
    def quoted(self) -> str:
        """The name as SQL, each part double-quoted."""
        table = f'"{self.name}"'
        return f'"{self.schema}".{table}' if self.schema else table

    def __str__(self) -> str:
        return f"{self.schema}.{self.name}" if self.schema else self.name


def table_name(value: str) -> TableName:
    """Check a table name (`name` or `schema.name`); ValueError saying what is allowed otherwise."""
    if not isinstance(value, str):
        raise ValueError(f"the inbox table name must be a string, not {type(value).__name__}")
    parts = value.split(".")
    if len(parts) > 2:
        raise ValueError(f"inbox table name {value!r}: give `name` or `schema.name`, nothing more")
    *schema, name = parts
    for part in (*schema, name):
        if not _IDENTIFIER.fullmatch(part):
            raise ValueError(
                f"inbox table name {value!r}: {part!r} is not an identifier of lowercase letters a-z, "
                "digits and underscores that starts with a letter or underscore"
            )
        if len(part) > MAX_IDENTIFIER:
            raise ValueError(f"inbox table name {value!r}: {part!r} is longer than {MAX_IDENTIFIER} bytes")
    return TableName(schema[0] if schema else None, name)


# The statements, with {table} for the checked, quoted name: a TableName is the only thing ever
# put in its place.
CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS {table} (
    consumer text NOT NULL,
    key text NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    replay_id text,
    PRIMARY KEY (consumer, key)
)"""
# The unique key decides between two consumers that hold copies of one message: the second
# INSERT waits for the first transaction and inserts nothing if that one committed.
RECORD = """
INSERT INTO {table} (consumer, key, replay_id) VALUES ($1, $2, $3)
ON CONFLICT (consumer, key) DO NOTHING RETURNING true"""
# One pass over the table. No index on processed_at is kept for it: recording a key then costs
# one index entry, not two (a second index took about a tenth off the rate of key inserts here).
# It locks only the rows it deletes, which no consumer inserts again.
DELETE_OLDER = "DELETE FROM {table} WHERE consumer = $1 AND processed_at < now() - $2::interval"


class Statements:
    """The SQL of one inbox table."""

    def __init__(self, table: TableName) -> None:
        def bind(template: str) -> str:
            return template.format(table=table.quoted)

        self.create_table = bind(CREATE_TABLE)
        self.record = bind(RECORD)
        self.delete_older = bind(DELETE_OLDER)


# Taken around setup, so that replicas starting at once do not race on CREATE TABLE.
SETUP_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))"
