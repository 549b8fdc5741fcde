"""A real headless browser for the console's tests: Debian's chromium driven by its chromedriver through Selenium 4.

Only the system browser is used: the driver's path is given explicitly and Selenium Manager is kept offline, so no
test ever downloads a browser or a driver. Without chromium or chromedriver the browser tests fail, naming what is
missing (``scripts/test.sh`` installs both), unless $PNEUMO_SKIP_BROWSER=1, which skips them instead.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

SKIP_ENV = "PNEUMO_SKIP_BROWSER"
BROWSER_NAMES = ("chromium", "chromium-browser")
WINDOW = (1280, 900)  # the screenshots in docs/figures are this wide
PAGE_LOAD_SECONDS = 30


def browser_paths() -> tuple[str, str]:
    """(chromium, chromedriver); fails, or skips with $PNEUMO_SKIP_BROWSER=1, when either is missing."""
    browser = next((p for p in map(shutil.which, BROWSER_NAMES) if p), None)
    driver = shutil.which("chromedriver")
    missing = [name for name, path in (("chromium", browser), ("chromedriver", driver)) if path is None]
    if missing:
        reason = f"{' and '.join(missing)} not installed (Debian: apt-get install chromium chromium-driver)"
        if os.environ.get(SKIP_ENV) == "1":
            pytest.skip(f"{reason}; skipped because {SKIP_ENV}=1")
        pytest.fail(f"{reason}: run the README's test command, or set {SKIP_ENV}=1 to skip the browser tests")
    assert browser is not None and driver is not None
    return browser, driver


@contextmanager
def chromium(window: tuple[int, int] = WINDOW) -> Iterator:  # type: ignore[type-arg]
    """A headless chromium WebDriver with a throw-away profile, quit (and its profile removed) on exit."""
    from selenium import webdriver

    browser, driver_path = browser_paths()
    # Selenium Manager runs only when no driver path is given; offline mode makes sure it never fetches anything.
    os.environ["SE_OFFLINE"] = "true"
    profile = Path(tempfile.mkdtemp(prefix="pneumo-chromium-"))
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={window[0]},{window[1]}", f"--user-data-dir={profile}", "--no-first-run",
                "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
                "--disable-sync", "--disable-component-update", "--hide-scrollbars", "--force-device-scale-factor=1",
                "--lang=en-US"):
        options.add_argument(arg)
    service = webdriver.ChromeService(executable_path=driver_path, log_output=str(profile / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    try:
        driver.set_page_load_timeout(PAGE_LOAD_SECONDS)
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def full_page_png(driver, path: Path, width: int = WINDOW[0], max_height: int = 2400) -> Path:  # type: ignore[no-untyped-def]
    """A screenshot of the whole page (not just the window), ``width`` px wide, at most ``max_height`` tall."""
    height, chrome = driver.execute_script(
        "return [Math.ceil(document.body.getBoundingClientRect().bottom + window.scrollY) + 16,"
        " window.outerHeight - window.innerHeight]")
    # the window's size includes the browser's own frame; the page gets what is left of it
    driver.set_window_size(width, min(max(int(height), 300), max_height) + max(int(chrome), 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(path))
    driver.set_window_size(*WINDOW)
    return path
