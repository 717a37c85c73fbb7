"""`rabbit-replay web` on archives the real daemon filled, in headless Chromium.

A person's walk through the console (search, filter by exchange and header, the chart, a
message with typed headers, a narrowed search, the replay preview, the history) with a
screenshot of each page under test-output/web-console/; hostile names, headers and bodies that
must show as text with no script running; and the token that guards any address but loopback.
The console runs as the read-only PostgreSQL role README.md's "Web console" section creates.
"""

import datetime
import decimal
import json
import os
import re
import shlex
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import httpx
import pika
import pytest
from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.expected_conditions import staleness_of
from selenium.webdriver.support.ui import WebDriverWait

from tests.acceptance.test_least_privilege import database_name, dropped_roles
from tests.acceptance.test_replay import assert_one_line_error, ok, replay_command
from tests.conftest import run_sql
from tests.support.browser import Screenshots, alert_text, browser, console_errors
from tests.support.daemon import CaptureProcess, command, free_port, wait_for
from tests.support.services import Services
from tests.support.web import WebConsole

__all__ = ["browser"]  # the module-scoped Chromium fixture

pytestmark = pytest.mark.acceptance

README = Path(__file__).resolve().parents[2] / "README.md"
TOKEN = f"console-{uuid.uuid4().hex}"
WAIT = 15


def readme_console_sql() -> list[str]:
    """The statements of the ```sql block in README.md's "Web console" section."""
    text = README.read_text()
    start = text.index("\n## Web console\n")
    end = text.index("\n## ", start + 1)
    (block,) = re.findall(r"^```sql\n(.*?)^```", text[start:end], re.MULTILINE | re.DOTALL)
    lines = "\n".join(line for line in block.splitlines() if not line.lstrip().startswith("--"))
    return [statement.strip() for statement in lines.split(";") if statement.strip()]


@pytest.fixture
def console_role(services: Services, database_url: str) -> Iterator[Callable[[], str]]:
    """Creates (once the schema exists) the read-only role of README.md's "Web console" section;
    returns a database URL of that role. The role is dropped at the end."""
    role = f"rabbit_console_{uuid.uuid4().hex[:8]}"

    def create() -> str:
        for statement in readme_console_sql():
            run_sql(database_url, re.sub(r"\brabbit_console\b", role, statement))
        parts = urlsplit(database_url)
        host = f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)
        return urlunsplit(parts._replace(netloc=f"{role}:change-me@{host}"))

    with dropped_roles(services, database_name(database_url), role):
        yield create


@pytest.fixture
def web_console() -> Iterator[Callable[..., WebConsole]]:
    """Start `rabbit-replay web` subprocesses; all stopped at the end."""
    started: list[WebConsole] = []

    def start(env: dict[str, str], *args: str) -> WebConsole:
        console = WebConsole(env, *args)
        started.append(console)
        console.start().wait_ready()
        return console

    try:
        yield start
    finally:
        for console in started:
            console.close()


def archived(database_url: str) -> int:
    count: int = run_sql(database_url, "SELECT count(*) FROM rabbit_archive.messages")[0][0]
    return count


def wait_archived(database_url: str, expected: int) -> None:
    wait_for(lambda: archived(database_url) >= expected, WAIT, what=f"{expected} messages archived")


def until(driver: webdriver.Chrome, css: str) -> list[WebElement]:
    """The elements once at least one matches (the chart draws after the page loaded)."""
    found: list[WebElement] = WebDriverWait(driver, WAIT).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, css), message=f"no {css} on {driver.current_url}"
    )
    return found


def wait_for_text(driver: webdriver.Chrome, by: str, value: str, text: str) -> None:
    """Wait until the element reads `text`: a page that replaces itself meanwhile (a form posted, a
    redirect) leaves the element first found stale, so it is found again."""
    WebDriverWait(
        driver, WAIT, ignored_exceptions=(NoSuchElementException, StaleElementReferenceException)
    ).until(
        lambda d: d.find_element(by, value).text == text,
        message=f"no {value} reading {text!r} on {driver.current_url}",
    )


def search(driver: webdriver.Chrome) -> None:
    """Submit the search form and wait for the new page: the old one also has a chart and rows."""
    old_page = driver.find_element(By.TAG_NAME, "html")
    driver.find_element(By.ID, "search-button").click()
    WebDriverWait(driver, WAIT).until(staleness_of(old_page), message="the search page did not load")


def assert_no_script_ran(driver: webdriver.Chrome) -> None:
    """No payload ran, none became markup, and the page's own script was not blocked."""
    assert alert_text(driver) is None
    assert driver.execute_script("return typeof window.__xss") == "undefined"
    scripts = driver.execute_script(
        "return Array.from(document.scripts, s => s.getAttribute('src') || s.textContent)"
    )
    assert scripts == ["/static/console.js"], scripts
    handlers = driver.execute_script(
        "return Array.from(document.querySelectorAll('*')).flatMap("
        "e => Array.from(e.attributes).filter(a => a.name.startsWith('on'))"
        ".map(a => e.tagName + ' ' + a.name))"
    )
    assert handlers == [], handlers
    # A Content-Security-Policy violation (or a script error) shows up as a console error.
    errors = [entry for entry in console_errors(driver) if "Failed to load resource" not in entry["message"]]
    assert errors == [], errors


# --- a walk through the console ---------------------------------------------------------------

TYPED_HEADERS = {
    "attempt": 3,
    "sequence": 2**40,
    "urgent": True,
    "amount": decimal.Decimal("12.50"),
    "sent": datetime.datetime(2026, 11, 28, 10, 42, 0),
    "route": {"hops": 2, "via": ["eu-west", "eu-central"]},
}


def publish_orders_and_payments(channel: Any) -> int:
    """40 orders (every other one for tenant acme) and 20 payments, with typed headers and JSON bodies."""
    sent = 0
    for number in range(60):
        exchange = "orders" if number < 40 else "payments"
        tenant = "acme" if number % 2 else "globex"
        body = json.dumps({"order": {"id": number, "total": number * 10}, "tenant": tenant}).encode()
        channel.basic_publish(
            exchange,
            f"eu.shop.{number % 3}",
            body,
            pika.BasicProperties(
                message_id=f"order-{number}",
                correlation_id=f"checkout-{number // 4}",
                content_type="application/json",
                delivery_mode=2,
                headers={"tenant": tenant, **TYPED_HEADERS},
            ),
        )
        sent += 1
        if number % 10 == 9:
            time.sleep(0.3)  # a few seconds of traffic, so that the chart has several bars
    return sent


@pytest.mark.browser
@pytest.mark.timeout(120)
def test_search_filter_open_a_message_see_the_chart_preview_and_history(
    start_capture: Callable[..., CaptureProcess],
    capture_env: dict[str, str],
    pika_channel: Any,
    database_url: str,
    console_role: Callable[[], str],
    web_console: Callable[..., WebConsole],
    browser: webdriver.Chrome,
    request: pytest.FixtureRequest,
) -> None:
    daemon = start_capture()
    pika_channel.exchange_declare("orders", "topic")
    pika_channel.exchange_declare("payments", "fanout")
    pika_channel.queue_declare("console-sink")
    daemon.wait_bound("orders")
    daemon.wait_bound("payments")
    wait_archived(database_url, publish_orders_and_payments(pika_channel))
    replayed = replay_command(
        capture_env,
        "run",
        "--exchange",
        "orders",
        "--header",
        "tenant=acme",
        "--to-queue",
        "console-sink",
        "--reason",
        "INC-42 checking the console",
        "--operator",
        "console-test",
        "--yes",
    )
    replay_id = ok(replayed).splitlines()[0]
    console = web_console({**capture_env, "RABBIT_ARCHIVE_DATABASE_URL": console_role()})
    shots = Screenshots(browser, request.node.name)

    browser.get(console.url + "/")
    until(browser, "#traffic svg rect")
    assert browser.find_element(By.ID, "match-count").text == "60 messages match"
    shots.take("search")

    # Filter by exchange and header through the form, as a person would.
    browser.find_element(By.CSS_SELECTOR, "input[name=exchange]").send_keys("orders")
    browser.find_element(By.CSS_SELECTOR, "input[name=header]").send_keys("tenant=acme")
    search(browser)
    WebDriverWait(browser, WAIT).until(lambda d: "header=tenant%3Dacme" in d.current_url)
    until(browser, "#traffic svg rect")
    wait_for_text(browser, By.ID, "match-count", "20 messages match")
    rows = browser.find_elements(By.CSS_SELECTOR, "table.messages tbody tr")
    assert len(rows) == 20
    assert {row.find_elements(By.TAG_NAME, "td")[3].text for row in rows} == {"orders"}
    legend = [label.text for label in browser.find_elements(By.CSS_SELECTOR, "#traffic .legend .label")]
    assert legend == ["orders"]
    assert "coverage: complete" in browser.find_element(By.ID, "coverage").text
    shots.take("search-orders-acme")
    search_url = browser.current_url

    # One message: every property, the headers with their AMQP types, the body pretty-printed.
    rows[0].find_element(By.CSS_SELECTOR, "td a").click()
    until(browser, "#headers")
    headers = {
        row.find_elements(By.TAG_NAME, "td")[0].text: (
            row.find_elements(By.TAG_NAME, "td")[1].text,
            row.find_elements(By.TAG_NAME, "td")[2].text,
        )
        for row in browser.find_elements(By.CSS_SELECTOR, "#headers tbody tr")
    }
    assert headers["tenant"] == ("longstr", '"acme"')
    assert headers["attempt"] == ("int32", "3")
    assert headers["sequence"] == ("int64", str(2**40))
    assert headers["urgent"] == ("bool", "true")
    assert headers["amount"][0] == "decimal"
    assert headers["sent"] == ("timestamp", '"2026-11-28T10:42:00Z"')
    assert headers["route"] == ("table", "2 entries")
    assert headers["via"] == ("array", "2 items")
    assert headers["[1]"] == ("longstr", '"eu-central"')
    body = browser.find_element(By.ID, "body").text
    assert body.startswith('{\n  "order": {\n    "id": 1,')
    assert "order-1" in browser.find_element(By.CSS_SELECTOR, "table.properties").text
    assert_no_script_ran(browser)
    shots.take("message")

    # A bar of the chart narrows the search to its interval and exchange.
    browser.get(search_url)
    bars = until(browser, "#traffic svg a rect")
    bars[0].click()
    WebDriverWait(browser, WAIT).until(lambda d: "until=" in d.current_url)
    narrowed = browser.current_url
    for part in ("since=", "exchange=orders", "header=tenant%3Dacme"):
        assert part in narrowed, narrowed
    narrowed_rows = browser.find_elements(By.CSS_SELECTOR, "table.messages tbody tr")
    assert 1 <= len(narrowed_rows) <= 20
    until(browser, "#traffic svg rect")
    shots.take("search-narrowed-by-a-bar")

    # The preview of a replay of this search, with the exact command line.
    browser.get(search_url)
    browser.find_element(By.ID, "preview-link").click()
    until(browser, "#command")
    assert "Would replay 20 messages" in browser.find_element(By.ID, "selected").text
    line = browser.find_element(By.ID, "command").text
    words = shlex.split(line)
    assert words[:6] == ["rabbit-replay", "run", "--exchange", "orders", "--to-id", words[5]]
    assert words[6:8] == ["--header", "tenant=acme"]
    shots.take("preview")
    dry = ok(replay_command(capture_env, *words[1:], "--dry-run"))
    assert "would replay 20 messages" in dry

    # The history, and the replay run above.
    browser.get(console.url + "/replays")
    history_rows = browser.find_elements(By.CSS_SELECTOR, "table.replays tbody tr")
    assert len(history_rows) == 1
    assert "INC-42 checking the console" in history_rows[0].text
    assert "completed" in history_rows[0].text
    shots.take("replays")
    history_rows[0].find_element(By.CSS_SELECTOR, "td.id a").click()
    until(browser, "#replay-search")
    assert replay_id in browser.find_element(By.TAG_NAME, "h1").text
    assert "console-test" in browser.find_element(By.CSS_SELECTOR, "dl.summary").text
    shots.take("replay")
    browser.find_element(By.ID, "replay-search").click()
    WebDriverWait(browser, WAIT).until(lambda d: d.find_elements(By.CSS_SELECTOR, "table.messages tbody tr"))
    assert len(browser.find_elements(By.CSS_SELECTOR, "table.messages tbody tr")) == 20
    assert_no_script_ran(browser)
    assert [path.name for path in shots.taken] == [
        "01-search.png",
        "02-search-orders-acme.png",
        "03-message.png",
        "04-search-narrowed-by-a-bar.png",
        "05-preview.png",
        "06-replays.png",
        "07-replay.png",
    ]
    assert console.stop() == 0, console.log()


# --- hostile values ---------------------------------------------------------------------------

HOSTILE_EXCHANGE = "x<script>window.__xss=1</script>\"'><img src=x onerror=window.__xss=2>"
HOSTILE_KEY = "<svg onload=window.__xss=3>"
HOSTILE_HEADER_KEY = "<b onmouseover=window.__xss=4>k"
HOSTILE_HEADER_VALUE = "\"><script>window.__xss=5</script>' autofocus onfocus='window.__xss=6"
HOSTILE_MESSAGE_ID = '"><img src=x onerror=alert(7)>'
HOSTILE_BODY = {
    "note": "</pre><script>window.__xss=8</script>",
    "html": "<img src=x onerror=alert(9)>",
    "attribute": '" onmouseover="window.__xss=10',
}
HOSTILE_TEXT = b"<script>alert(11)</script><iframe src=javascript:alert(12)>"
HOSTILE_REASON = "<script>window.__xss=13</script>"


@pytest.mark.browser
@pytest.mark.timeout(120)
def test_hostile_names_headers_and_bodies_show_as_text_and_no_script_runs(
    start_capture: Callable[..., CaptureProcess],
    capture_env: dict[str, str],
    pika_channel: Any,
    database_url: str,
    web_console: Callable[..., WebConsole],
    browser: webdriver.Chrome,
    request: pytest.FixtureRequest,
) -> None:
    daemon = start_capture()
    pika_channel.exchange_declare(HOSTILE_EXCHANGE, "topic")
    pika_channel.queue_declare("console-sink")
    daemon.wait_bound(json.dumps(HOSTILE_EXCHANGE)[1:-1])
    properties = pika.BasicProperties(
        message_id=HOSTILE_MESSAGE_ID,
        content_type="application/json",
        headers={HOSTILE_HEADER_KEY: HOSTILE_HEADER_VALUE, "tenant": HOSTILE_HEADER_VALUE},
    )
    pika_channel.basic_publish(HOSTILE_EXCHANGE, HOSTILE_KEY, json.dumps(HOSTILE_BODY).encode(), properties)
    pika_channel.basic_publish(HOSTILE_EXCHANGE, HOSTILE_KEY, HOSTILE_TEXT, pika.BasicProperties())
    wait_archived(database_url, 2)
    ok(
        replay_command(
            capture_env,
            "run",
            "--exchange",
            HOSTILE_EXCHANGE,
            "--to-queue",
            "console-sink",
            "--reason",
            HOSTILE_REASON,
            "--yes",
        )
    )
    console = web_console(capture_env)
    shots = Screenshots(browser, request.node.name)

    browser.get(console.url + "/")
    browser.find_element(By.CSS_SELECTOR, "input[name=exchange]").send_keys(HOSTILE_EXCHANGE)
    browser.find_element(By.CSS_SELECTOR, "input[name=header]").send_keys(f"tenant={HOSTILE_HEADER_VALUE}")
    search(browser)
    until(browser, "#traffic svg rect")
    rows = browser.find_elements(By.CSS_SELECTOR, "table.messages tbody tr")
    assert len(rows) == 1
    cells = rows[0].find_elements(By.TAG_NAME, "td")
    assert (cells[3].text, cells[4].text, cells[5].text) == (
        HOSTILE_EXCHANGE,
        HOSTILE_KEY,
        HOSTILE_MESSAGE_ID,
    )
    assert browser.find_element(By.CSS_SELECTOR, "#traffic .legend .label").text == HOSTILE_EXCHANGE
    # The form shows back what was typed, as the fields' values.
    assert (
        browser.find_element(By.CSS_SELECTOR, "input[name=exchange]").get_attribute("value")
        == HOSTILE_EXCHANGE
    )
    assert_no_script_ran(browser)
    shots.take("search")

    cells[0].find_element(By.TAG_NAME, "a").click()
    until(browser, "#headers")
    headers = browser.find_element(By.ID, "headers").text
    assert HOSTILE_HEADER_KEY in headers
    assert json.dumps(HOSTILE_HEADER_VALUE) in headers
    body = browser.find_element(By.ID, "body").text
    for value in HOSTILE_BODY.values():
        assert json.dumps(value) in body
    summary = browser.find_element(By.CSS_SELECTOR, "dl.summary").text
    assert HOSTILE_EXCHANGE in summary
    assert HOSTILE_KEY in summary
    assert_no_script_ran(browser)
    shots.take("message-json")

    text_id = run_sql(database_url, "SELECT max(id) FROM rabbit_archive.messages")[0][0]
    browser.get(f"{console.url}/messages/{text_id}")
    assert browser.find_element(By.ID, "body").text == HOSTILE_TEXT.decode()
    assert_no_script_ran(browser)
    shots.take("message-text")

    browser.get(f"{console.url}/preview?exchange={quote(HOSTILE_EXCHANGE, safe='')}")
    until(browser, "#command")
    assert shlex.split(browser.find_element(By.ID, "command").text)[2:4] == ["--exchange", HOSTILE_EXCHANGE]
    assert_no_script_ran(browser)
    shots.take("preview")

    browser.get(console.url + "/replays")
    assert HOSTILE_REASON in browser.find_element(By.CSS_SELECTOR, "table.replays").text
    browser.find_element(By.CSS_SELECTOR, "table.replays td.id a").click()
    until(browser, "dl.summary")
    assert HOSTILE_REASON in browser.find_element(By.CSS_SELECTOR, "dl.summary").text
    assert json.dumps(HOSTILE_EXCHANGE) in browser.find_element(By.CSS_SELECTOR, "pre.value").text
    assert_no_script_ran(browser)
    shots.take("replay")


# --- the token ---------------------------------------------------------------------------------


def migrated(env: dict[str, str]) -> None:
    """The archive's schema in the test's database (the console needs nothing else)."""
    result = subprocess.run(
        [command("rabbit-capture"), "migrate"],
        env={**{k: v for k, v in os.environ.items() if not k.startswith("RABBIT_ARCHIVE_")}, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.browser
@pytest.mark.timeout(90)
def test_any_address_but_loopback_needs_the_token_and_every_request_carries_it(
    capture_env: dict[str, str],
    web_console: Callable[..., WebConsole],
    browser: webdriver.Chrome,
) -> None:
    migrated(capture_env)
    refused = replay_command(capture_env, "web", "--host", "0.0.0.0", "--port", str(free_port()), timeout=30)
    assert_one_line_error(refused, 2, "not a loopback address", "RABBIT_ARCHIVE_WEB_TOKEN")
    by_variable = replay_command(
        {**capture_env, "RABBIT_ARCHIVE_WEB_HOST": "0.0.0.0"}, "web", "--port", str(free_port()), timeout=30
    )
    assert_one_line_error(by_variable, 2, "--host 0.0.0.0 is not a loopback address")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = replay_command(capture_env, "web", "--port", str(taken.getsockname()[1]), timeout=30)
    assert_one_line_error(busy, 1, "cannot listen on 127.0.0.1:")

    console = web_console({**capture_env, "RABBIT_ARCHIVE_WEB_TOKEN": TOKEN}, "--host", "0.0.0.0")
    assert TOKEN not in console.log()
    with httpx.Client(base_url=console.url, timeout=10, follow_redirects=False) as http:
        for path in ("/", "/replays", "/traffic", "/preview", "/messages/1"):
            answer = http.get(path)
            assert answer.status_code == 401, path
            assert answer.headers["www-authenticate"].startswith("Bearer"), path
            assert http.get(path, headers={"authorization": "Bearer not-it"}).status_code == 401, path
        assert http.get("/", headers={"authorization": f"Bearer {TOKEN}"}).status_code == 200
        assert http.get("/replays", headers={"authorization": f"Bearer {TOKEN}"}).status_code == 200
        assert http.get("/traffic", headers={"authorization": f"Bearer {TOKEN}"}).json()["total"] == 0
        assert http.get("/healthz").json() == {"status": "ok"}, "probes need no token"
        login = http.post("/login", data={"token": TOKEN, "next": "/replays"})
        assert login.status_code == 303
        cookie = (
            login.cookies.get("rabbit_archive_console")
            or login.headers["set-cookie"].split(";")[0].split("=", 1)[1]
        )
        assert http.get("/replays", headers={"cookie": f"rabbit_archive_console={cookie}"}).status_code == 200
        assert http.post("/login", data={"token": "guess"}).status_code == 401

    # The login form in a browser: the page asked for shows once the cookie is set.
    browser.delete_all_cookies()
    browser.get(console.url + "/replays")
    assert browser.find_element(By.TAG_NAME, "h1").text == "Log in"
    browser.find_element(By.NAME, "token").send_keys(TOKEN)
    browser.find_element(By.CSS_SELECTOR, "section.login button").click()
    wait_for_text(browser, By.TAG_NAME, "h1", "Replays")
    assert urlsplit(browser.current_url).path == "/replays"
    (session,) = browser.get_cookies()
    assert (session["httpOnly"], session["secure"], session["sameSite"]) == (True, True, "Lax")
    browser.get(console.url + "/")
    until(browser, "#traffic")
    browser.find_element(By.CSS_SELECTOR, "form.logout button").click()
    wait_for_text(browser, By.TAG_NAME, "h1", "Log in")
    assert console.stop() == 0, console.log()
