"""Headless Chromium from Debian, driven by Playwright (no browser download), for the UI tests.

The fixture `browser` (a test module imports `browser_fixture`); `page_for(browser)` opens a
page that records console errors and failed requests; `axe_violations` runs the vendored
axe-core (tests/support/vendor, MPL-2.0) on it; `screenshot` saves a PNG under the artifacts
folder (`APPLIANCE_ARTIFACTS`, default `build/test-artifacts`) so CI keeps them.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = os.environ.get("APPLIANCE_CHROMIUM", "/usr/bin/chromium")
VENDOR = Path(__file__).resolve().parent / "vendor"
ARTIFACTS = Path(
    os.environ.get(
        "APPLIANCE_ARTIFACTS", Path(__file__).resolve().parents[2] / "build" / "test-artifacts"
    )
)
# The machine's network is closed: without these Chromium tries Google's hosts at every start.
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


def chromium_available() -> bool:
    return shutil.which(CHROMIUM) is not None or Path(CHROMIUM).exists()


@dataclass
class Watched:
    """A page and what went wrong on it: console errors, uncaught exceptions, failed requests."""

    page: Any
    errors: list[str] = field(default_factory=list)

    def assert_clean(self) -> None:
        assert not self.errors, "browser errors:\n" + "\n".join(self.errors)


@pytest.fixture(scope="module", name="browser")
def browser_fixture() -> Iterator[Any]:
    """One Chromium per test module (each test opens its own context). Not per session: sync
    Playwright keeps an event loop running while it is open, and pytest-asyncio's tests after
    it would fail with "Runner.run() cannot be called from a running event loop"."""
    if not chromium_available():
        pytest.fail(f"Chromium not found at {CHROMIUM} (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        instance = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            yield instance
        finally:
            instance.close()


def page_for(browser: Any, **context_options: Any) -> Watched:
    """A fresh context and page whose console errors and failed requests are collected."""
    context = browser.new_context(**context_options)
    page = context.new_page()
    watched = Watched(page)
    page.on(
        "console",
        lambda msg: (
            watched.errors.append(f"console.{msg.type}: {msg.text}")
            if msg.type == "error"
            else None
        ),
    )
    page.on("pageerror", lambda exc: watched.errors.append(f"pageerror: {exc}"))
    page.on(
        "requestfailed",
        lambda req: watched.errors.append(f"requestfailed: {req.url} {req.failure}"),
    )
    return watched


def axe_violations(page: Any, *, impacts: tuple[str, ...] = ("serious", "critical")) -> list[Any]:
    """axe-core's violations of the given impacts on the page as it is now."""
    page.add_script_tag(path=str(VENDOR / "axe.min.js"))
    result = page.evaluate("async () => await axe.run(document)")
    return [v for v in result["violations"] if v.get("impact") in impacts]


def screenshot(page: Any, name: str) -> Path:
    """Save a full-page PNG as a test artifact; returns its path."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
