"""Exactly once across reconnects (issue 13): the broker connection dropped at an acknowledgement.

A proxy that reads the daemon's AMQP frames cuts the connection right after a ``basic.ack`` has
reached the broker (which then holds the ack, but the daemon cannot know whether it was applied),
or swallows the ack and cuts (the broker redelivers a batch that is already committed), several
times under load.  Whatever the broker redelivers must be recognised: every confirmed message is
in the archive exactly once.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import pytest

from tests.conftest import run_sql
from tests.support.daemon import CaptureProcess, wait_for
from tests.support.load import BackgroundPublisher
from tests.support.proxy import TcpProxy
from tests.support.services import Services

pytestmark = pytest.mark.acceptance

CUTS = 6
"""Cuts per test, alternating after and before the ack (reconnect backoff: 0.2 s doubling to 5 s)."""

RATE = 1500
"""Messages per second the publisher sends straight to the broker, beside the proxy."""

SKIPPED = "rabbit_archive_duplicates_skipped_total"
BESIDE = "rabbit_archive_batches_beside_total"
CONSUMING = '"event": "consuming"'
DUPLICATES = """
    SELECT message_id, count(*) FROM rabbit_archive.messages
    GROUP BY 1 HAVING count(*) <> 1 ORDER BY count(*) DESC, 1
"""


@dataclass
class Cut:
    """One cut and what followed until the next."""

    before: bool
    delivery_tag: int
    skipped: float = 0.0  # redeliveries the daemon recognised as stored, until the next cut

    def __str__(self) -> str:
        where = "before" if self.before else "after"
        return f"{where} ack of tag {self.delivery_tag}: {self.skipped:g} skipped"


def stored_counts(database_url: str) -> tuple[int, int]:
    """(rows, distinct message ids) in the archive."""
    try:
        row = run_sql(
            database_url, "SELECT count(*), count(DISTINCT message_id) FROM rabbit_archive.messages"
        )[0]
    except Exception:  # the schema is not there yet
        return -1, -1
    return int(row[0]), int(row[1])


def wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    """Poll until predicate() holds (True) or timeout seconds passed (False)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def exited(daemon: CaptureProcess) -> bool:
    return daemon.process is not None and daemon.process.poll() is not None


def consuming_again(daemon: CaptureProcess, sessions: int, timeout: float) -> bool:
    """Wait until the daemon logged more than `sessions` consuming events (False: timeout or exit)."""
    wait_until(lambda: daemon.log().count(CONSUMING) > sessions or exited(daemon), timeout)
    return daemon.log().count(CONSUMING) > sessions and not exited(daemon)


def fail_with_log(daemon: CaptureProcess, what: str) -> None:
    code = daemon.process.returncode if daemon.process is not None else None
    tail = "\n".join(daemon.log().splitlines()[-40:])
    pytest.fail(f"{what}; exit code {code}; the daemon's log ends:\n{tail}")


@pytest.fixture
def load_exchange(pika_channel: Any) -> str:
    """A topic exchange the daemon captures (it binds '#')."""
    pika_channel.exchange_declare("load", "topic", durable=True)
    return "load"


# The third case makes every batch of the backlogs after a cut large (BATCH_MAX_BYTES of 4 KiB):
# they are written two at a time on two connections, either committing first, acked in order.
@pytest.mark.parametrize(
    ("queue_type", "batch_max_bytes"), [("quorum", None), ("classic", None), ("classic", "4096")]
)
def test_connection_cut_at_acks_under_load_stores_every_message_exactly_once(
    start_capture: Callable[..., CaptureProcess],
    amqp_url: str,
    database_url: str,
    vhost: str,
    services: Services,
    load_exchange: str,
    queue_type: str,
    batch_max_bytes: str | None,
) -> None:
    with TcpProxy(services.amqp_host, services.amqp_port, amqp=True) as proxy:
        proxied = f"amqp://guest:guest@127.0.0.1:{proxy.port}/{quote(vhost, safe='')}"
        limits = {"batch_max_bytes": batch_max_bytes} if batch_max_bytes else {}
        daemon = start_capture(amqp_url=proxied, queue_type=queue_type, batch_size="250", **limits)
        daemon.wait_bound(load_exchange)
        publisher = BackgroundPublisher(amqp_url, load_exchange, 10_000_000, rate=RATE).start()
        cuts: list[Cut] = []
        try:
            wait_for(lambda: stored_counts(database_url)[0] > 0, 20, what="capture under way")
            for index in range(CUTS):
                before = index % 2 == 1
                sessions = daemon.log().count(CONSUMING)
                skipped = daemon.metric_total(SKIPPED)
                if cuts:
                    cuts[-1].skipped = skipped - sum(cut.skipped for cut in cuts)
                frame_cut = proxy.arm_ack_cut(before=before)
                assert frame_cut.wait(10), f"no basic.ack from the daemon within 10 s (cut {index + 1})"
                assert frame_cut.frame is not None
                tag = int.from_bytes(frame_cut.frame.payload[4:12], "big")
                cuts.append(Cut(before, tag))
                if not consuming_again(daemon, sessions, 20):
                    state = "exited" if exited(daemon) else "not consuming again 20 s"
                    fail_with_log(daemon, f"rabbit-capture {state} after cut {index + 1} ({cuts[-1]})")
                if before:
                    # The batch whose ack never arrived comes back and is recognised: wait for it
                    # (a loaded machine takes longer than a fixed pause), so it counts for this cut.
                    wait_until(lambda before_cut=skipped: daemon.metric_total(SKIPPED) > before_cut, 15)
                else:
                    time.sleep(0.5)
        finally:
            publisher.stop()
        published = publisher.join(30)

        complete = wait_until(lambda: stored_counts(database_url)[1] >= published, 30)
        time.sleep(1.5)  # anything stored twice would arrive within a batch or two
        skipped = daemon.metric_total(SKIPPED)
        cuts[-1].skipped = skipped - sum(cut.skipped for cut in cuts[:-1])
        rows, distinct = stored_counts(database_url)
        twice = run_sql(database_url, DUPLICATES)
        stored_ids = {
            row[0] for row in run_sql(database_url, "SELECT message_id FROM rabbit_archive.messages")
        }
        missing = len({f"m-{index}" for index in range(published)} - stored_ids)
        report = (
            f"{queue_type} queue: published {published}, stored {rows} rows, {distinct} distinct, "
            f"{missing} missing, {len(twice)} ids stored more than once "
            f"({sum(int(row[1]) - 1 for row in twice)} extra rows, e.g. "
            f"{[(row[0], int(row[1])) for row in twice[:5]]}); "
            f"complete={complete}; cuts: {'; '.join(str(cut) for cut in cuts)}; "
            f"{SKIPPED} = {skipped:g}"
        )
        print(report)
        assert [(row[0], int(row[1])) for row in twice] == [], report
        assert (rows, distinct, missing) == (published, published, 0), report
        # The window was hit: batches committed but not acknowledged came back and were skipped.
        assert skipped > 0, report
        assert all(cut.skipped > 0 for cut in cuts if cut.before), report
        assert daemon.log().count('"event": "broker_session_lost"') >= CUTS
        if batch_max_bytes:
            assert daemon.metric_total(BESIDE) > 0, report
