"""The `rabbit-replay` command: thin typer wrappers that parse, call one async operation and print."""

import asyncio
import io
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from rabbit_archive.archive.command_line import CommandLine
from rabbit_archive.archive.errors import ArchiveError, UsageError
from rabbit_archive.replay import operations, rendering
from rabbit_archive.replay.deaths import ORIGINS
from rabbit_archive.replay.edits import build_edits
from rabbit_archive.replay.filters import Filters, build_filters
from rabbit_archive.replay.history import Target
from rabbit_archive.replay.operations import Outcome, RunRequest, json_line
from rabbit_archive.replay.records import full_json, summary_json
from rabbit_archive.replay.runner import Progress
from rabbit_archive.replay.selection import ArchivedMessage

app = typer.Typer(
    name="rabbit-replay",
    help="Find, inspect and republish archived messages.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

COMMAND_LINE = CommandLine("rabbit-replay")
fail = COMMAND_LINE.fail
settings_or_exit = COMMAND_LINE.settings
run_async = COMMAND_LINE.run_async
FIND_TABLE_LIMIT = 100

# The FILTERS (README "Replaying"), declared once and shared by find, run, export and coverage.
ExchangeOpt = Annotated[
    list[str] | None, typer.Option("--exchange", metavar="TEXT", help="Exchange name (repeatable).")
]
RoutingKeyOpt = Annotated[
    str | None,
    typer.Option("--routing-key", metavar="TEXT", help="AMQP topic pattern: * one word, # zero or more."),
]
SinceOpt = Annotated[
    str | None, typer.Option("--since", metavar="TEXT", help="ISO 8601 (naive is UTC) or a duration: 15m.")
]
UntilOpt = Annotated[
    str | None, typer.Option("--until", metavar="TEXT", help="ISO 8601 or a duration back from now.")
]
FromIdOpt = Annotated[
    int | None, typer.Option("--from-id", metavar="INTEGER", help="First archive id (inclusive).")
]
ToIdOpt = Annotated[
    int | None, typer.Option("--to-id", metavar="INTEGER", help="Last archive id (inclusive).")
]
HeaderOpt = Annotated[
    list[str] | None, typer.Option("--header", metavar="TEXT", help="KEY=VALUE header match (repeatable).")
]
MessageIdOpt = Annotated[
    str | None, typer.Option("--message-id", metavar="TEXT", help="The message_id property.")
]
CorrelationIdOpt = Annotated[
    str | None, typer.Option("--correlation-id", metavar="TEXT", help="The correlation_id property.")
]
BodyContainsOpt = Annotated[
    str | None, typer.Option("--body-contains", metavar="TEXT", help="Literal text in the body.")
]
BodyJsonOpt = Annotated[
    list[str] | None,
    typer.Option("--body-json", metavar="TEXT", help="PATH=VALUE in JSON bodies, dotted path (repeatable)."),
]
VhostOpt = Annotated[
    list[str] | None, typer.Option("--vhost", metavar="TEXT", help="Captured in this vhost (repeatable).")
]
DeadLetteredFromOpt = Annotated[
    str | None,
    typer.Option(
        "--dead-lettered-from", metavar="QUEUE", help="Dead-lettered from this queue (latest x-death)."
    ),
]
DeathReasonOpt = Annotated[
    str | None,
    typer.Option(
        "--death-reason",
        metavar="REASON",
        help="Latest x-death reason: rejected, expired, maxlen or delivery_limit.",
    ),
]
IncludeReplaysOpt = Annotated[
    bool,
    typer.Option("--include-replays", metavar="", help="Also select messages that were themselves replays."),
]
JsonOpt = Annotated[bool, typer.Option("--json", metavar="", help="One JSON object per line.")]


# Command-line option name -> build_filters argument: the FILTERS every command shares.
_FILTER_OPTIONS = {
    "exchange": "exchanges",
    "routing_key": "routing_key",
    "since": "since",
    "until": "until",
    "from_id": "from_id",
    "to_id": "to_id",
    "header": "headers",
    "message_id": "message_id",
    "correlation_id": "correlation_id",
    "body_contains": "body_contains",
    "body_json": "body_json",
    "vhost": "vhosts",
    "include_replays": "include_replays",
    "dead_lettered_from": "dead_lettered_from",
    "death_reason": "death_reason",
}


def _filters(options: dict[str, Any]) -> Filters:
    """The Filters of a command's FILTERS options (its parameters), or exit 2 naming the bad one."""
    try:
        return build_filters(**{argument: options[option] for option, argument in _FILTER_OPTIONS.items()})
    except UsageError as error:
        fail(str(error), 2)


@app.command()
def find(
    exchange: ExchangeOpt = None,
    routing_key: RoutingKeyOpt = None,
    since: SinceOpt = None,
    until: UntilOpt = None,
    from_id: FromIdOpt = None,
    to_id: ToIdOpt = None,
    header: HeaderOpt = None,
    message_id: MessageIdOpt = None,
    correlation_id: CorrelationIdOpt = None,
    body_contains: BodyContainsOpt = None,
    body_json: BodyJsonOpt = None,
    vhost: VhostOpt = None,
    include_replays: IncludeReplaysOpt = False,
    dead_lettered_from: DeadLetteredFromOpt = None,
    death_reason: DeathReasonOpt = None,
    limit: Annotated[
        int | None,
        typer.Option(
            "--limit",
            metavar="INTEGER",
            min=0,
            help=f"At most N messages (table default {FIND_TABLE_LIMIT}; 0: all).",
        ),
    ] = None,
    as_json: JsonOpt = False,
    count: Annotated[
        bool, typer.Option("--count", metavar="", help="Print only the number of matching messages.")
    ] = False,
) -> None:
    """List archived messages that match the filters, oldest first."""
    filters = _filters(locals())
    settings = settings_or_exit()
    if count:
        print(run_async(lambda: operations.count(settings, filters)))
        return
    if as_json:
        # Scripts get every match unless they ask for fewer; rows stream page by page.
        wanted = limit or None

        async def stream() -> None:
            async for message in operations.find(settings, filters, wanted):
                print(json_line(summary_json(message)))

        run_async(stream)
        return
    wanted = FIND_TABLE_LIMIT if limit is None else (limit or None)

    async def collect() -> list[ArchivedMessage]:
        # One more than shown tells whether the table was cut.
        return [m async for m in operations.find(settings, filters, wanted + 1 if wanted else None)]

    found = run_async(collect)
    rendering.print_messages(found[:wanted] if wanted else found, cut=bool(wanted and len(found) > wanted))


@app.command()
def coverage(
    exchange: ExchangeOpt = None,
    routing_key: RoutingKeyOpt = None,
    since: SinceOpt = None,
    until: UntilOpt = None,
    from_id: FromIdOpt = None,
    to_id: ToIdOpt = None,
    header: HeaderOpt = None,
    message_id: MessageIdOpt = None,
    correlation_id: CorrelationIdOpt = None,
    body_contains: BodyContainsOpt = None,
    body_json: BodyJsonOpt = None,
    vhost: VhostOpt = None,
    include_replays: IncludeReplaysOpt = False,
    dead_lettered_from: DeadLetteredFromOpt = None,
    death_reason: DeathReasonOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Is the archive complete for the selection's window? Captured intervals and gaps per exchange.

    The window is --since..--until (default: the oldest archived message until now); the
    exchanges are the --exchange ones (default: every exchange the daemon recorded). Other
    filters do not change the verdict: a gap is per exchange.
    """
    filters = _filters(locals())
    settings = settings_or_exit()
    verdict = run_async(lambda: operations.coverage_verdict(settings, filters))
    if as_json:
        print(json_line(rendering.coverage_json(verdict)))
        return
    for line in rendering.coverage_lines(verdict):
        print(rendering.printable(line))


@app.command()
def show(
    archive_id: Annotated[str, typer.Argument(metavar="ID", help="Archive id.")],
    as_json: Annotated[bool, typer.Option("--json", metavar="", help="One JSON object.")] = False,
) -> None:
    """Show one archived message in full: properties, typed headers and body."""
    if not archive_id.isdigit():
        fail(f"ID: {archive_id!r} is not an archive id (a whole number, as 'find' lists)", 2)
    settings = settings_or_exit()
    message = run_async(lambda: operations.show(settings, int(archive_id)))
    if as_json:
        print(json_line(full_json(message)))
        return
    for line in rendering.describe_message(message):
        print(line)


@app.command()
def export(
    exchange: ExchangeOpt = None,
    routing_key: RoutingKeyOpt = None,
    since: SinceOpt = None,
    until: UntilOpt = None,
    from_id: FromIdOpt = None,
    to_id: ToIdOpt = None,
    header: HeaderOpt = None,
    message_id: MessageIdOpt = None,
    correlation_id: CorrelationIdOpt = None,
    body_contains: BodyContainsOpt = None,
    body_json: BodyJsonOpt = None,
    vhost: VhostOpt = None,
    include_replays: IncludeReplaysOpt = False,
    dead_lettered_from: DeadLetteredFromOpt = None,
    death_reason: DeathReasonOpt = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            metavar="FILE",
            help="Write to FILE (a new file, mode 0600) instead of standard output.",
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", metavar="", help="Replace FILE if it exists.")] = False,
) -> None:
    """Write matching messages as JSON Lines, byte for byte, for 'run --from-file' elsewhere."""
    filters = _filters(locals())
    if force and output is None:
        fail("--force replaces the --output file: give --output", 2)
    settings = settings_or_exit()
    if output is None:
        if isinstance(sys.stdout, io.TextIOWrapper):
            # The end marker's digest is of the UTF-8 lines, whatever the locale says.
            sys.stdout.reconfigure(encoding="utf-8")
        try:
            run_async(lambda: operations.export(settings, filters, sys.stdout))
        except OSError as error:
            fail(f"writing to standard output failed: {error.strerror or error}", 1)
        return
    try:
        # Checked before the query runs; the file appears only once every message is written.
        with operations.export_file(output, force=force) as target:
            written = run_async(lambda: operations.export(settings, filters, target))
    except ArchiveError as error:
        fail(str(error), error.exit_code)
    print(f"exported {written} messages to {output}", file=sys.stderr)


def _progress() -> Progress:
    return rendering.TerminalProgress() if sys.stderr.isatty() else Progress()


def _confirm(yes: bool) -> Callable[[str, int | None], bool] | None:
    if yes:
        return None

    def ask(question: str, type_back: int | None) -> bool:
        if not sys.stdin.isatty():
            raise UsageError("a replay publishes to the broker: pass --yes (no terminal to confirm on)")
        if type_back is None:
            return typer.confirm(question, default=False)
        # A big replay is confirmed by its size, not by a reflex 'y'.
        answer = typer.prompt(
            f"{question} Type the number of messages ({type_back}) to go on",
            default="",
            show_default=False,
        )
        return str(answer).strip() == str(type_back)

    return ask


def _announce(replay_id: str) -> None:
    print(replay_id, flush=True)


def _finish(outcome: Outcome | None) -> None:
    if outcome is None:
        return
    print(rendering.summary_line(outcome))
    problems = rendering.problems(outcome.counts)
    if problems:
        fail(f"replay {outcome.replay_id} incomplete: {', '.join(problems)}", 1)


def _interrupted_hint(replay_id_holder: list[str], error: ArchiveError) -> str:
    if replay_id_holder:
        return f"{error}; resume with 'rabbit-replay resume {replay_id_holder[0]}'"
    return str(error)


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:  # not built for this platform: asyncio's own loop works too
        return None
    return uvloop.new_event_loop


def _run_replay(factory: Callable[[Callable[[str], None]], Awaitable[Outcome | None]]) -> None:
    started: list[str] = []

    def announce(replay_id: str) -> None:
        started.append(replay_id)
        _announce(replay_id)

    async def main() -> Outcome | None:
        return await factory(announce)

    try:
        # uvloop roughly halves the event loop's cost per publish (the replay's bottleneck).
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            outcome = runner.run(main())
    except UsageError as error:
        fail(str(error), error.exit_code)
    except ArchiveError as error:
        fail(_interrupted_hint(started, error), error.exit_code)
    except KeyboardInterrupt:
        fail("interrupted", 130)
    _finish(outcome)


@app.command()
def run(
    exchange: ExchangeOpt = None,
    routing_key: RoutingKeyOpt = None,
    since: SinceOpt = None,
    until: UntilOpt = None,
    from_id: FromIdOpt = None,
    to_id: ToIdOpt = None,
    header: HeaderOpt = None,
    message_id: MessageIdOpt = None,
    correlation_id: CorrelationIdOpt = None,
    body_contains: BodyContainsOpt = None,
    body_json: BodyJsonOpt = None,
    vhost: VhostOpt = None,
    include_replays: IncludeReplaysOpt = False,
    dead_lettered_from: DeadLetteredFromOpt = None,
    death_reason: DeathReasonOpt = None,
    select_all: Annotated[
        bool, typer.Option("--all", metavar="", help="Replay the whole archive (no filter).")
    ] = False,
    to_exchange: Annotated[
        str | None,
        typer.Option(
            "--to-exchange", metavar="TEXT", help="Publish to this exchange, original routing keys."
        ),
    ] = None,
    to_queue: Annotated[
        str | None,
        typer.Option(
            "--to-queue", metavar="TEXT", help="Publish straight into this queue (default exchange)."
        ),
    ] = None,
    rate: Annotated[
        float | None, typer.Option("--rate", metavar="NUMBER", min=0.001, help="Messages per second.")
    ] = None,
    max_queue_depth: Annotated[
        int | None,
        typer.Option(
            "--max-queue-depth",
            metavar="INTEGER",
            min=0,
            help=(
                "Pause while the --to-queue holds more than N messages, ready plus delivered and not yet"
                " acknowledged (the latter from the management API, when it answers). 0 and 1 both"
                " mean one message at a time, each once the queue is empty."
            ),
        ),
    ] = None,
    reason: Annotated[
        str | None, typer.Option("--reason", metavar="TEXT", help="Why; kept in history and x-replay-reason.")
    ] = None,
    operator: Annotated[
        str | None, typer.Option("--operator", metavar="TEXT", help="Who (default: the login name).")
    ] = None,
    new_message_id: Annotated[
        bool,
        typer.Option(
            "--new-message-id", metavar="", help="Fresh message ids; the old one goes in x-replay-of."
        ),
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", metavar="", help="Show what would be replayed; publish nothing.")
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", metavar="", help="Do not ask for confirmation.")] = False,
    from_file: Annotated[
        Path | None,
        typer.Option("--from-file", metavar="FILE", help="Republish the messages of an 'export' file."),
    ] = None,
    to_origin: Annotated[
        str | None,
        typer.Option(
            "--to-origin",
            metavar="[=exchange]",
            help="Each message back into the queue it died in (default exchange), or with =exchange"
            " to the exchange and routing key it was first published with, from its x-death.",
        ),
    ] = None,
    routing_key_to: Annotated[
        str | None,
        typer.Option("--routing-key-to", metavar="KEY", help="Publish every message with this routing key."),
    ] = None,
    set_header: Annotated[
        list[str] | None,
        typer.Option("--set-header", metavar="KEY=VALUE", help="Set a header to a long string (repeatable)."),
    ] = None,
    set_header_json: Annotated[
        list[str] | None,
        typer.Option(
            "--set-header-json",
            metavar="KEY=JSON",
            help='Set a typed header: {"type": "int32", "value": 5} as show --json writes, or plain JSON.',
        ),
    ] = None,
    unset_header: Annotated[
        list[str] | None, typer.Option("--unset-header", metavar="KEY", help="Remove a header (repeatable).")
    ] = None,
    target_url: Annotated[
        str | None,
        typer.Option(
            "--target-url",
            metavar="AMQP_URL",
            help="Publish into this broker or vhost (or RABBIT_ARCHIVE_REPLAY_TARGET_URL, "
            "which keeps the password out of the process list).",
        ),
    ] = None,
    canary: Annotated[
        int | None,
        typer.Option(
            "--canary",
            metavar="N",
            min=1,
            help="Publish N first, show the target queue, then ask (--yes: go on only if it drained).",
        ),
    ] = None,
    canary_wait: Annotated[
        float | None,
        typer.Option(
            "--canary-wait", metavar="SECONDS", min=0, help="With --yes: how long the canary may take (60)."
        ),
    ] = None,
    expect_count: Annotated[
        int | None,
        typer.Option(
            "--expect-count",
            metavar="INTEGER",
            min=0,
            help="Refuse (exit 2, publish nothing) unless exactly N messages are selected.",
        ),
    ] = None,
    follow: Annotated[
        bool,
        typer.Option(
            "--follow",
            metavar="",
            help="Then keep replaying matching messages archived later, until stopped (resume continues).",
        ),
    ] = False,
    name: Annotated[
        str | None, typer.Option("--name", metavar="TEXT", help="A unique name for the --follow replay.")
    ] = None,
) -> None:
    """Republish archived messages, tagged as a replay, with confirms and a resumable cursor."""
    filters = _filters(locals())
    if name is not None and not follow:
        fail("--name names a follower: add --follow", 2)
    if name is not None and (not name.strip() or not name.isprintable()):
        fail("--name: give printable text", 2)
    if follow and from_file is not None:
        fail("--follow follows the archive: leave out --from-file", 2)
    if follow and include_replays:
        fail("--follow never replays replays (it would loop): leave out --include-replays", 2)
    if sum(given is not None for given in (to_exchange, to_queue, to_origin)) > 1:
        fail("give one of --to-exchange, --to-queue and --to-origin", 2)
    if to_origin is not None and to_origin not in ORIGINS:
        fail(f"--to-origin: {to_origin!r} is not one of {', '.join(ORIGINS)} (bare --to-origin: queue)", 2)
    if routing_key_to is not None and (to_queue is not None or to_origin is not None):
        fail("--routing-key-to sets the key of exchange publishes: leave out --to-queue and --to-origin", 2)
    if canary is not None and to_queue is None and to_origin != "queue":
        fail("--canary watches the target queue: give --to-queue or --to-origin", 2)
    if canary_wait is not None and canary is None:
        fail("--canary-wait is how long --canary waits: give --canary", 2)
    if routing_key_to is not None and len(routing_key_to.encode("utf-8", "surrogateescape")) > 255:
        fail("--routing-key-to: a routing key holds at most 255 bytes", 2)
    if from_file is not None:
        if not filters.selects_everything() or select_all:
            fail("--from-file replays the whole file: leave out filters and --all", 2)
    elif filters.selects_everything() and not select_all:
        fail(
            "no filter given: add filters (see 'rabbit-replay run --help') or --all for the whole archive", 2
        )
    if max_queue_depth is not None and to_queue is None:
        fail("--max-queue-depth watches the --to-queue queue: give --to-queue", 2)
    if reason is not None and "\x00" in reason:
        fail("--reason: leave out NUL characters", 2)
    settings = settings_or_exit()
    target = Target(queue=to_queue, exchange=to_exchange, origin=to_origin, routing_key=routing_key_to)
    try:
        edits = build_edits(set_header, set_header_json, unset_header)
    except UsageError as error:
        fail(str(error), 2)
    changes = rendering.change_lines(
        edits,
        new_message_id=new_message_id,
        canary=canary,
        canary_wait=request_canary_wait(canary_wait),
        yes=yes,
    )
    request = RunRequest(
        filters=None if from_file else filters,
        target=target,
        file=from_file,
        rate=rate,
        max_queue_depth=max_queue_depth,
        reason=reason,
        operator=operator,
        new_message_id=new_message_id,
        dry_run=dry_run,
        expect_count=expect_count,
        edits=edits,
        canary=canary,
        canary_wait=request_canary_wait(canary_wait),
        target_url=target_url,
        follow=follow,
        name=name,
    )
    _run_replay(
        lambda announce: operations.run(
            settings,
            request,
            confirm=_confirm(yes),
            announce=announce,
            show_preview=lambda preview: rendering.print_preview(preview, target, dry_run, changes),
            progress=_progress(),
            notify=lambda text: print(rendering.printable(text), file=sys.stderr, flush=True),
        )
    )


def request_canary_wait(canary_wait: float | None) -> float:
    """--canary-wait, 60 s when not given."""
    return 60.0 if canary_wait is None else canary_wait


@app.command()
def resume(
    replay_id: Annotated[str, typer.Argument(metavar="REPLAY_ID", help="As 'history' lists it.")],
    rate: Annotated[
        float | None, typer.Option("--rate", metavar="NUMBER", min=0.001, help="Messages per second.")
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", metavar="", help="Do not ask for confirmation.")] = False,
    target_url: Annotated[
        str | None,
        typer.Option(
            "--target-url",
            metavar="AMQP_URL",
            help="The replay's --target-url again (the history keeps it without the password).",
        ),
    ] = None,
) -> None:
    """Continue an interrupted replay after its last confirmed message, with the same replay id."""
    if "\x00" in replay_id:
        fail("REPLAY_ID: not a replay id", 2)
    settings = settings_or_exit()
    _run_replay(
        lambda announce: operations.resume(
            settings,
            replay_id,
            rate=rate,
            confirm=_confirm(yes),
            announce=announce,
            progress=_progress(),
            target_url=target_url,
        )
    )


@app.command()
def history(as_json: JsonOpt = False) -> None:
    """List past replays with their filters, counts and status."""
    settings = settings_or_exit()
    records = run_async(lambda: operations.replays(settings))
    lags = (
        {lag.replay_id: lag for lag in run_async(lambda: operations.followers(settings))}
        if any(record.follower for record in records)
        else {}
    )
    if as_json:
        for record in records:
            lag = lags.get(record.id)
            lagging = {"lag_rows": lag.lag_rows, "lag_seconds": lag.lag_seconds} if lag else {}
            print(json_line({**record.to_json(), **lagging}))
        return
    rendering.print_history(records, lags)


@app.command()
def followers(as_json: JsonOpt = False) -> None:
    """List the followers (run --follow) with how far each is behind the archive."""
    settings = settings_or_exit()
    lags = run_async(lambda: operations.followers(settings))
    if as_json:
        for lag in lags:
            print(json_line(lag.to_json()))
        return
    rendering.print_followers(lags)


@app.command()
def check(
    to_exchange: Annotated[
        str | None, typer.Option("--to-exchange", metavar="TEXT", help="Check publishing to this exchange.")
    ] = None,
    to_queue: Annotated[
        str | None,
        typer.Option(
            "--to-queue", metavar="TEXT", help="Check publishing into this queue (default exchange)."
        ),
    ] = None,
    exchange: ExchangeOpt = None,
    target_url: Annotated[
        str | None,
        typer.Option(
            "--target-url", metavar="TEXT", help="Broker and vhost to publish to (default AMQP_URL)."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", metavar="", help="One JSON object.")] = False,
) -> None:
    """Check, changing nothing, that a replay could run: archive privileges, target, write rights.

    Without --exchange, --to-exchange or --to-queue, the exchanges archived from the target vhost
    over the last day are checked. Exits 0 when a replay would work, 1 otherwise.
    """
    from rabbit_archive.archive.checks import report_lines
    from rabbit_archive.replay.preflight import Targets
    from rabbit_archive.replay.preflight import check as run_check

    settings = settings_or_exit()
    targets = Targets(to_exchange, to_queue, tuple(exchange or ()), target_url)
    report = run_async(lambda: run_check(settings, targets))
    if as_json:
        print(json.dumps(report.as_json()))
    else:
        for line in report_lines(report, "a replay"):
            print(line)
    if not report.ok:
        fail(f"{len(report.problems)} problem(s) found: fix them as listed and run the check again", 1)


@app.command()
def web(
    host: Annotated[
        str | None,
        typer.Option(
            "--host",
            metavar="TEXT",
            help="Address to listen on (default RABBIT_ARCHIVE_WEB_HOST, 127.0.0.1); "
            "any other than loopback needs RABBIT_ARCHIVE_WEB_TOKEN.",
        ),
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(
            "--port",
            metavar="INTEGER",
            min=0,
            max=65535,
            help="Port (default RABBIT_ARCHIVE_WEB_PORT, 9188; 0 picks a free one).",
        ),
    ] = None,
) -> None:
    """Serve the read-only web console: search, traffic chart, messages, replay history, previews."""
    # Imported here: the web stack loads only for this command.
    from rabbit_archive.replay.web import server

    settings = settings_or_exit()
    run_async(lambda: server.serve(settings, host, port))


def optional_value(args: list[str], option: str, default: str, values: tuple[str, ...]) -> list[str]:
    """The arguments with a bare `option` (no value of `values` after it) read as `option=default`.

    Click options take a value or none, never either: `--to-origin` alone and
    `--to-origin=exchange` are both the contract.
    """
    out: list[str] = []
    for index, arg in enumerate(args):
        if arg == "--":
            return out + args[index:]
        following = args[index + 1] if index + 1 < len(args) else None
        out.append(f"{option}={default}" if arg == option and following not in values else arg)
    return out


def main() -> None:
    """Entry point of `rabbit-replay`."""
    sys.argv[1:] = optional_value(sys.argv[1:], "--to-origin", "queue", ORIGINS)
    COMMAND_LINE.main(app)
