"""Archived messages as JSON: `find --json`, `show --json` and `export` lines, and reading them back.

An export file is JSON Lines of full messages ended by one end-marker line that holds the
number of messages and the SHA-256 of every byte before it, so that a file cut short (even
at a line boundary) or changed is refused before anything is published.
"""

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from rabbit_archive.archive.amqp_codec import CodecError, decode_properties, typed_entries
from rabbit_archive.archive.errors import ArchiveError, UsageError
from rabbit_archive.replay.selection import ArchivedMessage, Group

# The key of the end-marker line; no message line has it.
EXPORT_END = "rabbit_archive_export_end"
_EXPORT_HINT = "use a file written by 'rabbit-replay export'"
# Distinct vhost/exchange/routing-key groups a file's preview keeps; later keys are lumped.
_MAX_GROUPS = 10_000
_OTHER_KEYS = "(other routing keys)"
_SAMPLES = 5


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def summary_json(message: ArchivedMessage) -> dict[str, Any]:
    """The `find --json` object."""
    return {
        "id": message.id,
        "captured_at": message.captured_at.isoformat(),
        "vhost": message.vhost,
        "exchange": message.exchange,
        "routing_key": message.routing_key,
        "properties": message.properties,
        "headers": message.headers if message.headers is not None else {},
        "body_size": message.body_size,
        "redelivered": message.redelivered,
        "replay_id": message.replay_id,
    }


def headers_typed(message: ArchivedMessage) -> list[dict[str, Any]]:
    """Each header with its AMQP type, nested tables and arrays alike."""
    try:
        props = decode_properties(message.properties_raw)
    except CodecError:
        return []
    return typed_entries(props.headers or [])


def full_json(message: ArchivedMessage) -> dict[str, Any]:
    """The `show --json` and `export` object: enough to republish the message byte for byte."""
    data = summary_json(message)
    data["headers_typed"] = headers_typed(message)
    data["body_base64"] = _b64(message.body)
    data["properties_raw_base64"] = _b64(message.properties_raw)
    if message.exchange_raw is not None:
        data["exchange_raw_base64"] = _b64(message.exchange_raw)
    if message.routing_key_raw is not None:
        data["routing_key_raw_base64"] = _b64(message.routing_key_raw)
    return data


def export_end_line(count: int, sha256: str) -> str:
    """The last line of an export: how many messages, and the digest of every byte before it."""
    return json.dumps({EXPORT_END: True, "count": count, "sha256": sha256})


def from_export_line(line: str, where: str) -> ArchivedMessage:
    """A message from one `export` line; UsageError naming the file and line when it is not one."""
    return _message(_object(line, where), where)


def _object(line: str, where: str) -> dict[str, Any]:
    try:
        data = json.loads(line)
    except (ValueError, RecursionError) as error:
        raise _not_a_line(where, error) from None
    if not isinstance(data, dict):
        raise _not_a_line(where, TypeError("not a JSON object"))
    return data


def _not_a_line(where: str, error: BaseException) -> UsageError:
    first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
    return UsageError(f"{where}: not an export line ({first_line}); {_EXPORT_HINT}")


def _message(data: dict[str, Any], where: str) -> ArchivedMessage:
    try:
        properties_raw = base64.b64decode(data["properties_raw_base64"], validate=True)
        body = base64.b64decode(data["body_base64"], validate=True)
        decode_properties(properties_raw)
        raw_names = {
            key: base64.b64decode(data[f"{key}_base64"], validate=True) if data.get(f"{key}_base64") else None
            for key in ("exchange_raw", "routing_key_raw")
        }
        return ArchivedMessage(
            id=int(data["id"]),
            captured_at=datetime.fromisoformat(data["captured_at"]),
            vhost=str(data.get("vhost", "")),
            exchange=str(data["exchange"]),
            routing_key=str(data["routing_key"]),
            exchange_raw=raw_names["exchange_raw"],
            routing_key_raw=raw_names["routing_key_raw"],
            redelivered=bool(data.get("redelivered", False)),
            properties_raw=properties_raw,
            properties=data.get("properties") or {},
            headers=data.get("headers"),
            body=body,
            body_size=len(body),
            replay_id=data.get("replay_id"),
        )
    except KeyError as error:
        raise UsageError(f"{where}: missing {error.args[0]!r}; {_EXPORT_HINT}") from None
    except (ValueError, TypeError, RecursionError, binascii.Error, CodecError) as error:
        raise _not_a_line(where, error) from None


@dataclass
class ExportFile:
    """An export file checked whole: its messages, their breakdown, and the file's own size and digest."""

    path: Path
    messages: int = 0
    bytes: int = 0
    size: int = 0
    sha256: str = ""
    groups: list[Group] = field(default_factory=list)
    samples: list[ArchivedMessage] = field(default_factory=list)

    def identity(self) -> dict[str, Any]:
        """What a replay records to recognise the file on resume."""
        return {"size": self.size, "sha256": self.sha256, "messages": self.messages}

    def check_same(self, recorded: dict[str, Any], replay_id: str) -> None:
        """UsageError unless this is the very file the replay recorded."""
        if not recorded.get("sha256"):
            raise UsageError(
                f"replay {replay_id} recorded no digest of {self.path}, so the file cannot be checked: "
                "start a new replay with 'rabbit-replay run --from-file'"
            )
        if (recorded.get("size"), recorded.get("sha256")) != (self.size, self.sha256):
            raise UsageError(
                f"{self.path} changed since replay {replay_id} started (size {recorded.get('size')} -> "
                f"{self.size} bytes, different SHA-256): restore that file to resume, or start a new "
                "replay with 'rabbit-replay run --from-file'"
            )


def _copy_line(copy: IO[bytes], raw: bytes) -> None:
    try:
        copy.write(raw)
    except OSError as error:
        raise ArchiveError(
            f"cannot copy the file to check it: {error.strerror or error}; "
            "set TMPDIR to a directory with room"
        ) from None


def read_export_file(path: Path, copy: IO[bytes] | None = None) -> ExportFile:
    """Check every line of an export file and its end marker; UsageError (one line) when anything is off.

    The message lines (everything before the end marker) are written to copy as they are
    checked, so that a replay can read exactly what was checked.
    """
    found = ExportFile(path)
    whole = hashlib.sha256()
    body = hashlib.sha256()
    groups: dict[tuple[str, str, bytes | None, str], list[int]] = {}
    end: dict[str, Any] | None = None
    end_line = 0
    try:
        with path.open("rb") as source:
            for number, raw in enumerate(source, start=1):
                whole.update(raw)
                found.size += len(raw)
                where = f"{path}:{number}"
                if end is not None:
                    raise UsageError(
                        f"{where}: text after the end marker of line {end_line} (one export per file); "
                        + _EXPORT_HINT
                    )
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise UsageError(f"{where}: not UTF-8 text; {_EXPORT_HINT}") from None
                if text.strip():
                    data = _object(text, where)
                    if EXPORT_END in data:
                        end, end_line = data, number
                        continue
                    message = _message(data, where)
                    found.messages += 1
                    found.bytes += message.body_size
                    if len(found.samples) < _SAMPLES:
                        found.samples.append(message)
                    key = (message.vhost, message.exchange, message.exchange_raw, message.routing_key)
                    if key not in groups and len(groups) >= _MAX_GROUPS:
                        key = (*key[:3], _OTHER_KEYS)
                    tally = groups.setdefault(key, [0, 0])
                    tally[0] += 1
                    tally[1] += message.body_size
                body.update(raw)
                if copy is not None:
                    _copy_line(copy, raw)
    except OSError as error:
        raise UsageError(f"cannot read {path}: {error.strerror or error}") from None
    found.sha256 = whole.hexdigest()
    if end is None:
        raise UsageError(
            f"{path} has no end marker after its {found.messages} messages: it was cut short (an export "
            "or a copy that did not finish) or not written by 'rabbit-replay export'; export it again"
        )
    if end.get("count") != found.messages:
        raise UsageError(
            f"{path}:{end_line}: the end marker counts {end.get('count')!r} messages but the file holds "
            f"{found.messages}: lines were lost or added; export it again"
        )
    if end.get("sha256") != body.hexdigest():
        raise UsageError(
            f"{path}:{end_line}: the file's content does not match the SHA-256 in its end marker: "
            "it was changed after the export; export it again"
        )
    found.groups = sorted(
        (
            Group(vhost, exchange, routing_key, tally[0], tally[1], exchange_raw)
            for (vhost, exchange, exchange_raw, routing_key), tally in groups.items()
        ),
        key=lambda group: (-group.messages, group.vhost, group.exchange, group.routing_key),
    )
    return found
