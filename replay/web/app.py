"""The web console's HTTP side: one handler per page, the token guard and the security headers.

Every page reads through the same code as the commands (replay/selection.py, history.py,
operations.py) on pooled connections whose every statement has a timeout and whose
transactions are read-only (server.py sets both in the connection URL). Templates escape every
value; the Content-Security-Policy allows only this console's own script and style files.
"""

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, quote

import asyncpg
from jinja2 import Environment, PackageLoader, StrictUndefined
from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rabbit_archive.archive import queries
from rabbit_archive.archive.db import DATABASE_ERRORS, Connection, database_error
from rabbit_archive.archive.errors import ArchiveError, DatabaseRefused, UsageError
from rabbit_archive.config.settings import Settings, mask_url
from rabbit_archive.replay import history, operations, selection
from rabbit_archive.replay.filters import Filters, where_clause
from rabbit_archive.replay.history import Target
from rabbit_archive.replay.records import headers_typed
from rabbit_archive.replay.rendering import coverage_lines, printable
from rabbit_archive.replay.web import auth, views

log = logging.getLogger("rabbit_archive.web")

# Rows per results page, and samples in the preview.
PAGE = 50
SAMPLES = 5
HISTORY_SHOWN = 500
# A body download is read in slices of this size, so a 64 MB body is never held whole.
BODY_SLICE = 1024 * 1024
LOGIN_BODY_BYTES = 16 * 1024

# Nothing but this console's own files may run or style a page: a value that escaped the
# templates' escaping still could not execute.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = (
    ("content-security-policy", CSP),
    ("x-content-type-options", "nosniff"),
    ("x-frame-options", "DENY"),
    ("referrer-policy", "no-referrer"),
    ("cross-origin-opener-policy", "same-origin"),
    ("cross-origin-resource-policy", "same-origin"),
    # Archived messages stay out of browser and proxy caches.
    ("cache-control", "no-store"),
)
# The filters templates/_filters.html lays out by hand.
FORM_LAYOUT = frozenset(
    {
        "exchange",
        "routing_key",
        "since",
        "until",
        "header",
        "message_id",
        "correlation_id",
        "body_contains",
        "body_json",
        "vhost",
        "from_id",
        "to_id",
        "include_replays",
    }
)
# Reachable without the token: probes, the login form and its style sheet.
OPEN_PATHS = ("/healthz", "/login", "/static/")

TEMPLATES = Environment(
    loader=PackageLoader("rabbit_archive.replay.web", "templates"),
    autoescape=True,
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


class NotFound(UsageError):
    """No archived message or replay has that id."""


class SlowQuery(DatabaseRefused):
    """A statement ran into the console's statement timeout."""


@dataclass
class Console:
    """What every handler needs: the console's settings, its pool and its token."""

    settings: Settings
    pool: "asyncpg.Pool[asyncpg.Record]"

    configured_url: str = ""

    def shown(self, error: BaseException) -> str:
        """An error's text with DATABASE_URL as configured, not with the console's startup parameters."""
        text = str(error)
        if self.configured_url:
            text = text.replace(mask_url(self.settings.database_url), mask_url(self.configured_url))
        return text

    @property
    def token(self) -> str | None:
        """RABBIT_ARCHIVE_WEB_TOKEN, or None: loopback only."""
        return self.settings.web_token

    @contextlib.asynccontextmanager
    async def connection(self, doing: str) -> AsyncIterator[Connection]:
        """A pooled connection; driver errors become the project's errors, naming what was being done."""
        try:
            async with self.pool.acquire(timeout=10) as connection:
                yield connection
        except asyncpg.QueryCanceledError:
            raise SlowQuery(
                f"{doing} took longer than {self.settings.web_statement_timeout:g} s "
                "(RABBIT_ARCHIVE_WEB_STATEMENT_TIMEOUT): narrow the search with a time window "
                "(since, until) or an exchange"
            ) from None
        except DATABASE_ERRORS as error:
            raise database_error(error, doing) from None


def page(name: str, status: int = 200, **context: Any) -> HTMLResponse:
    """A rendered template."""
    return HTMLResponse(TEMPLATES.get_template(name).render(**context), status_code=status)


def _pairs(request: Request) -> list[tuple[str, str]]:
    return list(request.query_params.multi_items())


def _form(pairs: views.Pairs) -> dict[str, Any]:
    """The search form's values: every value given, and one empty field more for repeatable ones."""
    values: dict[str, Any] = {}
    for name in views.FILTER_NAMES:
        given = [value for key, value in pairs if key == name and value != ""]
        if name in views.REPEATABLE:
            values[name] = [*given, ""]
        elif name in views.FLAGS:
            values[name] = views.flag(given)
        else:
            values[name] = given[-1] if given else ""
    return values


def _query(pairs: views.Pairs, **changes: str | None) -> str:
    """The query string with some parameters replaced (None: removed)."""
    kept = [(key, value) for key, value in pairs if key not in changes and value != ""]
    kept += [(key, value) for key, value in changes.items() if value is not None]
    return views.query_string(kept)


class Pages:
    """The console's handlers."""

    def __init__(self, console: Console) -> None:
        self.console = console

    def _context(self, request: Request, **context: Any) -> dict[str, Any]:
        return {
            "guarded": self.console.token is not None,
            "path": request.url.path,
            # Filters the form does not lay out by hand get a plain field each.
            "more_filters": [
                {"name": name, "repeatable": name in views.REPEATABLE, "flag": name in views.FLAGS}
                for name in views.FILTER_NAMES
                if name not in FORM_LAYOUT
            ],
            **context,
        }

    # --- search -------------------------------------------------------------------------

    async def search(self, request: Request) -> Response:
        """`/`: the filters as a form, the traffic chart and a page of results."""
        pairs = _pairs(request)
        context = self._context(request, form=_form(pairs), query=_query(pairs, after=None, upto=None))
        try:
            filters = views.filters_from_query(pairs, datetime.now(UTC))
            after = views.optional_number(pairs, "after") or 0
            upto = views.optional_number(pairs, "upto")
        except UsageError as error:
            return page("search.html", 400, error=str(error), rows=[], more=None, **context)
        started = time.perf_counter()
        async with self.console.connection("searching") as connection:
            if upto is None:
                # The newest id no capture transaction can still commit below: later pages
                # (after=...) walk the same selection, so a row never appears behind the cursor.
                upto = await selection.watermark(connection)
            found = [
                views.row(message)
                async for message in selection.messages(
                    connection, replace(filters, upto_id=upto), after_id=after, limit=PAGE + 1
                )
            ]
        rows = found[:PAGE]
        more = _query(pairs, after=str(rows[-1].id), upto=str(upto)) if len(found) > PAGE else None
        return page(
            "search.html",
            rows=rows,
            more=more,
            after=after,
            error=None,
            elapsed_ms=round((time.perf_counter() - started) * 1000),
            **context,
        )

    async def traffic(self, request: Request) -> Response:
        """`/traffic`: the chart's data (messages per bar per exchange), the count and the coverage."""
        try:
            filters = views.filters_from_query(_pairs(request), datetime.now(UTC))
        except UsageError as error:
            return JSONResponse({"error": str(error)}, status_code=400)
        now = datetime.now(UTC)
        end = min(filters.until, now) if filters.until else now
        async with self.console.connection("drawing the traffic chart") as connection:
            where, params = where_clause(filters)
            start = filters.since or await connection.fetchval(
                queries.WEB_FIRST_CAPTURE.format(where=where), *params
            )
            chart = views.traffic([], now, now, 1)
            if start is not None:
                end = max(end, start + timedelta(seconds=1))
                width = views.bar_width(start, end)
                rows = await connection.fetch(queries.WEB_TRAFFIC.format(where=where, width=width), *params)
                chart = views.traffic(
                    ((row["exchange"], row["bar"], row["messages"]) for row in rows), start, end, width
                )
        coverage = await self._coverage(replace(filters, since=start, until=end) if start else None)
        return JSONResponse({**chart.as_json(), "coverage": coverage})

    async def _coverage(self, filters: Filters | None) -> dict[str, Any]:
        """The coverage verdict of the window as lines (complete is None when not known)."""
        if filters is None:
            return {"complete": None, "lines": []}
        try:
            verdict = await operations.coverage_verdict(self.console.settings, filters)
        except ArchiveError as error:
            return {"complete": None, "lines": [f"coverage: not known: {self.console.shown(error)}"]}
        return {"complete": verdict.complete, "lines": [printable(line) for line in coverage_lines(verdict)]}

    # --- preview --------------------------------------------------------------------------

    async def preview(self, request: Request) -> Response:
        """`/preview`: what `rabbit-replay run` would select, and the exact command line."""
        pairs = _pairs(request)
        target_values = {
            name: ["", *(value for key, value in pairs if key == name)][-1] for name in views.TARGET_NAMES
        }
        context = self._context(
            request,
            form=_form(pairs),
            target=target_values,
            query=_query(pairs),
            # The filters ride along as hidden fields when the target form is submitted.
            filter_pairs=[(key, value) for key, value in pairs if key in views.FILTER_NAMES and value != ""],
        )
        try:
            filters = views.filters_from_query(pairs, datetime.now(UTC))
            target = views.CommandTarget.from_query(pairs)
        except UsageError as error:
            return page("preview.html", 400, error=str(error), **context)
        async with self.console.connection("previewing the replay") as connection:
            newest = await selection.watermark(connection)
            fixed = replace(filters, upto_id=newest)
            groups = await selection.breakdown(connection, fixed)
            samples: list[views.Row] = []
            first: datetime | None = None
            async for message in selection.messages(connection, fixed, limit=SAMPLES):
                first = first or message.captured_at
                samples.append(views.row(message))
        exchanges = filters.exchanges or tuple(sorted({group.exchange for group in groups}))
        coverage = await self._coverage(
            replace(filters, exchanges=exchanges, since=filters.since or first) if groups else None
        )
        vhosts = sorted({group.vhost for group in groups})
        return page(
            "preview.html",
            error=None,
            selected=sum(group.messages for group in groups),
            bytes=sum(group.bytes for group in groups),
            groups=[
                {
                    "vhost": printable(group.vhost),
                    "exchange": printable(group.exchange),
                    "routing_key": printable(group.routing_key),
                    "messages": group.messages,
                    "bytes": group.bytes,
                }
                for group in groups[:100]
            ],
            more_groups=max(0, len(groups) - 100),
            samples=samples,
            coverage=coverage,
            several_vhosts=len(vhosts) > 1 and not (target.to_exchange or target.to_queue),
            vhosts=[printable(name) for name in vhosts],
            newest=newest,
            command=printable(views.run_command(filters, newest, target)),
            **context,
        )

    # --- one message ---------------------------------------------------------------------

    async def _message(self, request: Request, body_bytes: int) -> selection.ArchivedMessage:
        """The message of the path with at most body_bytes of its body; NotFound when there is none."""
        archive_id = int(request.path_params["archive_id"])
        row = None
        if archive_id < 2**63:
            async with self.console.connection("reading the message") as connection:
                row = await connection.fetchrow(queries.WEB_MESSAGE, archive_id, body_bytes)
        if row is None:
            raise NotFound(f"no archived message has id {archive_id}")
        return selection.ArchivedMessage(**dict(row.items()))

    async def message(self, request: Request) -> Response:
        """`/messages/ID`: every property, the typed headers and the body."""
        full = request.query_params.get("full") == "1"
        message = await self._message(request, views.body_limit(full))
        body = views.body_view(message.body, message.body_size, full=full)
        message_id = message.properties.get("message_id")
        correlation_id = message.properties.get("correlation_id")
        links = {
            "exchange": views.query_string([("exchange", message.exchange)]) if message.exchange else None,
            "message_id": views.query_string([("message_id", message_id)])
            if isinstance(message_id, str)
            else None,
            "correlation_id": views.query_string([("correlation_id", correlation_id)])
            if isinstance(correlation_id, str)
            else None,
            "preview": views.query_string(
                [("from_id", str(message.id)), ("to_id", str(message.id))]
                + ([("include_replays", "1")] if message.replay_id else [])
            ),
        }
        return page(
            "message.html",
            **self._context(
                request,
                message={
                    "id": message.id,
                    "captured_at": views.shown_time(message.captured_at),
                    "vhost": printable(message.vhost),
                    "exchange": printable(message.exchange),
                    "routing_key": printable(message.routing_key),
                    "redelivered": message.redelivered,
                    "replay_id": message.replay_id,
                    # Any producer can set x-replay-id: the link is quoted like any other value.
                    "replay_href": quote(message.replay_id, safe="") if message.replay_id else None,
                    "body_size": message.body_size,
                },
                properties=[(name, views.shown_json(value)) for name, value in message.properties.items()],
                headers=views.header_rows(headers_typed(message)),
                body=body,
                full=full,
                links=links,
            ),
        )

    async def body(self, request: Request) -> Response:
        """`/messages/ID/body`: the body's exact bytes, as a download streamed in slices."""
        message = await self._message(request, 0)

        async def slices() -> AsyncIterator[bytes]:
            for start in range(1, message.body_size + 1, BODY_SLICE):
                async with self.console.connection("reading the body") as connection:
                    data = await connection.fetchval(queries.WEB_BODY_SLICE, message.id, start, BODY_SLICE)
                if not data:
                    return  # the message was pruned meanwhile
                yield bytes(data)

        return StreamingResponse(
            slices(),
            media_type="application/octet-stream",
            headers={
                "content-length": str(message.body_size),
                "content-disposition": f'attachment; filename="message-{message.id}.bin"',
                "content-security-policy": "sandbox; default-src 'none'",
            },
        )

    # --- replay history ----------------------------------------------------------------------

    async def replays(self, request: Request) -> Response:
        """`/replays`: the history, newest first."""
        async with self.console.connection("reading the replay history") as connection:
            records = await history.all_replays(connection)
        shown = list(reversed(records))[:HISTORY_SHOWN]
        return page(
            "replays.html",
            **self._context(
                request,
                replays=[_replay_summary(record) for record in shown],
                hidden=max(0, len(records) - HISTORY_SHOWN),
            ),
        )

    async def replay(self, request: Request) -> Response:
        """`/replays/ID`: one replay with its filters, target, options, counts and outcome."""
        replay_id = request.path_params["replay_id"]
        async with self.console.connection("reading the replay") as connection:
            try:
                record = await history.get(connection, replay_id)
            except UsageError as error:
                raise NotFound(str(error)) from None
        search = None
        if "file" not in record.filters:
            filters = Filters.from_json(record.filters)
            if record.upto_id is not None:
                # The replay selected up to its watermark: the link shows the same messages.
                filters = replace(
                    filters, to_id=min(filters.to_id, record.upto_id) if filters.to_id else record.upto_id
                )
            search = views.query_string(views.filter_pairs(filters))
        return page(
            "replay.html",
            **self._context(
                request,
                replay=_replay_summary(record),
                details=[
                    (name, printable(views.shown_json(value)))
                    for name, value in (
                        ("filters", record.filters),
                        ("options", record.options),
                        ("failed positions", list(record.failed_ids)),
                    )
                ],
                error_text=printable(record.error) if record.error else None,
                search=search,
                resumable=record.status in ("interrupted", "incomplete", "failed"),
            ),
        )

    # --- probes and login -------------------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        """`/healthz`: 200 while the console serves and its database answers, else 503 with the reason."""
        try:
            async with asyncio.timeout(3), self.console.connection("checking the database") as connection:
                await connection.fetchval(queries.WEB_PING)
        except (ArchiveError, TimeoutError) as error:
            return JSONResponse(
                {
                    "status": "unavailable",
                    "reason": self.console.shown(error) or "the database did not answer in 3 s",
                },
                status_code=503,
            )
        return JSONResponse({"status": "ok"})

    async def login(self, request: Request) -> Response:
        """`/login`: the form that sets the session cookie (GET shows it, POST checks the token)."""
        token = self.console.token
        if token is None:
            return RedirectResponse("/", status_code=303)
        if request.method == "GET":
            return login_page(request.query_params.get("next", "/"), None, 200)
        form = dict(parse_qsl((await _limited_body(request)).decode("utf-8", "replace")))
        target = auth.safe_next(form.get("next", "/"))
        if not auth.token_matches(token, form.get("token", "")):
            log.warning("web_login_refused", extra={"client": _client(request)})
            return login_page(target, "That is not the console's token.", 401)
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(
            auth.COOKIE,
            auth.session_cookie(token),
            max_age=auth.SESSION_SECONDS,
            httponly=True,
            secure=True,
            # Lax, not Strict: a console link pasted into a chat opens with the session.
            samesite="lax",
        )
        return response

    async def logout(self, request: Request) -> Response:
        """`/logout`: forget the session cookie."""
        response = RedirectResponse("/login" if self.console.token else "/", status_code=303)
        response.delete_cookie(auth.COOKIE, httponly=True, secure=True, samesite="lax")
        return response


def _replay_summary(record: history.ReplayRecord) -> dict[str, Any]:
    return {
        "id": printable(record.id),
        "href": quote(record.id, safe=""),
        "status": record.status,
        "started_at": views.shown_time(record.started_at),
        "finished_at": views.shown_time(record.finished_at) if record.finished_at else "",
        "operator": printable(record.operator),
        "reason": printable(record.reason) if record.reason else "",
        "target": printable(Target.from_json(record.target).describe()),
        "filters": printable(views.shown_json(record.filters)),
        "selected": record.selected,
        "published": record.published,
        "confirmed": record.confirmed,
        "returned": record.returned,
        "nacked": record.nacked,
        "skipped": record.skipped,
    }


async def _limited_body(request: Request) -> bytes:
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > LOGIN_BODY_BYTES:
            break
    return body[:LOGIN_BODY_BYTES]


def _client(request: Request) -> str:
    return request.client.host if request.client else ""


def login_page(next_path: str, error: str | None, status: int) -> HTMLResponse:
    """The login form, going back to next_path once logged in."""
    return page(
        "login.html", status, next=auth.safe_next(next_path), error=error, guarded=True, path="/login"
    )


class Guard:
    """ASGI middleware: the token (or loopback) check, the security headers and a log line per request."""

    def __init__(self, app: ASGIApp, console: Console) -> None:
        self.app = app
        self.console = console

    def _refusal(self, request: Request) -> Response | None:
        path = request.url.path
        token = self.console.token
        if token is None:
            if path == "/healthz" or auth.is_loopback(auth.host_of(request.headers.get("host", ""))):
                return None
            return PlainTextResponse(
                "this console answers only requests to a loopback address (127.0.0.1, localhost); "
                "set RABBIT_ARCHIVE_WEB_TOKEN to serve other addresses\n",
                status_code=403,
            )
        if path.startswith(OPEN_PATHS):
            return None
        if auth.bearer_matches(token, request.headers.get("authorization", "")):
            return None
        if auth.session_valid(token, request.cookies.get(auth.COOKIE, "")):
            return None
        challenge = {"www-authenticate": 'Bearer realm="rabbit-archive"'}
        if request.method == "GET" and "text/html" in request.headers.get("accept", ""):
            response: Response = login_page(request.url.path + _suffix(request), None, 401)
            response.headers.update(challenge)
            return response
        return PlainTextResponse(
            "401: send 'Authorization: Bearer <RABBIT_ARCHIVE_WEB_TOKEN>' or log in at /login\n",
            status_code=401,
            headers=challenge,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [0]

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS:
                    headers.setdefault(name, value)
            await send(message)

        request = Request(scope)
        refusal = self._refusal(request)
        try:
            if refusal is not None:
                await refusal(scope, receive, send_with_headers)
            else:
                await self.app(scope, receive, send_with_headers)
        finally:
            if not request.url.path.startswith(("/static/", "/healthz")):
                log.info(
                    "web_request",
                    extra={
                        "method": request.method,
                        "path": request.url.path,
                        "status": status[0],
                        "ms": round((time.perf_counter() - started) * 1000, 1),
                        "client": _client(request),
                    },
                )


def _suffix(request: Request) -> str:
    return f"?{request.url.query}" if request.url.query else ""


def _error_response(request: Request, error: Exception) -> Response:
    """An ArchiveError as a page (or JSON for the chart): 404 unknown id, 400 bad input, 503 database."""
    status = 404 if isinstance(error, NotFound) else 400 if isinstance(error, UsageError) else 503
    if status == 503:
        log.warning("web_database_error", extra={"path": request.url.path, "error": str(error)})
    if request.url.path in ("/traffic", "/healthz"):
        return JSONResponse({"error": str(error)}, status_code=status)
    return page("error.html", status, guarded=False, path=request.url.path, code=status, message=str(error))


async def _on_error(request: Request, error: Exception) -> Response:
    return _error_response(request, error)


Handler = Callable[[Request], Awaitable[Response]]


def build_app(console: Console) -> Starlette:
    """The console as an ASGI application."""
    pages = Pages(console)
    routes: list[tuple[str, Handler, list[str]]] = [
        ("/", pages.search, ["GET"]),
        ("/traffic", pages.traffic, ["GET"]),
        ("/preview", pages.preview, ["GET"]),
        ("/messages/{archive_id:int}", pages.message, ["GET"]),
        ("/messages/{archive_id:int}/body", pages.body, ["GET"]),
        ("/replays", pages.replays, ["GET"]),
        ("/replays/{replay_id}", pages.replay, ["GET"]),
        ("/healthz", pages.healthz, ["GET"]),
        ("/login", pages.login, ["GET", "POST"]),
        ("/logout", pages.logout, ["POST"]),
    ]
    app = Starlette(
        routes=[
            *(Route(path, handler, methods=methods) for path, handler, methods in routes),
            Mount("/static", StaticFiles(packages=[("rabbit_archive.replay.web", "static")]), name="static"),
        ],
        exception_handlers={ArchiveError: _on_error},
    )
    app.add_middleware(Guard, console=console)
    return app
