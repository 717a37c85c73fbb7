"""rabbit-archive is a good guest: importing and using it changes nothing for other AMQP code in
the same process. pamqp's decoders stay pamqp's, and an ordinary aio-pika round trip after every
module was imported and an archive connection received messages is exactly what it was."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

PROGRAM = r"""
import asyncio, importlib, json, pkgutil, sys

import aio_pika
from pamqp import decode, encode, header

before = (header.ContentHeader.unmarshal, dict(decode.METHODS), dict(encode.METHODS))


async def aio_pika_round_trip(url):
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(exclusive=True)
        headers = {"n": 1, "big": 2**40, "ratio": 1.5, "text": "é", "flag": True, "list": [1, "a"]}
        await channel.default_exchange.publish(
            aio_pika.Message(b"body", headers=headers, message_id="m-1", content_type="text/plain"),
            routing_key=queue.name,
        )
        message = await queue.get(timeout=5)
        await message.ack()
        return {
            "headers": {key: repr(value) for key, value in message.headers.items()},
            "message_id": message.message_id,
            "content_type": message.content_type,
            "body": message.body.decode(),
        }


async def main(url):
    baseline = await aio_pika_round_trip(url)
    for package in ("rabbit_archive",):
        module = importlib.import_module(package)
        for info in pkgutil.walk_packages(module.__path__, package + "."):
            if not info.name.endswith("__main__"):  # that one runs the command
                importlib.import_module(info.name)
    from rabbit_archive.archive import frames, content_header

    # An archive connection that receives messages the archive's way (raw property bytes).
    connection = await frames.connect(url)
    channel = await connection.channel()
    declared = await channel.queue_declare("", exclusive=True)
    await channel.basic_publish(b"x", routing_key=declared.queue)
    got = await channel.basic_get(declared.queue, no_ack=True)
    raw = content_header.raw_properties(got.header)
    await connection.close()
    after = (header.ContentHeader.unmarshal, dict(decode.METHODS), dict(encode.METHODS))
    print(json.dumps({
        "unchanged": after == before,
        "raw_properties": raw.hex(),
        "baseline": baseline,
        "again": await aio_pika_round_trip(url),
    }))


asyncio.run(main(sys.argv[1]))
"""


def test_importing_and_using_rabbit_archive_changes_nothing_for_aio_pika(amqp_url: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROGRAM, amqp_url], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["unchanged"]
    assert report["raw_properties"]  # the archive connection did read raw bytes meanwhile
    assert report["again"] == report["baseline"]
    assert report["baseline"]["headers"]["n"] == "1"
