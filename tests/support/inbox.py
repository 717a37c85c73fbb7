"""Inbox tests: the example consumer in subprocesses, a fresh application database, originals and replays."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiormq

from rabbit_archive.archive.amqp_codec import Properties, encode_properties
from rabbit_archive.replay.tagging import Tag, tagged_properties
from tests.conftest import run_sql
from tests.support.raw_frames import WireProperties
from tests.support.services import Services

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "inbox_consumer.py"
# The example's topology (examples/inbox_consumer.py declares it).
EXCHANGE = "payments"
QUEUE = "ledger"


@contextlib.contextmanager
def fresh_database(services: Services) -> Iterator[str]:
    """A new, empty database for the application under test; dropped afterwards."""
    name = f"test_app_{uuid.uuid4().hex[:12]}"
    run_sql(services.postgres_url, f'CREATE DATABASE "{name}"')
    try:
        yield services.database_url(name)
    finally:
        run_sql(services.postgres_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class Consumer:
    """One consumer process (the example, or the kill-test worker) printing JSON lines to a log file."""

    def __init__(
        self, amqp_url: str, database_url: str, *, worker_mode: str | None = None, prefetch: int = 10
    ) -> None:
        self._log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - kept open for the process's life
            prefix="inbox-consumer-", suffix=".log", delete=False
        )
        if worker_mode is None:
            command = [sys.executable, str(EXAMPLE), "--prefetch", str(prefetch)]
        else:
            command = [sys.executable, "-m", "tests.support.inbox_worker", worker_mode]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AMQP_URL", "DATABASE_URL"))}
        self.process = subprocess.Popen(
            [*command, "--amqp-url", amqp_url, "--database-url", database_url, "--queue", QUEUE],
            env=env,
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        self._log.flush()
        return Path(self._log.name).read_text(errors="replace")

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        """The JSON lines printed so far (of one kind)."""
        found = []
        for line in self.output().splitlines():
            if line.startswith("{"):
                event = json.loads(line)
                if kind is None or event["event"] == kind:
                    found.append(event)
        return found

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll until predicate() holds, failing with this process's output if it exits or times out."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.process.poll() is not None:
                raise AssertionError(
                    f"consumer exited {self.process.returncode} before {what}:\n{self.output()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}:\n{self.output()}")
            time.sleep(0.05)

    def wait_consuming(self, timeout: float = 20) -> "Consumer":
        self.wait_for(lambda: bool(self.events("consuming")), timeout, "consuming")
        return self

    def wait_handled(self, count: int, timeout: float = 20) -> None:
        """Until `count` messages were processed or found duplicate."""
        self.wait_for(lambda: len(self.handled()) >= count, timeout, f"{count} handled messages")

    def handled(self) -> list[dict[str, Any]]:
        return [event for event in self.events() if event["event"] in ("processed", "duplicate")]

    def kill(self) -> None:
        """SIGKILL: the open transaction dies with the connection, the deliveries go back to the queue."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> int:
        """SIGTERM and wait (SIGKILL after 15 s)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                return self.process.wait(5)
        return self.process.returncode

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)
        self._log.close()
        Path(self._log.name).unlink(missing_ok=True)


def payment(account: str, cents: int, *, message_id: str | None = None, seq: int = 0) -> tuple[bytes, bytes]:
    """The property bytes and body of one payment, as a producer would publish it."""
    props = Properties(
        content_type=b"application/json",
        delivery_mode=2,
        message_id=message_id.encode() if message_id is not None else None,
        headers=[(b"tenant", ("S", b"shop-1")), (b"seq", ("l", seq))],
    )
    body = json.dumps({"account": account, "amount_cents": cents}).encode()
    return encode_properties(props), body


def replay_copy(
    raw: bytes, routing_key: str, replay_id: str, archive_id: int, exchange: str = EXCHANGE
) -> bytes:
    """The property bytes `rabbit-replay run` sends for an original (the replay tool's own tagging)."""
    now = int(time.time())
    return tagged_properties(
        raw,
        Tag(replay_id),
        archive_id=archive_id,
        replayed_at=now,
        original_exchange=exchange.encode(),
        original_routing_key=routing_key.encode(),
        captured_at=now,
    )


async def publish(amqp_url: str, messages: list[tuple[str, str, bytes, bytes]]) -> None:
    """Publish (exchange, routing key, property bytes, body) in order, with confirms."""
    connection = await aiormq.connect(amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        for index, (exchange, routing_key, raw, body) in enumerate(messages):
            await channel.basic_publish(
                body,
                exchange=exchange,
                routing_key=routing_key,
                properties=WireProperties(raw, f"inbox-{index}"),  # type: ignore[arg-type]
                mandatory=True,
            )
    finally:
        await connection.close()
