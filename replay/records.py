"""Archived messages as JSON: `find --json`, `show --json` and `export` lines, and reading them back."""

import base64
import binascii
import json
from datetime import datetime
from typing import Any

from archive.amqp_codec import CodecError, decode_properties, typed_entries
from archive.errors import UsageError
from replay.selection import ArchivedMessage


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


def from_export_line(line: str, where: str) -> ArchivedMessage:
    """A message from one `export` line; UsageError naming the file and line when it is not one."""
    try:
        data = json.loads(line)
        if not isinstance(data, dict):
            raise TypeError("not a JSON object")
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
        raise UsageError(
            f"{where}: missing {error.args[0]!r}; use a file written by 'rabbit-replay export'"
        ) from None
    except (ValueError, TypeError, RecursionError, binascii.Error, CodecError) as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UsageError(
            f"{where}: not an export line ({first_line}); use a file written by 'rabbit-replay export'"
        ) from None
