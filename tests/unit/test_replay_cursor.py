"""The confirmed cursor: nacks and returns stop it, a resume sends them again, a stop request is watched."""

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest

from rabbit_archive.archive.errors import BrokerUnavailable, UsageError
from rabbit_archive.replay import history, operations, runner
from rabbit_archive.replay.history import Target
from rabbit_archive.replay.publisher import Nacked, Returned
from rabbit_archive.replay.runner import ConfirmWindow, Counts, _unless_stopped
from rabbit_archive.replay.tagging import Tag
from tests.unit.test_replay_logic import Publishes, archived, settled, wait_briefly


@pytest.fixture
async def publishes() -> AsyncIterator[Publishes]:
    tracker = Publishes()
    try:
        yield tracker
    finally:
        await tracker.close()


async def start(
    publishes: Publishes, window: ConfirmWindow, positions: range, *, retry: bool = False
) -> list[Any]:
    finishes = []
    for position in positions:
        task, finish = publishes.start()
        window.add(position, task, retry=retry)
        finishes.append((task, finish))
    return finishes


async def test_a_nack_stops_the_confirmed_cursor_and_is_kept(publishes: Publishes) -> None:
    counts = Counts()
    window = ConfirmWindow(0, counts)
    started = await start(publishes, window, range(1, 6))
    outcomes = [None, None, Nacked("basic.nack"), None, Returned("returned")]
    for (_, finish), outcome in zip(started, outcomes, strict=True):
        finish(outcome)
    await settled(*(task for task, _ in started))
    window.settle()
    assert window.confirmed_cursor == 2  # the last one before the first nack
    assert window.cursor == 5  # everything was answered: a resume continues after 5
    assert window.failed == {3: "nacked", 5: "returned"}
    assert (counts.confirmed, counts.nacked, counts.returned) == (3, 1, 1)


async def test_a_return_alone_stops_the_confirmed_cursor(publishes: Publishes) -> None:
    counts = Counts()
    window = ConfirmWindow(10, counts)
    started = await start(publishes, window, range(11, 14))
    for (_, finish), outcome in zip(started, [Returned("r"), None, None], strict=True):
        finish(outcome)
    await settled(*(task for task, _ in started))
    window.settle()
    assert (window.confirmed_cursor, window.cursor, window.failed) == (10, 13, {11: "returned"})


async def test_sending_the_failed_ones_again_moves_the_cursor_once_they_are_confirmed(
    publishes: Publishes,
) -> None:
    # As stored by a first run: confirmed through 2, answered through 6, 3 and 5 failed.
    counts = Counts(published=6, confirmed=4, nacked=1, returned=1)
    window = ConfirmWindow(6, counts, confirmed_cursor=2, failed={3: "nacked", 5: "returned"})
    retried = await start(publishes, window, range(3, 6, 2), retry=True)
    rest = await start(publishes, window, range(7, 9))
    retried[0][1](None)
    retried[1][1](Nacked("again"))
    for _, finish in rest:
        finish(None)
    await settled(*(task for task, _ in retried + rest))
    window.settle()
    assert window.failed == {5: "nacked"}
    assert (window.confirmed_cursor, window.cursor) == (3, 8)
    assert (counts.confirmed, counts.nacked, counts.returned) == (7, 1, 0)

    # The next resume sends 5 again; once confirmed, everything through 8 is.
    again = await start(publishes, window, range(5, 6), retry=True)
    again[0][1](None)
    await settled(again[0][0])
    window.settle()
    assert (window.failed, window.confirmed_cursor, window.cursor) == ({}, 8, 8)
    assert (counts.confirmed, counts.nacked, counts.returned) == (8, 0, 0)


async def test_wait_for_room_returns_when_stop_is_set(publishes: Publishes) -> None:
    window = ConfirmWindow(0, Counts())
    await start(publishes, window, range(1, 3))
    stop = asyncio.Event()
    waiting = await wait_briefly(window.wait_for_room(2, stop=stop))
    assert not waiting.done()
    stop.set()
    await asyncio.wait_for(waiting, 1)
    assert len(window) == 2


async def test_drain_returns_when_stop_is_set(publishes: Publishes) -> None:
    window = ConfirmWindow(0, Counts())
    await start(publishes, window, range(1, 3))
    stop = asyncio.Event()
    draining = await wait_briefly(window.drain(60, stop))
    assert not draining.done()
    stop.set()
    await asyncio.wait_for(draining, 1)
    assert len(window) == 2


async def test_a_lenient_drain_keeps_what_was_confirmed_before_a_lost_publish(publishes: Publishes) -> None:
    counts = Counts()
    window = ConfirmWindow(0, counts)
    started = await start(publishes, window, range(1, 4))
    started[0][1](None)
    started[1][1](ConnectionError("gone"))
    await asyncio.wait_for(window.drain(0.05, strict=False), 5)
    assert (window.cursor, window.confirmed_cursor, counts.confirmed, len(window)) == (1, 1, 1, 2)
    with pytest.raises(BrokerUnavailable):
        window.settle()


async def test_a_request_the_broker_never_answers_gives_way_to_a_stop() -> None:
    stop = asyncio.Event()
    never: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def declare() -> int:
        return await never

    waiting = asyncio.create_task(_unless_stopped(stop, declare()))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    stop.set()
    assert await asyncio.wait_for(waiting, 1) is None

    async def answered() -> int:
        return 7

    assert await _unless_stopped(asyncio.Event(), answered()) == 7


async def test_resume_takes_the_lock_before_reading_the_record(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    @contextlib.asynccontextmanager
    async def connection(*_: Any) -> AsyncIterator[object]:
        yield object()

    async def lock(_connection: object, _replay_id: str) -> bool:
        calls.append("lock")
        return False  # another process runs it

    async def get(_connection: object, _replay_id: str) -> object:
        calls.append("get")
        return object()

    monkeypatch.setattr(operations, "archive_connection", connection)
    monkeypatch.setattr(history, "lock", lock)
    monkeypatch.setattr(history, "get", get)
    with pytest.raises(UsageError, match="running in another process"):
        await operations.resume(
            Any, "r-1", rate=None, confirm=None, announce=lambda _: None, progress=operations.Progress()
        )
    assert calls[0] == "lock"


class SlowPublisher:
    """Confirms each publish after a short delay; the runner's view of a broker."""

    closed = False

    def __init__(self) -> None:
        self.sent: list[int] = []

    def publish(self, _exchange: str, _key: str, _props: bytes, _body: bytes, archive_id: int) -> Any:
        self.sent.append(archive_id)

        async def confirm() -> None:
            await asyncio.sleep(0.2)

        return asyncio.create_task(confirm())


async def test_any_error_in_the_loop_waits_for_the_confirms_and_saves(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    saved: list[tuple[str, Any]] = []

    async def items(_connection: object, _job: runner.Job) -> AsyncIterator[tuple[int, Any, bool]]:
        for archive_id in (1, 2, 3):
            yield archive_id, archived(id=archive_id), False
        raise RuntimeError("something unexpected")

    async def save_progress(_connection: object, _replay_id: str, **values: Any) -> None:
        saved.append(("progress", values))

    async def save_failures(_connection: object, _replay_id: str, **values: Any) -> None:
        saved.append(("failures", values))

    monkeypatch.setattr(runner, "_items", items)
    monkeypatch.setattr(history, "save_progress", save_progress)
    monkeypatch.setattr(history, "save_failures", save_failures)
    job = runner.Job(replay_id="r", target=Target(queue="q"), tag=Tag("r", None), selected=3)
    publisher = SlowPublisher()
    with pytest.raises(RuntimeError, match="unexpected"):
        await runner.execute(
            job,
            connection=Any,
            publisher=cast(Any, publisher),
            stop=asyncio.Event(),
            progress=runner.Progress(),
        )
    assert publisher.sent == [1, 2, 3]
    assert (job.counts.published, job.counts.confirmed) == (3, 3)
    assert saved[-2] == (
        "progress",
        {
            "published": 3,
            "confirmed": 3,
            "returned": 0,
            "nacked": 0,
            "skipped": 0,
            "cursor": 3,
            "without_death": 0,
        },
    )
    assert saved[-1] == ("failures", {"failed": [], "settled_cursor": 3})
