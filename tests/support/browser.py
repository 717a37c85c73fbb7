"""Headless Chromium for the web console's tests: Debian's chromium driven by its chromedriver.

Where either is missing the tests that need them are skipped, except under CI (CI=true), where
a missing browser fails them: scripts/browser installs both on the project's machines.
"""

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.common.exceptions import NoAlertPresentException
from selenium.webdriver.chrome.service import Service

ROOT = Path(__file__).resolve().parents[2]
# Screenshots and other artefacts tests keep for people to look at (ignored by git).
OUTPUT = Path(os.environ.get("RABBIT_ARCHIVE_TEST_OUTPUT", ROOT / "test-output"))


def executables() -> tuple[str, str]:
    """The chromium and chromedriver programs; skips (fails under CI) when one is missing."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if browser and driver:
        return browser, driver
    missing = ", ".join(
        name for name, found in (("chromium", browser), ("chromedriver", driver)) if not found
    )
    reason = f"{missing} not installed: run scripts/browser (Debian's chromium and chromium-driver)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(reason)
    pytest.skip(reason)


def chromium(width: int = 1360, height: int = 1000) -> webdriver.Chrome:
    """A headless Chromium with its console log kept (CSP violations show up there)."""
    browser, driver = executables()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in (
        "--headless=new",
        "--no-sandbox",  # the tests run as root in CI
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-extensions",
        f"--window-size={width},{height}",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(executable_path=driver))


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    """One headless Chromium for a test module."""
    driver = chromium()
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


class Screenshots:
    """Saves numbered full-page screenshots of one test under OUTPUT/web-console/<test>/."""

    def __init__(self, driver: webdriver.Chrome, test: str) -> None:
        self.driver = driver
        self.folder = OUTPUT / "web-console" / re.sub(r"[^A-Za-z0-9_.-]+", "_", test)
        if self.folder.exists():
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True)
        self.taken: list[Path] = []

    def take(self, name: str) -> Path:
        """Screenshot the whole page (the window is stretched to the page's height first)."""
        width = self.driver.get_window_size()["width"]
        # Shrink first: a page shorter than the window measures as the window's height.
        self.driver.set_window_size(width, 600)
        height = self.driver.execute_script("return document.documentElement.scrollHeight")
        self.driver.set_window_size(width, min(int(height) + 140, 6000))
        path = self.folder / f"{len(self.taken) + 1:02d}-{name}.png"
        assert self.driver.save_screenshot(str(path)), path
        self.taken.append(path)
        return path


def alert_text(driver: webdriver.Chrome) -> str | None:
    """The text of an open alert dialog, or None."""
    try:
        return str(driver.switch_to.alert.text)
    except NoAlertPresentException:
        return None


def console_errors(driver: webdriver.Chrome) -> list[dict[str, Any]]:
    """The browser console's errors since the last call (CSP violations among them)."""
    return [entry for entry in driver.get_log("browser") if entry.get("level") == "SEVERE"]
