"""The preflight's verdicts and scripts/services' placement rule, without services."""

import aiormq
import pytest
from pamqp import commands

from rabbit_archive.archive.checks import Report, outcome
from rabbit_archive.capture.preflight import (
    database_rights_findings,
    schema_finding,
    skew_finding,
    tag_findings,
    user_tags,
    version_tuple,
)
from rabbit_archive.capture.rendering import print_check
from rabbit_archive.config.local_services import endpoints, is_local_host, plan
from rabbit_archive.config.settings import Settings
from rabbit_archive.replay.preflight import grant_for as replay_grant
from rabbit_archive.replay.preflight import write_refused


def _close(code: int) -> commands.Channel.Close:
    return commands.Channel.Close(reply_code=code, reply_text=f"{code} text")


def test_probe_outcomes_follow_the_reply_code() -> None:
    assert outcome(None) == "accepted"
    assert outcome(aiormq.exceptions.ChannelAccessRefused(_close(403))) == "refused"
    assert outcome(aiormq.exceptions.ChannelNotFoundEntity(_close(404))) == "not_found"
    assert outcome(aiormq.exceptions.ChannelPreconditionFailed(_close(406))) == "rejected"
    assert outcome(OSError("gone")) == "failed"


def test_tags_as_list_or_comma_string() -> None:
    assert user_tags({"tags": ["management", "monitoring"]}) == {"management", "monitoring"}
    assert user_tags({"tags": "administrator, management"}) == {"administrator", "management"}
    assert user_tags({}) == set()


@pytest.mark.parametrize(
    ("tags", "source", "status"),
    [
        (set(), "bindings", "fail"),
        ({"impersonator"}, "bindings", "fail"),
        ({"management"}, "bindings", "ok"),
        ({"monitoring"}, "bindings", "ok"),
        ({"management"}, "firehose", "fail"),
        ({"management"}, "bindings+default", "fail"),
        ({"administrator"}, "firehose", "ok"),
    ],
)
def test_tags_needed_by_source(tags: set[str], source: str, status: str) -> None:
    report = Report()
    tag_findings(report, "capture", tags, source)
    [finding] = report.findings
    assert finding.status == status
    if status == "fail":
        assert finding.fix.startswith("rabbitmqctl set_user_tags capture ")


def test_versions_and_skew() -> None:
    assert version_tuple("3.10.8") == (3, 10, 8)
    assert version_tuple("3.9.0-rc.1") == (3, 9, 0)
    assert version_tuple("3.10.8") >= (3, 10)
    report = Report()
    skew_finding(report, "PostgreSQL", 0.3, 1.0, "ntp")
    skew_finding(report, "PostgreSQL", -4.0, 1.0, "ntp")
    assert [finding.status for finding in report.findings] == ["ok", "warn"]
    assert "-4.0 s" in report.findings[1].detail
    assert report.ok  # a skewed clock does not stop capture


@pytest.mark.parametrize(
    ("version", "status", "fragment"),
    [
        (None, "ok", "applies version 7"),
        (5, "ok", "migrates it to 7"),
        (7, "ok", "current"),
        (9, "fail", "newer"),
    ],
)
def test_schema_version(version: int | None, status: str, fragment: str) -> None:
    report = Report()
    schema_finding(report, version, 7)
    assert report.findings[0].status == status
    assert fragment in report.findings[0].detail


def test_database_rights_lists_each_missing_one_with_its_statement() -> None:
    rights = {
        "role": "cap",
        "database": "archive",
        "can_create": False,
        "schema_exists": True,
        "owns_schema": False,
        "schema_owner": "admin",
        "owns_messages": False,
        "messages_owner": "admin",
    }
    report = Report()
    database_rights_findings(report, rights)
    fixes = [finding.fix for finding in report.problems]
    assert fixes[0] == 'GRANT CREATE ON DATABASE "archive" TO "cap"'
    assert fixes[1].startswith('ALTER SCHEMA rabbit_archive OWNER TO "cap"')
    assert fixes[2] == 'ALTER TABLE rabbit_archive.messages OWNER TO "cap"'
    fine = Report()
    database_rights_findings(fine, {**rights, "can_create": True, "schema_exists": False})
    assert fine.ok


def test_report_json_and_text(capsys: pytest.CaptureFixture[str]) -> None:
    report = Report()
    report.add("exchanges", "fail", "cannot bind 'a\x1b[2Jb'", "EXCLUDE it", vhost="v\u202e")
    report.add("clock_skew", "warn", "off")
    assert report.as_json()["problems"] == 1
    assert report.as_json()["findings"][0]["vhost"] == "v\u202e"
    print_check(report)
    out = capsys.readouterr().out
    assert "\x1b" not in out
    assert "\\x1b[2Jb" in out
    assert "\\u202e" in out
    assert "fix: EXCLUDE it" in out
    assert out.rstrip().endswith("1 problem: capture would not work")


@pytest.mark.parametrize(
    ("host", "local"),
    [
        ("localhost", True),
        ("LOCALHOST", True),
        ("node.localhost", True),
        ("127.0.0.1", True),
        ("127.3.2.1", True),
        ("[::1]", True),
        ("::1", True),
        ("vm", False),
        ("192.0.2.2", False),
        ("localhost.example.com", False),
        ("rabbit.internal", False),
    ],
)
def test_local_hosts_are_loopback_and_localhost_only(host: str, local: bool) -> None:
    assert is_local_host(host) is local


def test_placement_per_server() -> None:
    default = Settings(
        amqp_url="amqp://guest:guest@localhost:5672/",
        management_url="http://localhost:15672",
        database_url="postgresql://localhost/rabbit_archive",
    )
    assert plan(default) == {"rabbitmq": True, "postgresql": True}
    elsewhere = Settings(
        amqp_url="amqp://u:p@mq1:5672,mq2:5672/v",
        management_url="http://mq1:15672,mq2:15672",
        database_url="postgresql://u@db1:5432,db2:5432/archive?target_session_attrs=read-write",
    )
    assert plan(elsewhere) == {"rabbitmq": False, "postgresql": False}
    # scripts/cluster's nodes are local but not the servers scripts/services runs.
    cluster = Settings(amqp_url="amqp://g:g@localhost:5681/", management_url="http://localhost:15681")
    assert plan(cluster)["rabbitmq"] is False
    socket = Settings(database_url="postgresql:///archive?host=/var/run/postgresql")
    assert plan(socket)["postgresql"] is True
    assert [endpoint.port for endpoint in endpoints("amqps://u:p@mq:5671/")] == [5671]


def test_replay_write_probe_reads_whom_the_refusal_names() -> None:
    source = "rabbit-archive-check-abc"
    assert write_refused(
        "ACCESS_REFUSED - access to exchange 'orders' in vhost 'v' refused for user 'u'", source
    )
    assert not write_refused(
        f"ACCESS_REFUSED - access to exchange '{source}' in vhost 'v' refused for user 'u'", source
    )


@pytest.mark.parametrize(
    ("missing", "grant"),
    [
        ("USAGE on schema rabbit_archive", 'GRANT USAGE ON SCHEMA rabbit_archive TO "r"'),
        ("SELECT on rabbit_archive.messages", 'GRANT SELECT ON rabbit_archive.messages TO "r"'),
        ("UPDATE on rabbit_archive.replays", 'GRANT UPDATE ON rabbit_archive.replays TO "r"'),
    ],
)
def test_replay_grants(missing: str, grant: str) -> None:
    assert replay_grant(missing, "r") == grant
