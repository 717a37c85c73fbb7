"""The inbox's table name is checked before it reaches SQL; consumer names and keys are checked too."""

import datetime
import re
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from rabbit_archive.inbox import Inbox, table_name
from rabbit_archive.inbox.sql import (
    CREATE_TABLE,
    DELETE_OLDER,
    MAX_IDENTIFIER,
    RECORD,
    Statements,
)

ACCEPTED = re.compile(r"([a-z_][a-z0-9_]{0,62}\.)?[a-z_][a-z0-9_]*")


class NoPool:
    """A pool that must never be touched: bad arguments fail before any database call."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the pool was used ({name}) before the arguments were checked")


@pytest.mark.parametrize(
    ("value", "quoted"),
    [
        ("rabbit_archive_inbox", '"rabbit_archive_inbox"'),
        ("billing.inbox", '"billing"."inbox"'),
        ("_x1", '"_x1"'),
        ("user", '"user"'),  # a reserved word is fine once quoted
        ("a" * MAX_IDENTIFIER, '"' + "a" * MAX_IDENTIFIER + '"'),
    ],
)
def test_good_names_are_quoted(value: str, quoted: str) -> None:
    assert table_name(value).quoted == quoted


@pytest.mark.parametrize(
    "value",
    [
        "",
        "Inbox",  # quoted it would be another table than the one hand-written SQL names
        "1inbox",
        "in box",
        'in"box',
        "inbox;drop table users",
        "inbox--",
        "a.b.c",
        ".inbox",
        "inbox.",
        "schéma.inbox",
        "in\x00box",
        "a" * (MAX_IDENTIFIER + 1),
        "s" * 64 + ".inbox",
        "inbox." + "t" * 64,
    ],
)
def test_bad_names_are_refused_with_what_is_allowed(value: str) -> None:
    with pytest.raises(ValueError, match=r"inbox table name"):
        table_name(value)
    with pytest.raises(ValueError, match=r"inbox table name"):
        Inbox(NoPool(), "billing", table=value)  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80) | st.from_regex(ACCEPTED, fullmatch=True))
@example('x"; DROP TABLE users; --')
def test_a_name_is_accepted_only_when_it_can_never_break_out_of_its_quotes(value: str) -> None:
    try:
        name = table_name(value)
    except ValueError:
        assert not ACCEPTED.fullmatch(value) or len(value.rsplit(".", 1)[-1]) > MAX_IDENTIFIER
        return
    assert ACCEPTED.fullmatch(value)
    statements = Statements(name)
    for sql in (statements.create_table, statements.record, statements.delete_older):
        # The name appears only between double quotes and holds none.
        assert '"' + name.name + '"' in sql
        assert sql.count('"') % 2 == 0
    assert len(name.name) <= 63  # PostgreSQL would silently cut a longer one


def test_templates_hold_only_the_table_placeholders() -> None:
    for template in (CREATE_TABLE, RECORD, DELETE_OLDER):
        assert set(re.findall(r"{(\w*)}", template)) == {"table"}
        assert "$" not in template.replace("$1", "").replace("$2", "").replace("$3", "")


@pytest.mark.parametrize("consumer", ["", "a\x00b", None, 7])
def test_a_consumer_name_is_a_non_empty_string_without_nul(consumer: Any) -> None:
    with pytest.raises(ValueError, match="consumer name"):
        Inbox(NoPool(), consumer)  # type: ignore[arg-type]


@pytest.mark.parametrize("age", [datetime.timedelta(0), datetime.timedelta(seconds=-1), 3600, None])
async def test_retention_needs_a_positive_age(age: Any) -> None:
    inbox = Inbox(NoPool(), "billing")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positive"):
        await inbox.delete_older_than(age)
