"""Read-only checks of what the broker and the database allow, shared by `rabbit-capture check` and
`rabbit-replay check`: findings, the report that lists them all, and AMQP probes.

The broker decides what a user may do, so rights are not guessed from permission patterns
(which only an administrator may read) but asked with AMQP methods that the broker refuses for
permission before it would change anything, and that change nothing when allowed (see
capture/preflight.py and replay/preflight.py for the methods each right is asked with). Each
probe gets a channel of its own: a refusal closes the channel it happened on.
"""

import contextlib
import ssl
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import aiormq
import aiormq.abc

from rabbit_archive.archive import frames
from rabbit_archive.archive.errors import describe, reply_text

Status = Literal["ok", "warn", "fail"]
Outcome = Literal["accepted", "refused", "not_found", "rejected", "failed"]

PROBE_ARGUMENT = "x-rabbit-archive-check"
_MARKS = {"ok": "ok  ", "warn": "warn", "fail": "FAIL"}


@dataclass(frozen=True)
class Finding:
    """One thing checked: what was found and, unless it is fine, what to do."""

    check: str
    status: Status
    detail: str
    fix: str = ""
    vhost: str | None = None


@dataclass
class Report:
    """Every finding of one run, in the order checked."""

    findings: list[Finding] = field(default_factory=list)

    def add(self, check: str, status: Status, detail: str, fix: str = "", vhost: str | None = None) -> None:
        """Record one finding."""
        self.findings.append(Finding(check, status, detail, fix, vhost))

    @property
    def problems(self) -> list[Finding]:
        """The findings that would stop or cripple capture."""
        return [finding for finding in self.findings if finding.status == "fail"]

    @property
    def ok(self) -> bool:
        """True when capture would work."""
        return not self.problems

    def as_json(self) -> dict[str, Any]:
        """`check --json`."""
        return {
            "ok": self.ok,
            "problems": len(self.problems),
            "findings": [asdict(finding) for finding in self.findings],
        }


def outcome(error: BaseException | None) -> Outcome:
    """What a probe's answer means: accepted, refused (403), not_found (404), rejected (406) or failed."""
    if error is None:
        return "accepted"
    if isinstance(error, aiormq.exceptions.ChannelAccessRefused):
        return "refused"
    if isinstance(error, aiormq.exceptions.ChannelNotFoundEntity):
        return "not_found"
    if isinstance(error, aiormq.exceptions.ChannelPreconditionFailed):
        return "rejected"
    return "failed"


class Probes:
    """Read-only AMQP probes on one connection; each on a channel of its own."""

    def __init__(self, connection: aiormq.abc.AbstractConnection) -> None:
        self._connection = connection

    async def ask(self, frame: Any) -> tuple[Outcome, str]:
        """Send one method; what the broker answered and its reply text."""
        channel = await self._connection.channel()
        try:
            await frames.rpc(channel, frame)
        except aiormq.exceptions.AMQPError as error:
            return outcome(error), reply_text(error)
        with contextlib.suppress(aiormq.exceptions.AMQPError):
            await channel.close()
        return "accepted", ""


def probe_arguments() -> dict[str, Any]:
    """Binding arguments no real binding has: an unbind with them can never remove anything."""
    return {PROBE_ARGUMENT: uuid.uuid4().hex}


def connection_failure(error: BaseException, url: str, user: str, vhost: str) -> tuple[str, str]:
    """One line for a failed AMQP connection, and its fix."""
    text = reply_text(error)
    if isinstance(error, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in text:
        return (
            f"the broker's TLS certificate at {url} is not trusted: {describe(error)}",
            "add cafile=/path/to/ca.pem to RABBIT_ARCHIVE_AMQP_URL's query, or install the CA",
        )
    if isinstance(error, aiormq.exceptions.ProbableAuthenticationError):
        return (
            f"the broker at {url} rejected the credentials of user {user!r}",
            "check RABBIT_ARCHIVE_AMQP_URL",
        )
    if isinstance(error, aiormq.exceptions.InvalidFrameError) and "Connection.Close" in text:
        # aiormq's way of reporting the broker's Connection.Close answering Connection.Open.
        return (
            f"RabbitMQ did not let user {user!r} into vhost {vhost!r}: the vhost does not exist or the "
            "user has no permissions there",
            f"rabbitmqctl set_permissions -p {vhost} {user} ... (see 'Least privilege' in README.md)",
        )
    if "NOT_ALLOWED" in text or "access to vhost" in text:
        return (
            f"user {user!r} may not open vhost {vhost!r} ({text})",
            f"rabbitmqctl set_permissions -p {vhost} {user} ... (see 'Least privilege' in README.md)",
        )
    return (
        f"cannot reach RabbitMQ at {url}: {describe(error)}",
        "check RABBIT_ARCHIVE_AMQP_URL and that RabbitMQ runs",
    )


def _escaped(text: str) -> str:
    # Names come from whoever declared them: no escape sequence reaches the terminal.
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def report_lines(report: Report, what: str) -> list[str]:
    """The report for people: one line per finding, its fix under it, and a verdict on `what`."""
    lines = []
    for finding in report.findings:
        where = f" (vhost {_escaped(finding.vhost)})" if finding.vhost is not None else ""
        lines.append(f"{_MARKS[finding.status]}  {finding.check}{where}: {_escaped(finding.detail)}")
        if finding.fix:
            lines.append(f"      fix: {_escaped(finding.fix)}")
    problems = len(report.problems)
    if report.ok:
        lines.append(f"{what} would work")
    else:
        lines.append(f"{problems} problem{'s' * (problems != 1)}: {what} would not work")
    return lines
