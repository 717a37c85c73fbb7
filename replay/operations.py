"""What each `rabbit-replay` command does, as async functions over PostgreSQL and RabbitMQ (no printing)."""

import asyncio
import contextlib
import getpass
import hashlib
import json
import logging
import os
import secrets
import signal
import stat
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import quote

import asyncpg
import httpx

from rabbit_archive.archive import queries
from rabbit_archive.archive.db import CONNECTION_ERRORS, Connection
from rabbit_archive.archive.errors import (
    AccessRefused,
    ArchiveError,
    DatabaseUnavailable,
    UsageError,
    describe,
)
from rabbit_archive.archive.signals import on_signals, stop_on_signals
from rabbit_archive.config.settings import Settings, check_amqp_url, mask_url, url_vhost
from rabbit_archive.replay import coverage, history, selection
from rabbit_archive.replay.edits import HeaderEdits
from rabbit_archive.replay.filters import Filters
from rabbit_archive.replay.history import ReplayRecord, Target
from rabbit_archive.replay.publisher import Publisher
from rabbit_archive.replay.records import ExportFile, export_end_line, full_json, read_export_file
from rabbit_archive.replay.runner import Counts, Job, Progress, ReplayStopped, execute
from rabbit_archive.replay.selection import ArchivedMessage, Group
from rabbit_archive.replay.tagging import Tag

log = logging.getLogger(__name__)

SAMPLES = 5

# The table privileges each kind of command needs in schema rabbit_archive (plus USAGE on
# the schema); README.md, "Least privilege", lists them as GRANTs.
READ: tuple[tuple[str, str], ...] = (("SELECT", "messages"), ("SELECT", "schema_migrations"))
READ_HISTORY = (*READ, ("SELECT", "replays"))
WRITE_HISTORY = (*READ_HISTORY, ("INSERT", "replays"), ("UPDATE", "replays"))

GRANTS_HINT = "see 'Least privilege' in README.md for the GRANTs"


async def check_privileges(
    connection: "asyncpg.Connection[asyncpg.Record]", needs: tuple[tuple[str, str], ...]
) -> None:
    """AccessRefused naming every missing privilege, before anything is done (or published)."""
    rows = await connection.fetch(
        queries.MISSING_PRIVILEGES, [privilege for privilege, _ in needs], [table for _, table in needs]
    )
    if rows:
        user = await connection.fetchval(queries.CURRENT_USER)
        missing = ", ".join(dict.fromkeys(row[0] for row in rows))
        raise AccessRefused(f"PostgreSQL user {user!r} lacks {missing}: {GRANTS_HINT}")


@contextlib.asynccontextmanager
async def archive_connection(
    settings: Settings, needs: tuple[tuple[str, str], ...] = READ
) -> AsyncIterator["asyncpg.Connection[asyncpg.Record]"]:
    """A connection to the archive database with jsonb decoded, its schema and privileges checked."""
    url = settings.database_url
    try:
        connection = await asyncpg.connect(url)
    except asyncpg.InvalidCatalogNameError:
        raise DatabaseUnavailable(
            f"the archive database at {mask_url(url)} does not exist: check RABBIT_ARCHIVE_DATABASE_URL"
        ) from None
    except asyncpg.InvalidPasswordError:
        raise DatabaseUnavailable(f"PostgreSQL at {mask_url(url)} rejected the credentials") from None
    except asyncpg.InsufficientPrivilegeError as error:
        raise DatabaseUnavailable(f"PostgreSQL at {mask_url(url)} refused: {describe(error)}") from None
    except CONNECTION_ERRORS as error:
        raise DatabaseUnavailable(f"cannot reach PostgreSQL at {mask_url(url)}: {describe(error)}") from None
    try:
        await selection.setup_codecs(connection)
        await check_privileges(connection, needs)
        await history.check_schema(connection)
        yield connection
    except CONNECTION_ERRORS as error:
        raise DatabaseUnavailable(f"lost PostgreSQL at {mask_url(url)}: {describe(error)}") from None
    except asyncpg.InsufficientPrivilegeError as error:
        raise AccessRefused(
            f"PostgreSQL at {mask_url(url)} refused: {describe(error)}; {GRANTS_HINT}"
        ) from None
    finally:
        with contextlib.suppress(*CONNECTION_ERRORS):
            await connection.close(timeout=5)


async def find(settings: Settings, filters: Filters, limit: int | None) -> AsyncIterator[ArchivedMessage]:
    """The selected messages in archive-id order."""
    async with archive_connection(settings) as connection:
        async for message in selection.messages(connection, filters, limit=limit):
            yield message


async def export(settings: Settings, filters: Filters, target: TextIO) -> int:
    """Write the selected messages to target as JSON Lines, then the end marker; returns how many.

    The end marker (records.export_end_line) holds the count and the SHA-256 of the UTF-8
    lines before it, so that `run --from-file` refuses a file cut short or changed.
    SIGTERM stops it like Ctrl-C (ExportStopped), so that a file being written is removed.
    """
    task = asyncio.current_task()
    assert task is not None
    stopped: list[bool] = []

    def stop() -> None:
        stopped.append(True)
        task.cancel()

    written = 0
    digest = hashlib.sha256()
    try:
        with on_signals(stop, (signal.SIGTERM,)):
            async for message in find(settings, filters, None):
                line = json_line(full_json(message)) + "\n"
                target.write(line)
                digest.update(line.encode("utf-8"))
                written += 1
            target.write(export_end_line(written, digest.hexdigest()) + "\n")
    except asyncio.CancelledError:
        if not stopped:
            raise
        raise ExportStopped(f"export stopped by SIGTERM after {written} messages") from None
    return written


class ExportStopped(ArchiveError):
    """An export ended before its last message (SIGTERM)."""


class ExportFailed(ArchiveError):
    """Writing the export file failed midway (disk full, file too large, I/O error)."""


# The temporary file an export writes before it takes the --output name: in the same directory
# (so that the rename is atomic), hidden, and never a name anyone else uses (O_EXCL).
_PART_SUFFIX = ".part"


def _refuse_path(path: Path, *, force: bool) -> None:
    """UsageError when path may not become the export file (checked again at the end)."""
    try:
        found = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as error:
        raise UsageError(f"--output: cannot use {path}: {error.strerror or error}") from None
    if stat.S_ISLNK(found.st_mode):
        raise UsageError(f"--output: {path} is a symbolic link; give the path of a new file")
    if not stat.S_ISREG(found.st_mode):
        raise UsageError(f"--output: {path} exists and is not a regular file; give the path of a new file")
    if not force:
        raise UsageError(f"--output: {path} exists; pass --force to replace it, or choose another name")


def _create_part(path: Path) -> tuple[Path, int]:
    """A new private file beside path (mode 0600, O_EXCL, never through a symbolic link)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(100):
        part = path.with_name(f".{path.name}.{secrets.token_hex(6)}{_PART_SUFFIX}")
        try:
            fd = os.open(part, flags, 0o600)
        except FileExistsError:
            continue
        except OSError as error:
            raise UsageError(
                f"--output: cannot create a file in {path.parent}: {error.strerror or error}"
            ) from None
        os.fchmod(fd, 0o600)  # whatever the umask
        return part, fd
    raise UsageError(f"--output: cannot find a free temporary name in {path.parent}")


def _publish_part(part: Path, path: Path, *, force: bool) -> None:
    """Give the finished file its name: only now does path exist (or change)."""
    _refuse_path(path, force=force)
    if force:
        # A rename replaces whatever is at path (even a symbolic link created since the check)
        # and never writes through it.
        os.replace(part, path)
        return
    try:
        # A hard link fails if anything appeared at path meanwhile: no file is ever clobbered.
        os.link(part, path, follow_symlinks=False)
    except FileExistsError:
        raise UsageError(f"--output: {path} appeared during the export; pass --force to replace it") from None
    except OSError:
        # A file system without hard links: the check above, then a rename.
        os.replace(part, path)
    else:
        os.unlink(part)


@contextlib.contextmanager
def export_file(path: Path, *, force: bool = False) -> Iterator[TextIO]:
    """A text file that appears at path, mode 0600, only when the block succeeds.

    It is written under a temporary name in the same directory and renamed at the end; a
    symbolic link at path is refused (never followed), an existing file is replaced only with
    force, and a block that fails (an error, Ctrl-C, SIGTERM) leaves neither file behind.
    """
    _refuse_path(path, force=force)
    part, fd = _create_part(path)
    try:
        target = open(fd, "w", encoding="utf-8", newline="\n")  # noqa: SIM115 - closed below
        try:
            yield target
            target.flush()
            os.fsync(target.fileno())
        except OSError as error:
            raise ExportFailed(
                f"--output: writing {path} failed: {error.strerror or error}; no file was written"
            ) from None
        finally:
            # After a failed write, closing retries the flush and fails again: nothing to add.
            with contextlib.suppress(OSError):
                target.close()
        try:
            _publish_part(part, path, force=force)
        except OSError as error:
            raise ExportFailed(f"--output: cannot create {path}: {error.strerror or error}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(part)
        raise
    with contextlib.suppress(OSError):
        # The rename itself survives a crash only once the directory is on disk.
        directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


async def count(settings: Settings, filters: Filters) -> int:
    """How many messages the filters select."""
    async with archive_connection(settings) as connection:
        return await selection.count(connection, filters)


def unacknowledged_reader(settings: Settings, vhost: str) -> "Callable[[str], Awaitable[int | None]]":
    """Reads a queue's unacknowledged count from the management API (None when unavailable:
    the replay then counts ready messages only and says so once)."""
    warned: list[bool] = []

    async def read(queue: str) -> int | None:
        path = f"/api/queues/{quote(vhost, safe='')}/{quote(queue, safe='')}"
        for base in settings.management_bases:
            try:
                async with httpx.AsyncClient(auth=settings.management_auth, timeout=5) as client:
                    response = await client.get(base + path)
                if response.status_code == 200:
                    value = response.json().get("messages_unacknowledged")
                    return value if isinstance(value, int) else 0
            except (httpx.HTTPError, ValueError, AttributeError):
                continue
        if not warned:
            warned.append(True)
            log.warning(
                "unacknowledged_unknown",
                extra={
                    "queue": queue,
                    "effect": "--max-queue-depth counts ready messages only (no management API answer)",
                },
            )
        return None

    return read


NO_HISTORY = (
    "no coverage history to read (a schema older than version 6, or no SELECT on "
    "rabbit_archive.coverage_events: see 'Least privilege' in README.md)"
)


async def coverage_verdict(settings: Settings, filters: Filters) -> coverage.Verdict:
    """Whether the archive holds every message of the filters' window and exchanges (per
    exchange: captured intervals and gaps), from the daemon's coverage history."""
    async with archive_connection(settings) as connection:
        verdict = await _verdict(connection, filters, await connection.fetchval(queries.OLDEST_CAPTURE))
    if verdict is None:
        raise ArchiveError(NO_HISTORY)
    return verdict


async def _verdict(
    connection: Connection, filters: Filters, start: datetime | None
) -> coverage.Verdict | None:
    """The coverage verdict of the filters' exchanges, from --since (else `start`) until --until or
    now; None when there is no coverage history the user may read."""
    if not await connection.fetchval(queries.COVERAGE_EXISTS):
        return None
    now = await connection.fetchval(queries.NOW)
    begin = filters.since or start or now
    end = min(filters.until or now, now)
    rows = await connection.fetch(queries.COVERAGE_EVENTS, begin, end)
    events = [
        coverage.Event(row["at"], row["vhost"], row["exchange"], row["event"], row["reason"], row["messages"])
        for row in rows
    ]
    return coverage.coverage(events, begin, end, exchanges=filters.exchanges, vhosts=filters.vhosts)


async def show(settings: Settings, archive_id: int) -> ArchivedMessage:
    """One archived message."""
    async with archive_connection(settings) as connection:
        return await selection.message(connection, archive_id)


async def replays(settings: Settings) -> list[ReplayRecord]:
    """The replay history, oldest first."""
    async with archive_connection(settings, READ_HISTORY) as connection:
        return await history.all_replays(connection)


@dataclass(frozen=True)
class FollowerLag:
    """How far a follower (`run --follow`) is behind the archive."""

    name: str
    replay_id: str
    status: str
    lag_rows: int
    lag_seconds: float
    gaps: tuple[dict[str, Any], ...]

    def to_json(self) -> dict[str, Any]:
        """The `followers --json` object."""
        return {**asdict(self), "gaps": list(self.gaps)}


async def followers(settings: Settings) -> list[FollowerLag]:
    """Every follower with its lag: matching messages after its confirmed cursor, and the age of
    the oldest of them (0 when it is caught up)."""
    async with archive_connection(settings, READ_HISTORY) as connection:
        lags = []
        for record in await history.all_replays(connection):
            if record.follower is None:
                continue
            filters = Filters.from_json(record.filters)
            behind = replace(filters, from_id=max(filters.from_id or 0, record.confirmed_cursor + 1))
            rows = await selection.count(connection, behind)
            oldest = [message async for message in selection.messages(connection, behind, limit=1)]
            now = await connection.fetchval(queries.NOW)
            seconds = (now - oldest[0].captured_at).total_seconds() if oldest else 0.0
            lags.append(
                FollowerLag(
                    record.follower, record.id, record.status, rows, round(seconds, 3), record.follow_gaps
                )
            )
        return lags


@dataclass
class RunRequest:
    """What the operator asked `run` to do."""

    filters: Filters | None
    target: Target
    file: Path | None = None
    rate: float | None = None
    max_queue_depth: int | None = None
    reason: str | None = None
    operator: str | None = None
    new_message_id: bool = False
    dry_run: bool = False
    # Applied to each message's headers before the replay tags (`--set-header` and the like).
    edits: HeaderEdits = field(default_factory=HeaderEdits)
    # Another broker or vhost to publish into (`--target-url`, else REPLAY_TARGET_URL).
    target_url: str | None = None
    # Publish this many first, then check the target queue (`--canary`, `--canary-wait`).
    canary: int | None = None
    canary_wait: float = 60.0
    # Go on with messages archived later until stopped (`--follow`), under this unique name.
    follow: bool = False
    name: str | None = None
    # Refuse (exit 2, nothing published) unless exactly this many are selected.
    expect_count: int | None = None


@dataclass
class Preview:
    """The selection of a replay before it starts."""

    selected: int
    bytes: int
    groups: list[Group] = field(default_factory=list)
    samples: list[ArchivedMessage] = field(default_factory=list)
    vhost: str = ""
    coverage: "coverage.Verdict | None" = None
    from_file: bool = False


@dataclass
class Outcome:
    """How a replay ended."""

    replay_id: str
    selected: int
    counts: Counts
    returned_ids: list[int]


# Callbacks the CLI provides: ask for confirmation (with the count to type back, or None for
# yes/no), announce the replay id, show progress.
Confirm = Callable[[str, int | None], bool]
Announce = Callable[[str], None]


def operator_name(given: str | None) -> str:
    """--operator, else the login name."""
    if given:
        return given
    with contextlib.suppress(Exception):
        return getpass.getuser()
    return os.environ.get("USER", "unknown")


def check_expected_count(expected: int | None, selected: int) -> None:
    """UsageError (exit 2, before anything is published) when --expect-count disagrees."""
    if expected is not None and selected != expected:
        raise UsageError(
            f"--expect-count {expected}: the selection holds {selected} messages; nothing was published"
        )


def type_back(settings: Settings, count: int) -> int | None:
    """The count the operator must type back to confirm, or None when yes/no is enough."""
    return count if count > settings.replay_confirm_count_above else None


def _target_url(settings: Settings, given: str | None) -> str | None:
    """--target-url, else RABBIT_ARCHIVE_REPLAY_TARGET_URL, checked; None: publish through AMQP_URL."""
    if given is None:
        return settings.replay_target_url
    try:
        return check_amqp_url(given)
    except ValueError as error:
        raise UsageError(f"--target-url {error}") from None


def _resume_url(
    settings: Settings, replay_id: str, options: dict[str, Any], given: str | None
) -> tuple[str, str]:
    """The URL and vhost a resumed replay publishes to: where it started (the history keeps the
    target URL without its password, so the URL itself must be given again)."""
    stored = options.get("target_url")
    if not stored:
        if given is not None:
            raise UsageError(
                f"replay {replay_id} published through RABBIT_ARCHIVE_AMQP_URL: leave out --target-url"
            )
        vhost = options.get("vhost") or settings.amqp_vhost
        return (settings.amqp_url if vhost == settings.amqp_vhost else settings.amqp_url_for(vhost)), vhost
    url = _target_url(settings, given)
    if url is None:
        raise UsageError(
            f"replay {replay_id} published to {stored}: give that URL again with --target-url or "
            "RABBIT_ARCHIVE_REPLAY_TARGET_URL (the history does not keep passwords)"
        )
    if mask_url(url) != stored:
        raise UsageError(f"replay {replay_id} published to {stored}, not to {mask_url(url)}")
    return url, url_vhost(url)


def _publish_url(settings: Settings, request: RunRequest, preview: Preview) -> tuple[str, str]:
    """The AMQP URL and vhost to publish to."""
    vhosts = sorted({group.vhost for group in preview.groups})
    if request.target.queue is None and request.target.exchange is None and request.file is None:
        # Back to the original exchanges: they live in the vhost the messages came from.
        if len(vhosts) > 1:
            raise UsageError(
                f"the selection holds messages of vhosts {', '.join(map(repr, vhosts))}: "
                "replay one at a time with --vhost"
            )
        if vhosts and vhosts[0] != settings.amqp_vhost:
            return settings.amqp_url_for(vhosts[0]), vhosts[0]
    return settings.amqp_url, settings.amqp_vhost


@contextlib.contextmanager
def _checked_file(path: Path) -> Iterator[tuple[ExportFile, Path]]:
    """An export file checked whole, and a private copy of its message lines for the replay to read.

    The replay reads the copy (same line numbers), so what it publishes is exactly what was
    checked even if the file changes meanwhile; the copy is removed at the end.
    """
    try:
        fd, name = tempfile.mkstemp(prefix="rabbit-replay-", suffix=".jsonl")
    except OSError as error:
        raise ArchiveError(
            f"cannot create a temporary copy of {path}: {error.strerror or error}; "
            "set TMPDIR to a writable directory"
        ) from None
    copy = Path(name)
    try:
        with open(fd, "wb") as target:
            checked = read_export_file(path, target)
        yield checked, copy
    finally:
        with contextlib.suppress(OSError):
            copy.unlink()


async def _preview(
    connection: "asyncpg.Connection[asyncpg.Record]", request: RunRequest, checked: ExportFile | None = None
) -> Preview:
    if checked is not None:
        return Preview(
            selected=checked.messages,
            bytes=checked.bytes,
            groups=checked.groups,
            samples=checked.samples,
            from_file=True,
        )
    assert request.filters is not None
    groups = await selection.breakdown(connection, request.filters)
    samples = [m async for m in selection.messages(connection, request.filters, limit=SAMPLES)]
    # The coverage verdict of the selection's exchanges over its window (first message onwards):
    # nobody replays a slice with a hole in it without being told.
    exchanges = request.filters.exchanges or tuple(sorted({group.exchange for group in groups}))
    verdict = await _verdict(
        connection,
        replace(request.filters, exchanges=exchanges),
        samples[0].captured_at if samples else None,
    )
    return Preview(
        selected=sum(group.messages for group in groups),
        bytes=sum(group.bytes for group in groups),
        groups=groups,
        samples=samples,
        coverage=verdict,
    )


async def _check_target(publisher: Publisher, target: Target, groups: list[Group]) -> None:
    if target.queue is not None:
        await publisher.queue_depth(target.queue)
    elif target.exchange is not None:
        await publisher.check_exchange(target.exchange, "check --to-exchange")
    elif target.origin is not None:
        # Each message names its own queue or exchange: one that is gone returns it (counted).
        return
    else:
        for name in sorted({group.wire_exchange for group in groups}):
            await publisher.check_exchange(
                name, "declare it again, or replay with --to-exchange or --to-queue"
            )


async def _run_job(
    job: Job,
    connection: "asyncpg.Connection[asyncpg.Record]",
    publisher: Publisher,
    progress: Progress,
) -> Outcome:
    """Execute the job and record how it ended; errors are re-raised after recording.

    A replay that went to the end with messages nacked or returned ends 'incomplete' (the
    CLI exits 1 naming them; `resume` sends exactly those again).
    """
    stop = asyncio.Event()
    status, error_text = "completed", None
    try:
        with stop_on_signals(stop):
            await execute(job, connection=connection, publisher=publisher, stop=stop, progress=progress)
        if job.failed:
            kinds = list(job.failed.values())
            status = "incomplete"
            error_text = (
                f"{kinds.count('nacked')} nacked, {kinds.count('returned')} returned as unroutable: "
                f"'rabbit-replay resume {job.replay_id}' sends them again"
            )
    except ReplayStopped as error:
        status, error_text = "interrupted", str(error)
        raise
    except DatabaseUnavailable:
        status = ""  # the history cannot be written; the row reads 'interrupted' once the lock is gone
        raise
    except UsageError as error:
        status, error_text = "failed", str(error)
        raise
    except ArchiveError as error:
        if publisher.refused is not None:
            # A publish the broker refused (no write permission) surfaces as a lost channel.
            status, error_text = "failed", str(publisher.refused)
            raise AccessRefused(
                f"{publisher.refused}; once granted: rabbit-replay resume {job.replay_id}"
            ) from None
        status, error_text = "interrupted", str(error)
        raise
    except (asyncio.CancelledError, KeyboardInterrupt):
        status, error_text = "interrupted", "cancelled"
        raise
    except Exception as error:
        status, error_text = "failed", describe(error)
        raise
    finally:
        if status:
            with contextlib.suppress(*CONNECTION_ERRORS):
                await history.finish(connection, job.replay_id, status, error_text)
    return Outcome(job.replay_id, job.selected, job.counts, publisher.returned_ids)


async def run(
    settings: Settings,
    request: RunRequest,
    *,
    confirm: Confirm | None,
    announce: Announce,
    show_preview: Callable[[Preview], None],
    progress: Progress,
    notify: Callable[[str], None] = lambda _text: None,
) -> Outcome | None:
    """Start a replay (None for a dry run or an empty selection); notify shows the canary's result."""
    async with archive_connection(settings) as connection, contextlib.AsyncExitStack() as files:
        # A file is checked whole (end marker, count, digest) before anything else happens.
        checked, copy = files.enter_context(_checked_file(request.file)) if request.file else (None, None)
        filters = request.filters
        if filters is not None:
            filters = replace(filters, upto_id=await selection.watermark(connection))
            request.filters = filters
        preview = await _preview(connection, request, checked)
        url, vhost = _publish_url(settings, request, preview)
        target_url = _target_url(settings, request.target_url)
        if target_url is not None:
            url, vhost = target_url, url_vhost(target_url)
        preview.vhost = vhost
        show_preview(preview)
        check_expected_count(request.expect_count, preview.selected)
        # A follower with nothing to replay yet still starts: it waits for what comes.
        starts = bool(preview.selected) or request.follow
        if starts and not request.dry_run:
            await check_privileges(connection, WRITE_HISTORY)
            if request.name is not None and (other := await history.follower_named(connection, request.name)):
                raise UsageError(
                    f"a follower named {request.name!r} exists (replay {other}): "
                    f"continue it with 'rabbit-replay resume {other}', or choose another --name"
                )
        if not starts or request.dry_run:
            if not request.dry_run:
                publisher = Publisher(url, vhost, unacknowledged_reader(settings, vhost))
                await publisher.connect()
                try:
                    await _check_target(publisher, request.target, preview.groups)
                finally:
                    await publisher.close()
            return None
        publisher = Publisher(url, vhost, unacknowledged_reader(settings, vhost))
        await publisher.connect()
        try:
            await _check_target(publisher, request.target, preview.groups)
            if confirm is not None and not confirm(
                f"Replay {preview.selected} messages to {request.target.describe()} in vhost {vhost!r}?",
                type_back(settings, preview.selected),
            ):
                raise ReplayStopped("not confirmed; nothing was published")
            replay_id = str(uuid.uuid4())
            options = {
                "rate": request.rate,
                "max_queue_depth": request.max_queue_depth,
                "new_message_id": request.new_message_id,
                "edits": request.edits.to_json() if request.edits else None,
                "target_url": mask_url(target_url) if target_url is not None else None,
                "canary": request.canary,
                "canary_wait": request.canary_wait if request.canary else None,
                "vhost": vhost,
                "file": str(request.file.resolve()) if request.file else None,
                **({"follow": True, "name": request.name} if request.follow else {}),
            }
            await history.lock(connection, replay_id)
            await history.create(
                connection,
                replay_id,
                filters=filters.to_json()
                if filters is not None
                else {"file": options["file"], **(checked.identity() if checked else {})},
                target=request.target,
                options=options,
                operator=operator_name(request.operator),
                reason=request.reason,
                upto_id=filters.upto_id if filters is not None else None,
                selected=preview.selected,
            )
            announce(replay_id)
            job = Job(
                replay_id=replay_id,
                target=request.target,
                tag=Tag(replay_id, request.reason),
                selected=preview.selected,
                filters=filters,
                file=copy,
                rate=request.rate,
                max_queue_depth=request.max_queue_depth,
                new_message_id=request.new_message_id,
                edits=request.edits,
                follow=request.follow,
            )
            if request.canary:
                job.canary = request.canary
                job.canary_gate = await _canary_gate(
                    settings, connection, publisher, job, request, vhost, confirm=confirm, notify=notify
                )
            return await _run_job(job, connection, publisher, progress)
        finally:
            await publisher.close()


async def resume(
    settings: Settings,
    replay_id: str,
    *,
    rate: float | None,
    confirm: Confirm | None,
    announce: Announce,
    progress: Progress,
    target_url: str | None = None,
) -> Outcome:
    """Continue an interrupted replay after its confirmed cursor, with the same replay id."""
    async with (
        archive_connection(settings, WRITE_HISTORY) as connection,
        contextlib.AsyncExitStack() as files,
    ):
        # Lock first, then read: a record read before the lock could be one that another
        # process was still changing (its cursor, its counts).
        if not await history.lock(connection, replay_id):
            await history.get(connection, replay_id)  # an unknown id says so
            raise UsageError(f"replay {replay_id} is running in another process; stop that one first")
        record = await history.get(connection, replay_id)
        if record.status == "completed":
            raise UsageError(
                f"replay {replay_id} already completed; start a new one with 'rabbit-replay run'"
            )
        options = record.options
        target = Target.from_json(record.target)
        file = Path(options["file"]) if options.get("file") else None
        checked = None
        if file is not None:
            # The whole file again, and it must be the very file the replay started with.
            checked, file = files.enter_context(_checked_file(file))
            checked.check_same(record.filters, replay_id)
        filters = None if file else Filters.from_json({**record.filters, "upto_id": record.upto_id})
        url, vhost = _resume_url(settings, replay_id, options, target_url)
        publisher = Publisher(url, vhost, unacknowledged_reader(settings, vhost))
        await publisher.connect()
        try:
            groups = await selection.breakdown(connection, filters) if filters and not target.queue else []
            if checked is not None:
                groups = checked.groups
            await _check_target(publisher, target, groups)
            again = (
                f", first sending again the {len(record.failed_ids)} nacked or returned"
                if record.failed_ids
                else ""
            )
            position = record.confirmed_cursor if record.settled_cursor is None else record.settled_cursor
            if confirm is not None and not confirm(
                f"Resume replay {replay_id} to {target.describe()} after position {position}{again}?",
                type_back(settings, max(record.selected - record.confirmed, 0)),
            ):
                raise ReplayStopped("not confirmed; nothing was published")
            await history.restart(connection, replay_id)
            announce(replay_id)
            job = Job(
                replay_id=replay_id,
                target=target,
                tag=Tag(replay_id, record.reason),
                selected=record.selected,
                filters=filters,
                file=file,
                rate=rate if rate is not None else options.get("rate"),
                max_queue_depth=options.get("max_queue_depth"),
                new_message_id=bool(options.get("new_message_id")),
                edits=HeaderEdits.from_json(options.get("edits")),
                follow=bool(options.get("follow")),
                cursor=record.confirmed_cursor if record.settled_cursor is None else record.settled_cursor,
                confirmed_cursor=record.confirmed_cursor,
                failed=_failed_kinds(record),
                counts=Counts(
                    published=record.published,
                    confirmed=record.confirmed,
                    returned=record.returned,
                    nacked=record.nacked,
                    skipped=record.skipped,
                    without_death=record.without_death,
                ),
            )
            return await _run_job(job, connection, publisher, progress)
        finally:
            await publisher.close()


async def _queue_stats(settings: Settings, vhost: str, queue: str) -> dict[str, Any] | None:
    """The management API's view of a queue (consumers, unacknowledged, acks), None without an answer."""
    path = f"/api/queues/{quote(vhost, safe='')}/{quote(queue, safe='')}"
    for base in settings.management_bases:
        try:
            async with httpx.AsyncClient(auth=settings.management_auth, timeout=5) as client:
                response = await client.get(base + path)
            if response.status_code == 200:
                found = response.json()
                return found if isinstance(found, dict) else None
        except (httpx.HTTPError, ValueError):
            continue
    return None


def _acks(stats: dict[str, Any] | None) -> int | None:
    value = ((stats or {}).get("message_stats") or {}).get("ack")
    return value if isinstance(value, int) else None


async def _canary_gate(
    settings: Settings,
    connection: Connection,
    publisher: Publisher,
    job: Job,
    request: RunRequest,
    job_vhost: str,
    *,
    confirm: Confirm | None,
    notify: Callable[[str], None],
) -> Callable[[list[str]], Awaitable[None]]:
    """What happens once the canary is out: show the target queues, then ask, or (with --yes) wait
    up to --canary-wait for them to drain; a stop is ReplayStopped (interrupted, resumable)."""
    vhost = job_vhost
    start = {}
    if request.target.queue is not None:
        # Acknowledgements since the start need the count before it.
        start[request.target.queue] = _acks(await _queue_stats(settings, vhost, request.target.queue))
    size = request.canary or 0

    async def state(queue: str) -> tuple[int, int | None, str]:
        ready = await publisher.queue_depth(queue)
        stats = await _queue_stats(settings, vhost, queue)
        unacked = stats.get("messages_unacknowledged") if stats else None
        acks, before = _acks(stats), start.get(queue)
        parts = [f"{ready} ready", f"{unacked if unacked is not None else '?'} unacknowledged"]
        if stats is not None:
            parts.append(f"{stats.get('consumers', 0)} consumers")
        if acks is not None and before is not None:
            parts.append(f"{acks - before} acknowledged since the start")
        return ready, unacked if isinstance(unacked, int) else None, f"queue {queue!r}: {', '.join(parts)}"

    async def record(result: str) -> None:
        await history.merge_options(connection, job.replay_id, {"canary_result": result})

    async def gate(queues: list[str]) -> None:
        states = [await state(queue) for queue in queues]
        notify(f"canary: the first {size} are confirmed; " + "; ".join(text for _, _, text in states))
        if confirm is not None:
            if not await asyncio.to_thread(confirm, f"Go on with the other {job.selected - size}?", None):
                await record("stopped: not confirmed by the operator")
                raise ReplayStopped("canary: not confirmed by the operator")
            await record("confirmed by the operator")
            return
        waited = time.monotonic()
        while True:
            if all(ready == 0 and not unacked for ready, unacked, _ in states):
                seconds = time.monotonic() - waited
                await record(f"drained in {seconds:.1f} s")
                notify(f"canary: drained in {seconds:.1f} s; going on")
                return
            if time.monotonic() - waited >= request.canary_wait:
                left = "; ".join(text for _, _, text in states)
                await record(f"stopped: not drained within {request.canary_wait:g} s ({left})")
                raise ReplayStopped(
                    f"canary: the target did not drain the first {size} "
                    f"within {request.canary_wait:g} s ({left})"
                )
            await asyncio.sleep(0.5)
            states = [await state(queue) for queue in queues]

    return gate


def _failed_kinds(record: ReplayRecord) -> dict[int, str]:
    """The failed positions labelled so that sending them again takes each out of its count.

    The history keeps how many were returned and nacked, not which: the first `returned`
    are labelled returned, the others nacked; once all are sent again the counts are exact.
    """
    return {
        position: "returned" if index < record.returned else "nacked"
        for index, position in enumerate(record.failed_ids)
    }


def json_line(data: object) -> str:
    """One JSON object per line, UTF-8 kept readable."""
    return json.dumps(data, ensure_ascii=False)
