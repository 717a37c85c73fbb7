"""PostgreSQL applies topic_regex to routing keys exactly as topic_matches and RabbitMQ's topic rules do."""

import itertools
from collections.abc import AsyncIterator, Iterable

import asyncpg
import pytest

from rabbit_archive.replay.filters import Filters, topic_matches, topic_regex, where_clause
from tests.support.services import Services
from tests.unit.test_filters import CORNER_CASES, reference

pytestmark = pytest.mark.integration

# The expression where_clause uses, applied to many (regex, key) pairs in one round trip.
MATCH_MANY = """
    SELECT (CASE WHEN key = '' THEN '' ELSE '.' || key END) ~ regex AS matches
    FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS pairs(regex, key, n)
    ORDER BY n
"""
MATCH_ONE = "SELECT (CASE WHEN $2::text = '' THEN '' ELSE '.' || $2::text END) ~ $1::text"


def dotted(alphabet: Iterable[str], max_words: int) -> list[str]:
    """Every dotted string of up to max_words words from the alphabet, without duplicates."""
    words = list(alphabet)
    sizes = range(max_words + 1)
    return sorted({".".join(chosen) for size in sizes for chosen in itertools.product(words, repeat=size)})


GENERATED_PATTERNS = dotted(["a", "", "*", "#", "a*"], 3)
GENERATED_KEYS = dotted(["a", "b", "", "a*"], 3)
GENERATED_PAIRS = list(itertools.product(GENERATED_PATTERNS, GENERATED_KEYS))
ALL_KEYS = sorted({key for _, key, _ in CORNER_CASES} | set(GENERATED_KEYS))


@pytest.fixture
async def connection(services: Services) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the server's existing admin database; the queries here touch no table."""
    connection = await asyncpg.connect(services.postgres_url)
    try:
        yield connection
    finally:
        await connection.close()


async def postgres_matches(connection: asyncpg.Connection, pairs: list[tuple[str, str]]) -> list[bool]:
    rows = await connection.fetch(
        MATCH_MANY, [topic_regex(pattern) for pattern, _ in pairs], [key for _, key in pairs]
    )
    return [row["matches"] for row in rows]


def test_the_generated_pairs_are_many_and_both_ways() -> None:
    outcomes = [reference(pattern, key) for pattern, key in GENERATED_PAIRS]
    assert len(GENERATED_PAIRS) > 1000
    assert 100 < sum(outcomes) < len(outcomes) - 100


async def test_postgres_matches_the_corner_cases_as_rabbitmq_does(connection: asyncpg.Connection) -> None:
    pairs = [(pattern, key) for pattern, key, _ in CORNER_CASES]
    matched = await postgres_matches(connection, pairs)
    expected = [outcome for _, _, outcome in CORNER_CASES]
    assert list(zip(pairs, matched, strict=True)) == list(zip(pairs, expected, strict=True))


async def test_postgres_agrees_with_topic_matches_on_generated_pairs(connection: asyncpg.Connection) -> None:
    matched = await postgres_matches(connection, GENERATED_PAIRS)
    in_python = [topic_matches(pattern, key) for pattern, key in GENERATED_PAIRS]
    by_reference = [reference(pattern, key) for pattern, key in GENERATED_PAIRS]
    outcomes = zip(GENERATED_PAIRS, matched, in_python, by_reference, strict=True)
    disagreements = [(pair, sql, py, ref) for pair, sql, py, ref in outcomes if not sql == py == ref]
    assert disagreements == []


@pytest.mark.parametrize(("pattern", "key", "expected"), CORNER_CASES[:6])
async def test_the_single_pair_expression_matches_like_the_bulk_one(
    connection: asyncpg.Connection, pattern: str, key: str, expected: bool
) -> None:
    assert await connection.fetchval(MATCH_ONE, topic_regex(pattern), key) is expected


async def test_where_clause_selects_the_keys_topic_matches_selects(connection: asyncpg.Connection) -> None:
    patterns = sorted({pattern for pattern, _, _ in CORNER_CASES} | {"a.b", "", "a*.b", "a..b"})
    for pattern in patterns:
        sql, params = where_clause(Filters(routing_key=pattern, include_replays=True))
        # where_clause's text is fixed fragments; the pattern itself travels as a parameter.
        keys = f"${len(params) + 1}::text[]"
        query = f"SELECT routing_key FROM unnest({keys}) AS archive(routing_key) WHERE {sql}"  # noqa: S608
        rows = await connection.fetch(query, *params, ALL_KEYS)
        selected = {row["routing_key"] for row in rows}
        assert selected == {key for key in ALL_KEYS if topic_matches(pattern, key)}, pattern
