"""The capture pool's timestamptz codec converts every value exactly as asyncpg's own codec does."""

import asyncio
import os
import time
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rabbit_archive.archive.db import remember_timestamps
from tests.support.services import Services

pytestmark = pytest.mark.integration

offsets = st.integers(-23 * 60, 23 * 60).map(lambda minutes: timezone(timedelta(minutes=minutes)))
values = st.one_of(
    st.datetimes(timezones=st.just(UTC)),
    st.datetimes(timezones=offsets),
    st.datetimes(),  # naive: local time, as asyncpg takes it
    st.dates(),
)
# Compared in every example: asyncpg's stand-ins for the infinities, and what lands on them.
EDGES = [
    datetime.max,
    datetime.min,
    datetime.max.replace(tzinfo=UTC),
    datetime.min.replace(tzinfo=UTC),
    datetime(2000, 1, 1, tzinfo=UTC),
    date.max,
    date.min,
    "not a date",
]
# Texts PostgreSQL accepts as timestamptz, decoded by each codec (infinities, out of Python's range).
TEXTS = [
    "infinity",
    "-infinity",
    "2000-01-01 00:00:00+00",
    "1999-12-31 23:59:59.999999+00",
    "9999-12-31 23:59:59.999999+00",
    "0001-01-01 00:00:00+00",
    "10000-01-01 00:00:00+00",
    "4713-01-01 00:00:00+00 BC",
    "294276-12-31 23:59:59.999999+00",
]


async def outcome(connection: Any, query: str, argument: object) -> tuple[str, object]:
    """What a query gave, or the kind of error it raised."""
    try:
        return "value", await connection.fetchval(query, argument)
    except Exception as error:
        return "error", type(error).__name__


async def compare(url: str, arguments: list[object]) -> None:
    plain = await asyncpg.connect(url)
    remembering = await asyncpg.connect(url)
    try:
        await remember_timestamps(remembering)
        for argument in arguments:
            # Encoded (as the server then renders it) and decoded back, twice: the second time from
            # what the codec remembered.
            for query in ("SELECT $1::timestamptz::text", "SELECT $1::timestamptz", "SELECT $1::timestamptz"):
                assert await outcome(remembering, query, argument) == await outcome(plain, query, argument)
        for text in TEXTS:
            query = "SELECT $1::text::timestamptz"
            assert await outcome(remembering, query, text) == await outcome(plain, query, text)
    finally:
        await plain.close()
        await remembering.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(values, min_size=1, max_size=12), st.sampled_from(["UTC", "Asia/Kathmandu", "America/St_Johns"])
)
def test_timestamps_convert_as_asyncpg_converts_them(
    services: Services, arguments: list[object], zone: str
) -> None:
    # Naive datetimes and dates are local time to both codecs: a zone off UTC by a fraction of an
    # hour tells a codec that got the local offset wrong.
    before = os.environ.get("TZ")
    os.environ["TZ"] = zone
    time.tzset()
    try:
        asyncio.run(compare(services.postgres_url, [*arguments, *EDGES]))
    finally:
        if before is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = before
        time.tzset()


def test_every_row_of_a_batch_gets_the_one_capture_time(services: Services) -> None:
    async def copy() -> list[datetime]:
        connection = await asyncpg.connect(services.postgres_url)
        try:
            await remember_timestamps(connection)
            await connection.execute("CREATE TEMPORARY TABLE stamped (n int, at timestamptz)")
            first = datetime.now(UTC)
            second = first + timedelta(microseconds=7)
            rows = [(n, first) for n in range(3)] + [(n, second) for n in range(3, 5)]
            await connection.copy_records_to_table("stamped", records=rows)
            return [row["at"] for row in await connection.fetch("SELECT at FROM stamped ORDER BY n")]
        finally:
            await connection.close()

    stamps = asyncio.run(copy())
    assert stamps[:3] == [stamps[0]] * 3
    assert stamps[3:] == [stamps[0] + timedelta(microseconds=7)] * 2
