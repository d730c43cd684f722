"""Headless Chromium for the gallery's tests and benchmark (Selenium + Debian's chromedriver).

Selenium is a test dependency (``.[dev]``); the browser is the system's (``apt-get install
chromium chromium-driver``, as ``.ci/run`` does): nothing is downloaded. The browser runs
with networking features off (no component updates, no sync, no QUIC), a throw-away profile,
and its console captured, so a test can assert that the page made no network request and
logged no error.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

#: Where Debian (and most Linux distributions) put the two.
CHROMEDRIVER = ("chromedriver", "/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")
CHROMIUM = ("chromium", "chromium-browser", "/usr/bin/chromium", "google-chrome")


def _which(names: tuple[str, ...]) -> str | None:
    return next((found for n in names if (found := shutil.which(n))), None)


def missing() -> str | None:
    """Why no browser test can run here (None when Chromium, its driver and Selenium are
    all installed)."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -r requirements-dev.txt)"
    if _which(CHROMEDRIVER) is None:
        return "chromedriver is not installed (apt-get install chromium chromium-driver)"
    if _which(CHROMIUM) is None:
        return "chromium is not installed (apt-get install chromium)"
    return None


@contextmanager
def chromium(width: int = 1300, height: int = 1000) -> Iterator[Any]:
    """A headless Chromium WebDriver with the browser console captured."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="render-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = _which(CHROMIUM) or ""
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-extensions",
                 "--disable-default-apps", f"--window-size={width},{height}",
                 f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    service = Service(executable_path=_which(CHROMEDRIVER) or "chromedriver",
                      log_output=os.devnull)
    driver = webdriver.Chrome(service=service, options=options)
    try:
        driver.set_page_load_timeout(120)
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def console_errors(driver: Any) -> list[str]:
    """The console messages at error level since the last call (Chromium's ``SEVERE``)."""
    return [entry["message"] for entry in driver.get_log("browser")
            if entry.get("level") == "SEVERE"]


def requests(driver: Any) -> list[str]:
    """Every URL the browser requested since the last call (the DevTools network log, which
    also sees ``file://`` loads that the page's resource timing leaves out)."""
    import json

    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def file_url(path: Path) -> str:
    return Path(path).resolve().as_uri()
