"""bench.java_baseline's pure parts: finding the client's jars, reading the Java program's result."""

import json
import os
from pathlib import Path

import pamqp.encode
import pytest

from bench.java_baseline import (
    MAIN_CLASS,
    JavaError,
    Program,
    client_jar,
    jars,
    java_readable_headers,
    parse_result,
    stale,
)

# What `dpkg -L librabbitmq-client-java` lists on bookworm (5.0.0-1.1), directories included.
LISTING = """\
/.
/usr
/usr/share/java
/usr/share/java/amqp-client.jar
/usr/share/maven-repo/com/rabbitmq/amqp-client/5.0.0/amqp-client-5.0.0.pom
/usr/share/java/amqp-client-5.0.0.jar
/usr/share/maven-repo/com/rabbitmq/amqp-client/debian/amqp-client-debian.jar
"""


def test_the_client_jar_is_the_one_debian_installs_under_its_plain_name() -> None:
    assert client_jar(LISTING) == Path("/usr/share/java/amqp-client.jar")
    assert client_jar("/usr/share/java/rabbitmq-client.jar\n") == Path("/usr/share/java/rabbitmq-client.jar")
    assert client_jar("/.\n/usr/share/doc/librabbitmq-client-java/copyright\n") is None


def test_the_classpath_is_the_client_then_slf4j_beside_it(tmp_path: Path) -> None:
    client = tmp_path / "amqp-client.jar"
    for name in ("amqp-client.jar", "slf4j-api.jar", "slf4j-simple.jar"):
        (tmp_path / name).touch()
    assert jars(client) == [client, tmp_path / "slf4j-api.jar"]  # no binding: slf4j warns, still runs
    (tmp_path / "slf4j-nop.jar").touch()
    assert jars(client) == [client, tmp_path / "slf4j-api.jar", tmp_path / "slf4j-nop.jar"]
    program = Program("/usr/bin/java", (tmp_path / "classes", *jars(client)))
    command = program.command("consume", "amqp://x", "q", "10", "5", "2")
    assert command[:3] == ["/usr/bin/java", "-cp", os.pathsep.join(map(str, program.classpath))]
    assert command[3:] == [MAIN_CLASS, "consume", "amqp://x", "q", "10", "5", "2"]


def test_a_missing_client_or_slf4j_api_is_a_java_error(tmp_path: Path) -> None:
    with pytest.raises(JavaError, match="no RabbitMQ Java client"):
        jars(tmp_path / "amqp-client.jar")
    (tmp_path / "amqp-client.jar").touch()
    with pytest.raises(JavaError, match=r"slf4j-api\.jar"):
        jars(tmp_path / "amqp-client.jar")


def test_the_result_is_the_last_json_line() -> None:
    last = {"messages": 5000, "seconds": 0.1, "msg_per_s": 49990.0, "nacked": 2}
    stdout = f'some JVM warning\n{{"messages": 1}}\n{json.dumps(last)}\n'
    assert parse_result(stdout) == last


@pytest.mark.parametrize(
    "stdout",
    [
        "",
        "Exception in thread main\n",
        '{"messages": 10, "seconds": 1.0',
        '{"messages": 10, "seconds": 1.0}',
        '{"messages": 10, "seconds": 1.0, "msg_per_s": "fast"}',
        '{"messages": true, "seconds": 1.0, "msg_per_s": 9.0}',
    ],
)
def test_an_unusable_result_is_a_java_error(stdout: str) -> None:
    with pytest.raises(JavaError):
        parse_result(stdout)


def test_the_program_is_recompiled_when_the_source_is_newer(tmp_path: Path) -> None:
    source = tmp_path / "ArchiveBaseline.java"
    source.touch()
    assert stale(tmp_path, source)
    compiled = tmp_path / f"{MAIN_CLASS}.class"
    compiled.touch()
    os.utime(source, (1_000_000, 1_000_000))
    os.utime(compiled, (2_000_000, 2_000_000))
    assert not stale(tmp_path, source)
    os.utime(source, (3_000_000, 3_000_000))
    assert stale(tmp_path, source)


def test_the_java_consumers_backlog_has_header_integers_the_java_client_reads() -> None:
    # 'u' (short unsigned, pamqp's choice for 32768..65535) ends a Java client's connection.
    assert pamqp.encode.table_integer(40_000)[:1] == b"u"
    with java_readable_headers():
        assert [pamqp.encode.table_integer(seq)[:1] for seq in (5, 300, 40_000, 70_000)] == [
            b"b",
            b"s",
            b"I",
            b"I",
        ]
    assert pamqp.encode.table_integer(40_000)[:1] == b"u"
