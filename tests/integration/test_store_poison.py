"""A batch with rows PostgreSQL refuses is split until each bad row is alone; nothing is lost."""

import asyncio
from typing import Any

import asyncpg
import pytest

from rabbit_archive.archive.amqp_codec import Properties, encode_properties
from rabbit_archive.capture import store as store_module
from rabbit_archive.capture.batching import Delivery
from rabbit_archive.capture.store import PostgresStore
from tests.integration.test_redelivery import store  # noqa: F401  (the migrated-store fixture)

pytestmark = pytest.mark.integration

POISON = b"poison"


def refused_views(real_row: Any) -> Any:
    """message_row, except that a poison body gets JSON views PostgreSQL's jsonb rejects (\\u0000)."""

    def row(*args: Any) -> tuple[Any, ...]:
        values = list(real_row(*args))
        if args[-1] == POISON:
            values[store_module.MESSAGE_COLUMNS.index("properties")] = '{"bad": "\\u0000"}'
        return tuple(values)

    return row


# With ids taken ahead, as a batch written beside another takes them: each part keeps its own.
@pytest.mark.parametrize("ids_ahead", [False, True])
async def test_a_batch_with_refused_rows_is_split_and_every_message_stored(
    store: PostgresStore,  # noqa: F811
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
    ids_ahead: bool,
) -> None:
    monkeypatch.setattr(store_module, "message_row", refused_views(store_module.message_row))
    bodies = [b"m0", b"m1", b"m2", b"m3", POISON, b"m5", b"m6", POISON, b"m8"]
    deliveries = [
        Delivery(
            tag,
            False,
            "orders",
            f"key.{tag}",
            encode_properties(Properties(message_id=f"id-{tag}".encode(), headers=[(b"n", ("I", tag))])),
            body,
        )
        for tag, body in enumerate(bodies, start=1)
    ]
    ids_taken = asyncio.Event() if ids_ahead else None
    result = await store.write_batch("/", deliveries, batch_id=1, forget=[], ids_taken=ids_taken)
    assert (result.stored, result.unstorable) == (9, 2)
    assert ids_taken is None or ids_taken.is_set()
    connection = await asyncpg.connect(database_url)
    try:
        rows = await connection.fetch(
            "SELECT id, routing_key, body, properties_raw, properties::text, message_id "
            "FROM rabbit_archive.messages ORDER BY id"
        )
    finally:
        await connection.close()
    assert [row["body"] for row in rows] == bodies  # archive order is delivery order
    if ids_ahead:  # one id each, taken together: no gap left by the parts split off
        assert [row["id"] for row in rows] == list(range(rows[0]["id"], rows[0]["id"] + len(bodies)))
    for row, delivery in zip(rows, deliveries, strict=True):
        assert row["properties_raw"] == delivery.properties_raw
        assert row["routing_key"] == delivery.routing_key
        assert row["message_id"] == f"id-{delivery.delivery_tag}"
        if delivery.body == POISON:
            assert "$unstorable" in row["properties"]
            assert "22P05" in row["properties"] or "Unicode" in row["properties"]
        else:
            assert "$unstorable" not in row["properties"]
