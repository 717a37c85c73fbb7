"""The physical limit: RabbitMQ's Java client doing the aio-pika baselines' work (issue 21).

bench/java/ArchiveBaseline.java, built by the bench itself from Debian's packages (librabbitmq-client-java,
installed with apt-get when missing, and a JDK's javac), compiled once into bench-results/java/ and run
as a subprocess:

- consumer: drains N pre-published messages from a quorum queue with the same prefetch and the same
  batched acks as bench.baseline.consumer;
- publisher: publishes N messages straight into a quorum queue with publisher confirms, as many in
  flight as bench.baseline.publisher (the replay's window).

Alone, `python -m bench.java_baseline --messages 50000` measures both clients in a vhost of its own,
alternating their order over --rounds rounds, and prints the rates and the aio-pika ÷ Java ratios.
"""

import argparse
import asyncio
import contextlib
import functools
import json
import os
import shutil
import statistics
import subprocess
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import pamqp.encode

from bench import baseline
from bench.common import (
    EXCHANGE,
    MANAGEMENT,
    REPLAY_WINDOW,
    REPLAY_WINDOW_BYTES,
    Sizes,
    amqp_url,
    esc,
    fill,
    git_state,
    log,
    window_size,
)

SOURCE = Path(__file__).resolve().parent / "java" / "ArchiveBaseline.java"
MAIN_CLASS = "ArchiveBaseline"
CLASSES = Path(__file__).resolve().parent.parent / "bench-results" / "java"
PACKAGE = "librabbitmq-client-java"  # /usr/share/java/amqp-client.jar (5.0.0 on bookworm)
JDK_PACKAGE = "default-jdk-headless"
# The client's jar under the names Debian has shipped it, then its one required dependency (slf4j-api)
# and a binding that keeps slf4j quiet (without one it warns on stderr at every start).
CLIENT_JARS = ("amqp-client.jar", "rabbitmq-client.jar")
REQUIRED_JARS = ("slf4j-api.jar",)
OPTIONAL_JARS = ("slf4j-nop.jar",)
JVM_START_S = 30  # added to the time limits: a JVM start and the client's class loading, generously
RESULT_KEYS = ("messages", "seconds", "msg_per_s")
Phase = Callable[[str, Sizes], Awaitable[dict[str, Any]]]


class JavaError(RuntimeError):
    """The Java baseline could not be built or did not finish: the bench notes it and goes on."""


@dataclass(frozen=True)
class Program:
    """A compiled ArchiveBaseline and how to run it."""

    java: str
    classpath: tuple[Path, ...]  # the compiled classes' directory first, then the jars

    def command(self, *args: str) -> list[str]:
        """The java command line running ArchiveBaseline with args."""
        return [self.java, "-cp", os.pathsep.join(map(str, self.classpath)), MAIN_CLASS, *args]


def client_jar(listing: str) -> Path | None:
    """The client's jar among the files `dpkg -L librabbitmq-client-java` lists (the real file's name)."""
    paths = [Path(line.strip()) for line in listing.splitlines() if line.strip()]
    for name in CLIENT_JARS:
        for path in paths:
            if path.name == name:
                return path
    return None


def jars(client: Path) -> list[Path]:
    """The jars to run it: the client's, then slf4j-api beside it (/usr/share/java), slf4j-nop if there."""
    if not client.is_file():
        raise JavaError(f"no RabbitMQ Java client at {client}")
    found = [client]
    for name in REQUIRED_JARS:
        jar = client.parent / name
        if not jar.is_file():
            raise JavaError(f"no {name} beside {client} (Debian's libslf4j-java provides it)")
        found.append(jar)
    found.extend(jar for name in OPTIONAL_JARS if (jar := client.parent / name).is_file())
    return found


def parse_result(stdout: str) -> dict[str, Any]:
    """The JSON line ArchiveBaseline prints last: {"messages", "seconds", "msg_per_s", ...}."""
    lines = [line.strip() for line in stdout.splitlines() if line.strip().startswith("{")]
    if not lines:
        raise JavaError(f"no JSON line in the Java baseline's output: {stdout[-500:]!r}")
    try:
        result = json.loads(lines[-1])
    except json.JSONDecodeError as error:
        raise JavaError(f"unreadable Java baseline result {lines[-1]!r}: {error}") from error
    if not isinstance(result, dict):
        raise JavaError(f"the Java baseline's result is not an object: {lines[-1]!r}")
    for key in RESULT_KEYS:
        if not isinstance(result.get(key), int | float) or isinstance(result.get(key), bool):
            raise JavaError(f"the Java baseline's result has no number {key!r}: {lines[-1]!r}")
    return result


def stale(classes: Path, source: Path) -> bool:
    """Whether the compiled main class is missing or older than the source."""
    compiled = classes / f"{MAIN_CLASS}.class"
    return not compiled.is_file() or compiled.stat().st_mtime < source.stat().st_mtime


def run_quietly(command: list[str]) -> subprocess.CompletedProcess[str]:
    """Run a build command, its output captured (shown only when it fails)."""
    environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(command, capture_output=True, text=True, check=False, env=environment)


def listing() -> str | None:
    """`dpkg -L` of the client's package, None when it is not installed."""
    listed = run_quietly(["dpkg-query", "-L", PACKAGE])
    return listed.stdout if listed.returncode == 0 and client_jar(listed.stdout) else None


def install(packages: list[str]) -> None:
    """apt-get install the packages (after an apt-get update if the first attempt fails)."""
    log.log(f"java baseline: installing {' '.join(packages)} with apt-get")
    command = ["apt-get", "install", "-y", "--no-install-recommends", *packages]
    if shutil.which("apt-get") is None:
        raise JavaError(f"{' '.join(packages)} missing and no apt-get to install them")
    done = run_quietly(command)
    if done.returncode != 0:
        run_quietly(["apt-get", "update"])
        done = run_quietly(command)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:]
        raise JavaError(f"apt-get install {' '.join(packages)} failed: {' '.join(tail)}")


def build(classes: Path = CLASSES) -> Program:
    """Install what is missing, compile ArchiveBaseline.java when stale; the program to run."""
    missing = [] if listing() else [PACKAGE]
    if shutil.which("javac") is None:
        missing.append(JDK_PACKAGE)
    if missing:
        install(missing)
    listed = listing()
    javac, java = shutil.which("javac"), shutil.which("java")
    if listed is None or javac is None or java is None:
        raise JavaError(f"still no {PACKAGE} or JDK after installing them")
    client = client_jar(listed)
    assert client is not None  # listing() checked it
    classpath = (classes, *jars(client))
    if stale(classes, SOURCE):
        classes.mkdir(parents=True, exist_ok=True)
        jar_path = os.pathsep.join(map(str, classpath[1:]))
        compiled = run_quietly([javac, "-d", str(classes), "-cp", jar_path, str(SOURCE)])
        if compiled.returncode != 0:
            raise JavaError(f"javac failed: {compiled.stderr.strip()[-2000:]}")
        log.log(f"java baseline: compiled {SOURCE.name} into {classes}")
    return Program(java, classpath)


async def prepare() -> Program | None:
    """The program, built if need be; None, with a one-line note, when it cannot be."""
    try:
        return await asyncio.to_thread(build)
    except (JavaError, OSError) as error:
        log.log(f"[yellow]java baseline skipped: {error}")
        return None


@contextlib.contextmanager
def java_readable_headers() -> Iterator[None]:
    """While inside, pamqp encodes integer header values with RabbitMQ's own types only (b, s, I, l).

    By default it encodes 32768..65535 as 'u' (short unsigned), which RabbitMQ's Java client cannot read:
    the `seq` header of the backlog's messages 32768 to 65535 would end the Java consumer's connection
    ("MalformedFrameException: Unrecognised type in table"). Those values take 'I' instead (2 bytes more).
    """
    before = pamqp.encode.DEPRECATED_RABBITMQ_SUPPORT
    pamqp.encode.support_deprecated_rabbitmq(True)
    try:
        yield
    finally:
        pamqp.encode.support_deprecated_rabbitmq(before)


async def run_program(program: Program, args: list[str], limit_s: float) -> dict[str, Any]:
    """Run ArchiveBaseline with args, killed after limit_s seconds; its JSON result."""
    process = await asyncio.create_subprocess_exec(
        *program.command(*args), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=limit_s)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise JavaError(f"the Java baseline ({args[0]}) did not finish in {limit_s:.0f} s") from None
    except BaseException:
        if process.returncode is None:
            process.kill()
            await process.wait()
        raise
    if process.returncode != 0:
        raise JavaError(
            f"the Java baseline ({args[0]}) exited with {process.returncode}: "
            f"{stderr.decode(errors='replace').strip()[-2000:]}"
        )
    return parse_result(stdout.decode(errors="replace"))


async def consumer(vhost: str, sizes: Sizes, program: Program | None = None) -> dict[str, Any]:
    """msg/s of the Java client draining a quorum-queue backlog, as bench.baseline.consumer does."""
    if program is None:
        program = await asyncio.to_thread(build)
    count = sizes.messages
    async with await aio_pika.connect(amqp_url(vhost)) as connection:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue(
            "baseline-java", durable=True, arguments={"x-queue-type": "quorum"}
        )
        try:
            await queue.bind(exchange, "#")
            log.log(f"java consumer: publishing {count} messages to vhost {vhost}")
            with java_readable_headers():
                await fill(vhost, sizes)
            log.log("java consumer: draining")
            args = ["consume", amqp_url(vhost), queue.name, str(count)]
            args += [str(baseline.PREFETCH), str(baseline.ACK_EVERY)]
            result = await run_program(program, args, sizes.timeout() + JVM_START_S)
        finally:
            # Also when the program failed: a queue left bound to the backlog's exchange would take copies.
            await queue.delete(if_unused=False, if_empty=False)
    return {
        "msg_per_s": result["msg_per_s"],
        "prefetch": baseline.PREFETCH,
        "ack_every": baseline.ACK_EVERY,
        "seconds": result["seconds"],
    }


async def publisher(vhost: str, sizes: Sizes, program: Program | None = None) -> dict[str, Any]:
    """msg/s of the Java client publishing with confirms into a fresh quorum queue, as bench.baseline's."""
    if program is None:
        program = await asyncio.to_thread(build)
    in_flight = window_size(sizes.body_size, REPLAY_WINDOW, REPLAY_WINDOW_BYTES)
    async with await aio_pika.connect(amqp_url(vhost)) as connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(
            "baseline-publish-java", durable=True, arguments={"x-queue-type": "quorum"}
        )
        try:
            log.log(f"java publisher: publishing {sizes.messages} messages")
            args = ["publish", amqp_url(vhost), "", queue.name, str(sizes.messages)]
            args += [str(sizes.body_size), str(in_flight)]
            result = await run_program(program, args, sizes.timeout() + JVM_START_S)
        finally:
            await queue.delete(if_unused=False, if_empty=False)
    if result.get("nacked"):
        log.log(f"[red]java publisher: {result['nacked']} publishes nacked by the broker")
    return {
        "msg_per_s": result["msg_per_s"],
        "seconds": result["seconds"],
        "in_flight": in_flight,
        "nacked": result.get("nacked", 0),
    }


async def optional(
    measure: Callable[[str, Sizes, Program], Awaitable[dict[str, Any]]],
    vhost: str,
    sizes: Sizes,
    program: Program | None,
) -> dict[str, Any] | None:
    """One Java baseline for scripts/bench: None when it was not built or failed (noted in one line)."""
    if program is None:
        return None
    try:
        return await measure(vhost, sizes, program)
    except JavaError as error:
        log.log(f"[yellow]java baseline skipped: {error}")
        return None


def ratio(numerator: float, denominator: float) -> float:
    """numerator ÷ denominator, 0 when there is nothing to divide by."""
    return numerator / denominator if denominator else 0.0


async def compare(vhost: str, sizes: Sizes, rounds: int, program: Program) -> dict[str, Any]:
    """aio-pika and Java consumers, then publishers, their order swapped every round."""
    measured: list[dict[str, Any]] = []
    for number in range(rounds):
        java_first = number % 2 == 1
        consumers: list[tuple[str, Phase]] = [
            ("aio_pika", baseline.consumer),
            ("java", functools.partial(consumer, program=program)),
        ]
        publishers: list[tuple[str, Phase]] = [
            ("aio_pika", baseline.publisher),
            ("java", functools.partial(publisher, program=program)),
        ]
        if java_first:
            consumers.reverse()
            publishers.reverse()
        rates: dict[str, float] = {}
        for client, run in consumers:
            rates[f"{client}_consumer"] = (await run(vhost, sizes))["msg_per_s"]
        for client, run in publishers:
            rates[f"{client}_publisher"] = (await run(vhost, sizes))["msg_per_s"]
        round_result = {
            "round": number + 1,
            "order": "java first" if java_first else "aio-pika first",
            **rates,
            "consumer_ratio": ratio(rates["aio_pika_consumer"], rates["java_consumer"]),
            "publisher_ratio": ratio(rates["aio_pika_publisher"], rates["java_publisher"]),
        }
        log.log(f"java baseline round {number + 1}: {json.dumps(round_result)}")
        measured.append(round_result)
    medians = {
        key: statistics.median(each[key] for each in measured)
        for key in ("aio_pika_consumer", "java_consumer", "aio_pika_publisher", "java_publisher")
    }
    return {
        "rounds": measured,
        "median_msg_per_s": medians,
        "consumer_ratio": ratio(medians["aio_pika_consumer"], medians["java_consumer"]),
        "publisher_ratio": ratio(medians["aio_pika_publisher"], medians["java_publisher"]),
    }


async def alone(sizes: Sizes, rounds: int) -> dict[str, Any]:
    """The comparison in a vhost of its own, deleted afterwards whatever happens."""
    program = await asyncio.to_thread(build)
    vhost = f"bench-{uuid.uuid4().hex[:10]}-java"
    async with httpx.AsyncClient(base_url=MANAGEMENT, auth=("guest", "guest"), timeout=10) as api:
        try:
            (await api.put(f"/api/vhosts/{esc(vhost)}")).raise_for_status()
            everything = {"configure": ".*", "write": ".*", "read": ".*"}
            (await api.put(f"/api/permissions/{esc(vhost)}/guest", json=everything)).raise_for_status()
            return {
                "messages": sizes.messages,
                "body_size": sizes.body_size,
                "prefetch": baseline.PREFETCH,
                "ack_every": baseline.ACK_EVERY,
                "in_flight": window_size(sizes.body_size, REPLAY_WINDOW, REPLAY_WINDOW_BYTES),
                "java_classpath": [str(path) for path in program.classpath],
                **await compare(vhost, sizes, rounds, program),
            }
        finally:
            await api.delete(f"/api/vhosts/{esc(vhost)}")


def main() -> None:
    """Compare the aio-pika and Java baselines alone and print the result as JSON."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.java_baseline", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--messages", type=int, default=50_000, help="messages per phase (default 50000)")
    parser.add_argument("--body-size", type=int, default=512, help="body bytes per message (default 512)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds, the order swapped each (default 2)")
    args = parser.parse_args()
    if args.messages < 2 * baseline.ACK_EVERY:
        parser.error(f"--messages must be at least {2 * baseline.ACK_EVERY}")
    if args.rounds < 1 or args.body_size < 0:
        parser.error("--rounds must be positive and --body-size not negative")
    git = git_state()
    measured = asyncio.run(alone(Sizes(args.messages, args.body_size), args.rounds))
    print(json.dumps({**git, **measured}, indent=2))


if __name__ == "__main__":
    main()
