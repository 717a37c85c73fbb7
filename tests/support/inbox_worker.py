"""The example consumer, made to die on its first message at a chosen point: for the kill tests.

python -m tests.support.inbox_worker MODE --amqp-url ... --database-url ... --queue ...
- `before-commit`: the handler's writes are done, the transaction is open; prints
  {"event": "paused", "key": ...} and waits for the SIGKILL the test sends.
- `after-commit`: the transaction committed, the message is not acknowledged yet; the process
  SIGKILLs itself.
"""

import argparse
import asyncio
import importlib.util
import json
import os
import signal
from pathlib import Path
from types import ModuleType

from aio_pika.abc import AbstractIncomingMessage

from rabbit_archive.inbox import Connection, Outcome, message_key

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "inbox_consumer.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("inbox_consumer_example", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["before-commit", "after-commit"])
    parser.add_argument("--amqp-url", required=True)
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--queue", required=True)
    args = parser.parse_args()
    example = load_example()

    async def pause_before_commit(message: AbstractIncomingMessage, connection: Connection) -> None:
        await example.apply_payment(message, connection)
        print(json.dumps({"event": "paused", "key": message_key(message), "pid": os.getpid()}), flush=True)
        await asyncio.Event().wait()

    report = example.report

    def die_after_commit(outcome: Outcome, key: str | None, message: AbstractIncomingMessage) -> None:
        report(outcome, key, message)
        if outcome is Outcome.PROCESSED:
            os.kill(os.getpid(), signal.SIGKILL)

    handle = example.apply_payment
    if args.mode == "before-commit":
        handle = pause_before_commit
    else:
        # consume() reads the module's `report` when it builds the inbox.
        setattr(example, "report", die_after_commit)  # noqa: B010 - a module loaded from a path
    asyncio.run(
        example.consume(args.amqp_url, args.database_url, queue_name=args.queue, prefetch=1, handle=handle)
    )


if __name__ == "__main__":
    main()
