"""The web console without a database: who may enter, the headers every answer carries, escaping, settings."""

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest

from rabbit_archive.archive.errors import UsageError
from rabbit_archive.config.settings import Settings, load_settings, mask_url
from rabbit_archive.replay.web import auth, server, views
from rabbit_archive.replay.web.app import CSP, TEMPLATES, Console, build_app

TOKEN = "t0ken-with-enough-entropy"
HOSTILE = "<script>window.__xss=1</script>\"'><img src=x onerror=alert(1)>"


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("LOCALHOST.", True),
        ("console.localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.7", False),
        ("example.com", False),
        ("127.0.0.1.example.com", False),
    ],
)
def test_loopback_addresses(host: str, loopback: bool) -> None:
    assert auth.is_loopback(host) is loopback


@pytest.mark.parametrize(
    ("header", "host"),
    [("127.0.0.1:9188", "127.0.0.1"), ("[::1]:9188", "::1"), ("localhost", "localhost"), ("::1", "::1")],
)
def test_host_of_a_host_header(header: str, host: str) -> None:
    assert auth.host_of(header) == host


def test_a_non_loopback_address_needs_a_token() -> None:
    with pytest.raises(UsageError) as caught:
        server.check_address("0.0.0.0", None)
    assert "RABBIT_ARCHIVE_WEB_TOKEN" in str(caught.value)
    server.check_address("0.0.0.0", TOKEN)
    server.check_address("::1", None)
    server.check_address("localhost", None)


def test_bearer_and_session_cookie() -> None:
    assert auth.bearer_matches(TOKEN, f"Bearer {TOKEN}")
    assert auth.bearer_matches(TOKEN, f"bearer  {TOKEN} ")
    assert not auth.bearer_matches(TOKEN, f"Basic {TOKEN}")
    assert not auth.bearer_matches(TOKEN, f"Bearer {TOKEN}x")
    assert not auth.bearer_matches(TOKEN, "Bearer ")
    cookie = auth.session_cookie(TOKEN, now=1000.0)
    assert TOKEN not in cookie
    assert auth.session_valid(TOKEN, cookie, now=1000.0 + auth.SESSION_SECONDS - 1)
    assert not auth.session_valid(TOKEN, cookie, now=1000.0 + auth.SESSION_SECONDS)
    assert not auth.session_valid("another-token", cookie, now=1000.0)
    version, expires, mac = cookie.split(".")
    assert not auth.session_valid(TOKEN, f"{version}.{int(expires) + 3600}.{mac}", now=1000.0)
    assert not auth.session_valid(TOKEN, "", now=1000.0)


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ("/?exchange=orders", "/?exchange=orders"),
        ("/messages/7", "/messages/7"),
        ("//evil.example/", "/"),
        ("/\\evil.example", "/"),
        ("https://evil.example/", "/"),
        ("/\r\nSet-Cookie: x=y", "/"),
    ],
)
def test_after_login_only_a_local_path(given: str, kept: str) -> None:
    assert auth.safe_next(given) == kept


def test_console_connections_get_a_statement_timeout_and_read_only_transactions() -> None:
    url = server.console_database_url(
        "postgresql://u:p@db1:5432,db2:5432/archive?target_session_attrs=any", 2.5
    )
    assert url.startswith("postgresql://u:p@db1:5432,db2:5432/archive?target_session_attrs=any&")
    assert "statement_timeout=2500" in url
    assert "default_transaction_read_only=on" in url
    # What the operator set in DATABASE_URL wins.
    assert "statement_timeout=100&" in server.console_database_url(
        "postgresql://h/db?statement_timeout=100", 10
    )


def test_errors_name_the_database_url_as_configured() -> None:
    settings = Settings(database_url="postgresql://u:secret@db/archive")
    console_url = server.console_database_url(settings.database_url, settings.web_statement_timeout)
    text = f"cannot reach PostgreSQL at {mask_url(console_url)}: connection refused"
    assert server.as_configured(text, settings) == (
        "cannot reach PostgreSQL at postgresql://u:***@db/archive: connection refused"
    )


def test_web_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("RABBIT_ARCHIVE_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RABBIT_ARCHIVE_SECRETS_DIR", str(tmp_path))
    defaults = load_settings()
    assert (defaults.web_host, defaults.web_port, defaults.web_token) == ("127.0.0.1", 9188, None)
    assert defaults.web_statement_timeout == 10
    monkeypatch.setenv("RABBIT_ARCHIVE_WEB_TOKEN", "  ")
    assert load_settings().web_token is None, "a blank token is no token"
    secret = tmp_path / "token"
    secret.write_text(TOKEN + "\n")
    monkeypatch.delenv("RABBIT_ARCHIVE_WEB_TOKEN")
    monkeypatch.setenv("RABBIT_ARCHIVE_WEB_TOKEN_FILE", str(secret))
    settings = load_settings()
    assert settings.web_token == TOKEN
    assert TOKEN not in repr(settings)


# --- the HTTP side, without a database -------------------------------------------------------


async def client(token: str | None) -> AsyncIterator[httpx.AsyncClient]:
    # The pages below never reach the pool: login, logout, static files and refusals.
    console = Console(Settings(web_token=token), pool=cast(Any, None))
    transport = httpx.ASGITransport(app=build_app(console))
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:9188") as test:
        yield test


@pytest.fixture
async def guarded() -> AsyncIterator[httpx.AsyncClient]:
    async for test in client(TOKEN):
        yield test


@pytest.fixture
async def open_console() -> AsyncIterator[httpx.AsyncClient]:
    async for test in client(None):
        yield test


def assert_security_headers(headers: Any) -> None:
    assert headers["content-security-policy"] == CSP
    assert "'unsafe-inline'" not in CSP
    assert "script-src 'self'" in CSP
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["x-frame-options"] == "DENY"
    assert headers["cache-control"] == "no-store"


async def test_with_a_token_a_request_without_it_is_401(guarded: httpx.AsyncClient) -> None:
    answer = await guarded.post("/logout")
    assert answer.status_code == 401
    assert answer.headers["www-authenticate"].startswith("Bearer")
    assert_security_headers(answer.headers)
    page = await guarded.get("/replays?x=1", headers={"accept": "text/html"})
    assert page.status_code == 401
    assert 'name="next" value="/replays?x=1"' in page.text
    assert (await guarded.post("/logout", headers={"authorization": "Bearer wrong"})).status_code == 401


async def test_the_bearer_token_or_the_login_cookie_lets_a_request_in(guarded: httpx.AsyncClient) -> None:
    assert (await guarded.post("/logout", headers={"authorization": f"Bearer {TOKEN}"})).status_code == 303
    refused = await guarded.post("/login", data={"token": "wrong", "next": "/replays"})
    assert refused.status_code == 401
    login = await guarded.post("/login", data={"token": TOKEN, "next": "/replays"})
    assert login.status_code == 303
    assert login.headers["location"] == "/replays"
    cookie = login.headers["set-cookie"]
    assert cookie.startswith(f"{auth.COOKIE}=")
    for attribute in ("HttpOnly", "Secure", "SameSite=lax"):
        assert attribute.lower() in cookie.lower(), cookie
    assert TOKEN not in cookie
    value = cookie.split(";")[0].split("=", 1)[1]
    answer = await guarded.post("/logout", headers={"cookie": f"{auth.COOKIE}={value}"})
    assert answer.status_code == 303
    assert_security_headers(answer.headers)


async def test_probes_the_login_form_and_its_style_need_no_token(guarded: httpx.AsyncClient) -> None:
    assert (await guarded.get("/login")).status_code == 200
    css = await guarded.get("/static/console.css")
    assert css.status_code == 200
    assert_security_headers(css.headers)
    assert (await guarded.get("/static/console.js")).status_code == 200


async def test_without_a_token_only_requests_to_a_loopback_name_are_answered(
    open_console: httpx.AsyncClient,
) -> None:
    # A page elsewhere that points its own DNS name at 127.0.0.1 (DNS rebinding) gets nothing.
    refused = await open_console.get("/static/console.css", headers={"host": "attacker.example:9188"})
    assert refused.status_code == 403
    assert_security_headers(refused.headers)
    for host in ("127.0.0.1:9188", "localhost:9188", "[::1]:9188"):
        assert (await open_console.get("/static/console.css", headers={"host": host})).status_code == 200, (
            host
        )
    assert (await open_console.get("/login")).status_code == 303, "no token: nothing to log in to"


def test_templates_escape_every_archived_value() -> None:
    row = views.Row(1, "2026-11-28 10:42:00.000", HOSTILE, HOSTILE, HOSTILE, HOSTILE, 3, False, HOSTILE)
    html = TEMPLATES.get_template("search.html").render(
        guarded=False,
        path="/",
        more_filters=[{"name": "dead_lettered_from", "repeatable": False, "flag": False}],
        form={
            name: [HOSTILE, ""] if name in views.REPEATABLE else HOSTILE
            for name in [*views.FILTER_NAMES, "dead_lettered_from"]
        },
        query=views.query_string([("exchange", HOSTILE)]),
        rows=[row],
        more=None,
        after=0,
        error=None,
        elapsed_ms=1,
    )
    assert "<script>window" not in html
    assert "<img src=x" not in html
    assert (
        "&lt;script&gt;window.__xss=1&lt;/script&gt;&#34;&#39;&gt;&lt;img src=x onerror=alert(1)&gt;" in html
    )
    assert html.count("<script") == 1, "only the console's own script"
    assert '<script src="/static/console.js" defer></script>' in html
