"""A replay whose broker node goes away goes on with another node of AMQP_URL: what was confirmed
stays confirmed, the unanswered window is sent again (the only possible duplicates), the cursor never
passes an unconfirmed message, and a stop request or a cluster that does not answer still ends it."""

import asyncio
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import pytest

from rabbit_archive.archive import frames
from rabbit_archive.archive.amqp_codec import decode_properties
from rabbit_archive.archive.errors import BrokerUnavailable, UsageError
from rabbit_archive.replay import history, runner
from rabbit_archive.replay.history import Target
from rabbit_archive.replay.publisher import Nacked
from rabbit_archive.replay.runner import ConfirmWindow, Counts, Job, ReplayStopped
from rabbit_archive.replay.tagging import REPLAY_ARCHIVE_ID, REPLAY_ID, Tag
from tests.unit.test_replay_logic import Publishes, archived, settled

REPLAY = "0b6c6b43-1d2e-4f5a-9b8c-7d6e5f4a3b2c"


class Cluster:
    """The runner's view of a broker cluster: confirms publishes in order, a little at a time, and
    drops the connection once it has confirmed as many as `drop_after` says (each number once).

    A message counts as delivered to the target as soon as it is published on a live connection:
    the worst case, in which every publish whose confirm was lost with its node got through.
    """

    def __init__(
        self,
        *,
        drop_after: tuple[int, ...] = (),
        loss: Callable[[], BaseException] = lambda: ConnectionError("connection reset by peer"),
        nodes: int = 3,
    ) -> None:
        self.drop_after = deque(drop_after)
        self.loss = loss
        self.can_fail_over = nodes > 1
        self.refused = None
        self.connection = 1
        self.lost = False
        self.confirmed: set[int] = set()
        self.confirmed_at_loss: list[set[int]] = []
        self.delivered: list[tuple[int, int, bytes]] = []  # (connection, archive id, property bytes)
        self.reconnects = 0
        self.reconnecting = asyncio.Event()
        # What reconnect() does on each call: None connects; an exception is raised; "hang" never ends.
        self.reconnect_plan: deque[BaseException | str | None] = deque()
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()
        self._wake = asyncio.Event()
        self._confirmer = asyncio.create_task(self._confirm())

    @property
    def closed(self) -> bool:
        return self.lost

    @property
    def node(self) -> str:
        return f"node-{(self.connection - 1) % 3 + 1}"

    def publish(self, _exchange: str, _key: str, properties: bytes, _body: bytes, archive_id: int) -> Any:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.lost:
            future.set_exception(ConnectionError("channel closed"))
        else:
            self.delivered.append((self.connection, archive_id, properties))
            self._waiting.append((archive_id, future))
            self._wake.set()

        async def confirmed() -> None:
            await future

        return asyncio.create_task(confirmed())

    async def _confirm(self) -> None:
        while True:
            if not self._waiting:
                self._wake.clear()
                await self._wake.wait()
            for _ in range(50):  # a window builds up between confirms, as on a real broker
                await asyncio.sleep(0)
            for _ in range(min(7, len(self._waiting))):
                archive_id, future = self._waiting.popleft()
                if not future.done():
                    future.set_result(None)
                    self.confirmed.add(archive_id)
                if self.drop_after and len(self.confirmed) >= self.drop_after[0]:
                    self.drop_after.popleft()
                    self._drop()
                    break

    def _drop(self) -> None:
        """The node goes away: whatever waits for a confirm fails with the connection."""
        self.lost = True
        self.confirmed_at_loss.append(set(self.confirmed))
        while self._waiting:
            _, future = self._waiting.popleft()
            future.set_exception(self.loss())

    async def reconnect(self) -> str:
        self.reconnects += 1
        self.reconnecting.set()
        step = self.reconnect_plan.popleft() if self.reconnect_plan else None
        await asyncio.sleep(0.001)
        if step == "hang":
            await asyncio.get_running_loop().create_future()
        if isinstance(step, BaseException):
            raise step
        self.connection += 1
        self.lost = False
        return self.node

    async def close(self) -> None:
        self._confirmer.cancel()
        await asyncio.gather(self._confirmer, return_exceptions=True)


@pytest.fixture
async def cluster_factory() -> AsyncIterator[Callable[..., Cluster]]:
    made: list[Cluster] = []

    def make(**options: Any) -> Cluster:
        made.append(Cluster(**options))
        return made[-1]

    try:
        yield make
    finally:
        for cluster in made:
            await cluster.close()


class Saved:
    """The history as the runner saves it; each saved cursor is checked against the broker."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, cluster: Cluster, ids: list[int]) -> None:
        self.cursors: list[int] = []
        self.values: dict[str, Any] = {}

        async def save_progress(_connection: object, _replay_id: str, **values: Any) -> None:
            cursor = values["cursor"]
            # The confirmed cursor never passes a message the broker did not confirm.
            assert all(archive_id in cluster.confirmed for archive_id in ids if archive_id <= cursor)
            self.cursors.append(cursor)
            self.values = values

        async def save_failures(_connection: object, _replay_id: str, **_values: Any) -> None:
            return None

        monkeypatch.setattr(history, "save_progress", save_progress)
        monkeypatch.setattr(history, "save_failures", save_failures)


def selection(monkeypatch: pytest.MonkeyPatch, ids: list[int], retried: tuple[int, ...] = ()) -> None:
    """The archive the runner reads: the retried positions first, then ids after the cursor."""

    async def items(_connection: object, job: Job) -> AsyncIterator[tuple[int, Any, bool]]:
        for archive_id in retried:
            yield archive_id, archived(id=archive_id), True
        for archive_id in ids:
            if archive_id > job.cursor:
                yield archive_id, archived(id=archive_id), False

    monkeypatch.setattr(runner, "_items", items)


async def replay(cluster: Cluster, job: Job, stop: asyncio.Event | None = None) -> Counts:
    return await runner.execute(
        job,
        connection=cast(Any, None),
        publisher=cast(Any, cluster),
        stop=stop or asyncio.Event(),
        progress=runner.Progress(),
    )


def job(selected: int, **overrides: Any) -> Job:
    return Job(
        replay_id=REPLAY, target=Target(queue="q"), tag=Tag(REPLAY, None), selected=selected, **overrides
    )


def tags(properties: bytes) -> tuple[Any, Any]:
    """x-replay-id and x-replay-archive-id of a published message."""
    headers = dict(decode_properties(properties).headers or ())
    return headers[REPLAY_ID][1], headers[REPLAY_ARCHIVE_ID][1]


def duplicates(cluster: Cluster) -> dict[int, list[bytes]]:
    """Archive ids delivered more than once, with the property bytes of each copy."""
    copies: dict[int, list[bytes]] = {}
    for _, archive_id, properties in cluster.delivered:
        copies.setdefault(archive_id, []).append(properties)
    return {archive_id: found for archive_id, found in copies.items() if len(found) > 1}


@pytest.mark.parametrize(
    "loss",
    [
        lambda: ConnectionError("connection reset by peer"),
        # aiormq fails the futures of a connection that ended without a reason with a bare Exception.
        Exception,
    ],
    ids=["connection-error", "bare-exception"],
)
async def test_a_lost_node_is_replaced_and_only_the_unconfirmed_window_is_sent_twice(
    monkeypatch: pytest.MonkeyPatch,
    cluster_factory: Callable[..., Cluster],
    loss: Callable[[], BaseException],
) -> None:
    ids = list(range(1, 3_001))
    cluster = cluster_factory(drop_after=(1_200,), loss=loss)
    selection(monkeypatch, ids)
    saved = Saved(monkeypatch, cluster, ids)

    counts = await asyncio.wait_for(replay(cluster, job(len(ids))), 30)

    assert cluster.reconnects == 1
    assert (counts.confirmed, saved.cursors[-1]) == (len(ids), ids[-1])
    assert {archive_id for _, archive_id, _ in cluster.delivered} == set(ids)  # each at least once
    twice = duplicates(cluster)
    unconfirmed_at_loss = set(ids) - cluster.confirmed_at_loss[0]
    assert twice  # the test does lose a window
    assert set(twice) <= unconfirmed_at_loss
    assert len(twice) <= runner.WINDOW
    for archive_id, copies in twice.items():
        assert len(copies) == 2
        # The very same message again: same x-replay-id and x-replay-archive-id (same bytes, even).
        assert {tags(properties) for properties in copies} == {(REPLAY.encode(), archive_id)}
        assert copies[0] == copies[1]
    assert counts.published == len(ids) + len(twice)
    assert saved.cursors == sorted(saved.cursors)


async def test_two_losses_in_a_row_each_move_to_another_node(
    monkeypatch: pytest.MonkeyPatch, cluster_factory: Callable[..., Cluster]
) -> None:
    ids = list(range(1, 2_001))
    cluster = cluster_factory(drop_after=(400, 1_100))
    selection(monkeypatch, ids)
    saved = Saved(monkeypatch, cluster, ids)

    counts = await asyncio.wait_for(replay(cluster, job(len(ids))), 30)

    assert (cluster.reconnects, cluster.connection) == (2, 3)
    assert (counts.confirmed, saved.cursors[-1]) == (len(ids), ids[-1])
    assert Counter(archive_id for _, archive_id, _ in cluster.delivered).keys() == set(ids)
    assert len(duplicates(cluster)) <= 2 * runner.WINDOW


async def test_a_node_lost_after_the_last_publish_still_gets_the_last_window_confirmed(
    monkeypatch: pytest.MonkeyPatch, cluster_factory: Callable[..., Cluster]
) -> None:
    ids = list(range(1, 1_001))
    cluster = cluster_factory(drop_after=(len(ids) - 100,))  # everything was published by then
    selection(monkeypatch, ids)
    saved = Saved(monkeypatch, cluster, ids)

    counts = await asyncio.wait_for(replay(cluster, job(len(ids))), 30)

    assert cluster.reconnects == 1
    assert (counts.confirmed, saved.cursors[-1]) == (len(ids), ids[-1])
    assert set(duplicates(cluster)) <= set(ids[-100:])


async def test_nodes_that_do_not_answer_for_a_while_are_tried_again_until_one_does(
    monkeypatch: pytest.MonkeyPatch, cluster_factory: Callable[..., Cluster]
) -> None:
    monkeypatch.setattr(runner, "FAILOVER_PAUSES", (0.01, 0.01))
    ids = list(range(1, 1_501))
    cluster = cluster_factory(drop_after=(600,))
    cluster.reconnect_plan.extend(
        [BrokerUnavailable("no node answered"), ConnectionRefusedError(111, "refused")]
    )
    selection(monkeypatch, ids)
    Saved(monkeypatch, cluster, ids)

    counts = await asyncio.wait_for(replay(cluster, job(len(ids))), 30)

    assert (cluster.reconnects, counts.confirmed) == (3, len(ids))


async def test_without_a_node_within_the_deadline_the_replay_stops_with_the_cursor_saved(
    monkeypatch: pytest.MonkeyPatch, cluster_factory: Callable[..., Cluster]
) -> None:
    monkeypatch.setattr(runner, "FAILOVER_DEADLINE", 0.3)
    monkeypatch.setattr(runner, "FAILOVER_PAUSES", (0.02, 0.02))
    ids = list(range(1, 2_001))
    cluster = cluster_factory(drop_after=(700,))
    cluster.reconnect_plan.extend([BrokerUnavailable("no node answered")] * 1_000)
    selection(monkeypatch, ids)
    saved = Saved(monkeypatch, cluster, ids)

    started = time.monotonic()
    with pytest.raises(BrokerUnavailable, match="no node of RABBIT_ARCHIVE_AMQP_URL took the replay"):
        await asyncio.wait_for(replay(cluster, job(len(ids))), 30)

    assert time.monotonic() - started < 5
    assert cluster.reconnects > 1
    # Exactly what was confirmed before the loss: a resume sends the rest, nothing is skipped.
    confirmed = sorted(cluster.confirmed_at_loss[0])
    assert saved.cursors[-1] == confirmed[-1] == len(confirmed)
    assert saved.values["confirmed"] == len(confirmed)


@pytest.mark.parametrize("plan", ["hang", "refuse"])
async def test_a_stop_request_ends_the_reconnect_attempts_at_once(
    monkeypatch: pytest.MonkeyPatch, cluster_factory: Callable[..., Cluster], plan: str
) -> None:
    monkeypatch.setattr(runner, "FAILOVER_PAUSES", (5.0, 5.0))
    ids = list(range(1, 2_001))
    cluster = cluster_factory(drop_after=(700,))
    cluster.reconnect_plan.extend(["hang"] if plan == "hang" else [BrokerUnavailable("refused")] * 100)
    selection(monkeypatch, ids)
    saved = Saved(monkeypatch, cluster, ids)
    stop = asyncio.Event()
    running = asyncio.create_task(replay(cluster, job(len(ids)), stop))
    await asyncio.wait_for(cluster.reconnecting.wait(), 10)
    await asyncio.sleep(0.05)  # hanging in a connect, or pausing between rounds

    stopped_at = time.monotonic()
    stop.set()
    with pytest.raises(BrokerUnavailable, match="lost the broker while publishing"):
        await asyncio.wait_for(running, 30)

    assert time.monotonic() - stopped_at < 1
    assert saved.cursors[-1] == len(cluster.confirmed_at_loss[0])


async def test_with_one_node_in_the_url_a_lost_connection_still_interrupts(
    monkeypatch: pytest.MonkeyPatch, cluster_factory: Callable[..., Cluster]
) -> None:
    ids = list(range(1, 2_001))
    cluster = cluster_factory(drop_after=(700,), nodes=1)
    selection(monkeypatch, ids)
    saved = Saved(monkeypatch, cluster, ids)

    with pytest.raises(BrokerUnavailable, match="lost the broker while publishing"):
        await asyncio.wait_for(replay(cluster, job(len(ids))), 30)

    assert cluster.reconnects == 0
    assert saved.cursors[-1] == len(cluster.confirmed_at_loss[0])


async def test_a_channel_error_on_a_live_connection_is_not_a_failover(
    monkeypatch: pytest.MonkeyPatch, cluster_factory: Callable[..., Cluster]
) -> None:
    ids = list(range(1, 2_001))
    cluster = cluster_factory(drop_after=(700,))
    original = cluster._drop

    def channel_closed() -> None:
        original()
        cluster.lost = False  # the broker closed the channel (a deleted exchange), not the connection

    monkeypatch.setattr(cluster, "_drop", channel_closed)
    selection(monkeypatch, ids)
    Saved(monkeypatch, cluster, ids)

    with pytest.raises(BrokerUnavailable):
        await asyncio.wait_for(replay(cluster, job(len(ids))), 30)
    assert cluster.reconnects == 0


async def test_a_target_missing_on_the_new_node_stops_the_replay_resumable(
    monkeypatch: pytest.MonkeyPatch, cluster_factory: Callable[..., Cluster]
) -> None:
    ids = list(range(1, 2_001))
    cluster = cluster_factory(drop_after=(700,))
    cluster.reconnect_plan.append(UsageError("queue 'q' does not exist in vhost '/'"))
    selection(monkeypatch, ids)
    saved = Saved(monkeypatch, cluster, ids)

    with pytest.raises(ReplayStopped, match=r"moved to .*, where queue 'q' does not exist"):
        await asyncio.wait_for(replay(cluster, job(len(ids))), 30)
    assert saved.cursors[-1] == len(cluster.confirmed_at_loss[0])


async def test_failed_messages_sent_again_survive_a_failover(
    monkeypatch: pytest.MonkeyPatch, cluster_factory: Callable[..., Cluster]
) -> None:
    # A resume: confirmed through 2, answered through 10, 3 and 5 nacked or returned the first time.
    ids = list(range(1, 1_001))
    cluster = cluster_factory(drop_after=(9,))  # after the first confirm of this run
    cluster.confirmed.update({1, 2, 4, 6, 7, 8, 9, 10})  # by the first run
    selection(monkeypatch, ids, retried=(3, 5))
    saved = Saved(monkeypatch, cluster, ids)
    resumed = job(
        len(ids),
        cursor=10,
        confirmed_cursor=2,
        failed={3: "nacked", 5: "returned"},
        counts=Counts(published=10, confirmed=8, nacked=1, returned=1),
    )

    counts = await asyncio.wait_for(replay(cluster, resumed), 30)

    assert cluster.reconnects == 1
    assert resumed.failed == {}
    assert (counts.confirmed, counts.nacked, counts.returned) == (len(ids), 0, 0)
    assert saved.cursors[-1] == ids[-1]
    # 3 was confirmed before the loss, 5 was lost with the connection and sent again.
    assert 3 not in {archive_id for connection, archive_id, _ in cluster.delivered if connection == 2}
    assert 5 in {archive_id for connection, archive_id, _ in cluster.delivered if connection == 2}


async def test_resend_lost_sends_again_only_what_the_broker_did_not_answer(publishes: Publishes) -> None:
    counts = Counts()
    window = ConfirmWindow(0, counts)
    sent_again: list[int] = []

    def again(position: int) -> Callable[[], "asyncio.Task[None]"]:
        def send() -> "asyncio.Task[None]":
            sent_again.append(position)
            task, finish = publishes.start()
            finish(None)
            return task

        return send

    started = {position: publishes.start() for position in (1, 2, 3, 5)}
    window.add(1, started[1][0], send=again(1))
    window.add(2, started[2][0], send=again(2))
    window.add(3, started[3][0], send=again(3))
    window.add(4, None)  # skipped: never published
    window.add(5, started[5][0], send=again(5))
    started[1][1](None)  # confirmed before the loss
    started[2][1](Nacked("basic.nack"))  # refused before the loss: keeps its outcome
    started[3][1](ConnectionError("gone"))  # lost with the connection
    await settled(started[1][0], started[2][0], started[3][0])
    # 5 still waits: nothing on the dead connection will ever answer it.

    assert window.resend_lost() == 2
    assert sent_again == [3, 5]
    await asyncio.sleep(0)
    assert started[5][0].cancelled() or started[5][0].cancelling()
    await window.drain(5)
    assert (window.cursor, window.confirmed_cursor, window.failed) == (5, 1, {2: "nacked"})
    assert (counts.confirmed, counts.nacked) == (3, 1)


@pytest.fixture
async def publishes() -> AsyncIterator[Publishes]:
    tracker = Publishes()
    try:
        yield tracker
    finally:
        await tracker.close()


def test_moving_on_starts_the_next_connect_with_the_node_after_the_last_good_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = "amqp://u:p@h1:5672,h2:5672,h3:5672/v"
    monkeypatch.setattr(frames, "_last_good", {})
    frames.move_on(url)
    assert frames._last_good[url] == 1
    frames._last_good[url] = 2
    frames.move_on(url)
    assert frames._last_good[url] == 0
    frames.move_on("amqp://u:p@h1:5672/v")  # one node: nothing to move on to
    assert "amqp://u:p@h1:5672/v" not in frames._last_good
