"""The fleet dashboard in headless Chromium against a real `appliance hub serve` during a staged
rollout to several devices (driven through the hub's device API as their agents would): the
numbers shown match the JSON API, the rollout actions work from the page, the page refuses
without the token, no console errors, axe finds nothing serious; screenshots are kept."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.browser import (
    axe_violations,
    browser_fixture,  # noqa: F401 (the fixture `browser`)
    page_for,
    screenshot,
)
from tests.sync.conftest import Hub, http_json

GROUPS = {"n1": "north", "n2": "north", "n3": "north", "s1": "south", "s2": "south", "s3": "south"}
INPUT = {"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}
CASES = [{"inputs": [INPUT], "outputs": [{"name": "label", "shape": [1], "datatype": "INT64",
                                          "data": [0]}]}]  # fmt: skip
NONE = "\N{EN DASH}"  # what the page shows for an empty field


class Fleet:
    """A served hub, six enrolled devices reporting through the device API."""

    def __init__(self, hub: Hub, tokens: dict[str, str]) -> None:
        self.hub = hub
        self.tokens = tokens
        self.seq = dict.fromkeys(tokens, 0)

    def report(self, device: str, kind: str, **data: Any) -> None:
        self.seq[device] += 1
        event = {
            "seq": self.seq[device],
            "kind": kind,
            "time": "2026-12-07T10:00:00Z",
            "data": data,
        }
        http_json(
            self.hub.url + "/api/v1/device/telemetry",
            "POST",
            {"events": [event]},
            self.tokens[device],
        )

    def poll(self, device: str) -> Any:
        return http_json(self.hub.url + "/api/v1/device/assignments", token=self.tokens[device])


@pytest.fixture
def fleet(tmp_path: Path, samples: Path) -> Iterator[Fleet]:
    hub = Hub(tmp_path / "hub")
    cases = tmp_path / "cases.json"
    cases.write_text(json.dumps(CASES))
    hub.publish("iris", samples / "sample.onnx", "1", "--acceptance", str(cases))
    hub.publish("iris", samples / "multi_io.onnx", "2")
    hub.start()
    try:
        tokens = {}
        for device, group in GROUPS.items():
            out = hub.admin("POST", "/api/v1/admin/devices", {"device_id": device, "group": group})
            tokens[device] = out["token"]
        f = Fleet(hub, tokens)
        for device in GROUPS:
            f.report(device, "status", active={"iris": "1"}, pending={}, tuf="ok")
        # Version 2 staged to the south group first.
        rollout = {"model": "iris", "version": "2", "target": {"group": "south"}, "percent": 100}
        hub.admin("POST", "/api/v1/admin/rollouts", rollout)
        for device in GROUPS:
            f.poll(device)
        f.report("s1", "activated", model="iris", version="2")
        f.report("s2", "status", active={"iris": "1"}, pending={"iris": "2"}, tuf="ok")
        f.report("s3", "rolled_back", model="iris", **{"from": "2", "to": "1"}, reason="errors")
        # What an agent sends when a version fails to load: a failed update, then a rollback.
        f.report("n3", "update_failed", model="iris", version="2", stage="load", reason="no")
        f.report("n3", "rolled_back", model="iris", **{"from": "2", "to": "1"}, reason="no")
        yield f
    finally:
        hub.stop()


def _open(browser: Any, url: str, token: str | None) -> Any:
    # bypass_csp: axe-core is injected as an inline script, which the page's CSP refuses.
    watched = page_for(browser, viewport={"width": 1280, "height": 900}, bypass_csp=True)
    page = watched.page
    page.goto(url + "/")
    if token is not None:
        page.fill("#token", token)
        page.click("#login-form button[type=submit]")
        page.wait_for_selector("body[data-loaded]")
    return watched


def _loads(page: Any) -> int:
    return int(page.evaluate("document.body.dataset.loaded || '0'"))


def _reload_data(page: Any) -> None:
    """Wait for the page's next refresh (at most 5 s) so it shows what the API says now."""
    n = _loads(page)
    page.wait_for_function(f"Number(document.body.dataset.loaded) > {n}", timeout=15000)


def _check_rollouts_match_api(page: Any, hub: Hub) -> list[dict[str, Any]]:
    progress: list[dict[str, Any]] = hub.admin("GET", "/api/v1/admin/rollouts/progress")
    for r in progress:
        card = page.locator(f"article[data-rollout='{r['rollout']}']")
        assert card.locator("[data-field=state]").inner_text() == r["state"].replace("_", " ")
        assert card.locator("[data-field=percent]").inner_text() == f"{r['percent']} %"
        for g in [*r["groups"], {**r["total"], "group": "*"}]:
            row = card.locator(f"tr[data-group='{g['group']}']")
            for key in ("devices", "waiting", "downloading", "active", "failed", "rolled_back"):
                shown = row.locator(f"td[data-count={key}]").inner_text()
                assert shown == str(g[key]), (r["rollout"], g["group"], key, shown, g)
            rate = row.locator("td[data-count=error_rate]").inner_text()
            assert rate == f"{100 * g['error_rate']:.1f} %"
    return progress


def test_the_dashboard_shows_the_fleet_and_drives_rollouts(browser: Any, fleet: Fleet) -> None:
    hub = fleet.hub
    # Without the token: a prompt, no data.
    watched = _open(browser, hub.url, None)
    page = watched.page
    page.wait_for_selector("#login:not([hidden])")
    assert page.locator("#devices tbody tr").count() == 0
    assert axe_violations(page) == []
    watched.assert_clean()
    # A wrong token: refused, the prompt says so.
    page.fill("#token", "not-the-token")
    page.click("#login-form button[type=submit]")
    page.wait_for_selector("#login:not([hidden])")
    page.wait_for_function("document.querySelector('#login-reason').textContent.length > 0")
    assert "refused" in page.inner_text("#login-reason")
    assert page.evaluate("sessionStorage.getItem('appliance-hub-token')") is None
    screenshot(page, "hub-dashboard-login")
    # Chromium logs every 401 answer as a console error: the only errors allowed here.
    assert all("401" in e for e in watched.errors), watched.errors
    assert watched.errors
    page.context.close()

    watched = _open(browser, hub.url, hub.admin_token)
    page = watched.page
    # Devices: every one, as the API lists it.
    devices = {d["device_id"]: d for d in hub.admin("GET", "/api/v1/admin/devices")}
    rows = page.locator("#devices tbody tr")
    assert rows.count() == len(GROUPS)
    for device_id, d in devices.items():
        row = page.locator(f"#devices tr[data-device='{device_id}']")
        cells = row.locator("td").all_inner_texts()
        assert cells[0] == device_id and cells[1] == d["group"]
        assert cells[3] == (", ".join(f"{m} {v}" for m, v in d["active"].items()) or NONE)
        assert cells[4] == (", ".join(f"{m} {v}" for m, v in d["pending"].items()) or NONE)
        assert cells[5] == (d["last_error"] or NONE)
        assert row.locator(".seen-fresh").count() == 1  # reported seconds ago
    assert devices["n1"]["pending"] == {} and devices["s2"]["pending"] == {"iris": "2"}
    page.fill("#device-search", "south")
    assert page.locator("#devices tbody tr").count() == 3
    page.click("#devices tr[data-device='s3'] button")
    page.wait_for_selector("#timeline:not([hidden])")
    kinds = [k.inner_text() for k in page.locator("#events li strong").all()]
    assert kinds == ["rolled_back", "status"]  # newest first
    assert axe_violations(page) == []
    screenshot(page, "hub-dashboard-devices")

    # Rollouts: the numbers against the JSON API.
    page.click("nav a[data-view=rollouts]")
    page.wait_for_selector("#view-rollouts:not([hidden])")
    (r1,) = _check_rollouts_match_api(page, hub)
    south = {g["group"]: g for g in r1["groups"]}["south"]
    assert (south["active"], south["downloading"], south["rolled_back"]) == (1, 1, 1)

    # Create: version 2 to 20 % of the north group, from the form.
    page.select_option("#ro-model", label="iris 2")
    page.select_option("#ro-kind", "group")
    page.fill("#ro-value", "north")
    page.fill("#ro-percent", "20")
    page.click("#create-rollout button[type=submit]")
    page.wait_for_selector("article[data-rollout='r2']")
    r2 = hub.admin("GET", "/api/v1/admin/rollouts")[-1]
    assert (r2["rollout"], r2["target"], r2["percent"], r2["state"]) == (
        "r2", {"group": "north"}, 20, "active")  # fmt: skip
    # Grow it to 100 %: all of north selected (n3 already failed version 2).
    card = page.locator("article[data-rollout='r2']")
    card.locator("input[type=number]").fill("100")
    _reload_data(page)  # a refresh while the operator types keeps what they typed, and focus
    assert card.locator("input[type=number]").input_value() == "100"
    assert page.evaluate("document.activeElement.id") == "pct-r2"
    card.locator("[data-action=percent]").click()
    page.wait_for_function(
        "document.querySelector(\"article[data-rollout='r2'] [data-field=percent]\")"
        ".textContent === '100 %'"
    )
    assert hub.admin("GET", "/api/v1/admin/rollouts")[-1]["percent"] == 100
    for device in ("n1", "n2"):
        assert fleet.poll(device)["models"][0]["version"] == "2"
    fleet.report("n1", "activated", model="iris", version="2")
    _reload_data(page)
    progress = _check_rollouts_match_api(page, hub)
    assert {g["group"]: g for g in progress[0]["groups"]}["north"]["active"] == 1
    screenshot(page, "hub-dashboard-rollouts")

    # Halt r2, after confirming.
    page.locator("article[data-rollout='r2'] [data-action=halt]").click()
    page.wait_for_selector("#confirm[open]")
    assert axe_violations(page) == []
    page.click("#confirm-ok")
    page.wait_for_selector("article[data-rollout='r2'].state-halted")
    assert hub.admin("GET", "/api/v1/admin/rollouts")[-1]["state"] == "halted"
    # Roll back r1: cancelled first (nothing happens), then confirmed.
    # By keyboard: Enter on the button opens the dialog, Escape cancels it.
    page.focus("#rollback-r1")
    page.keyboard.press("Enter")
    page.wait_for_selector("#confirm[open]")
    assert "Roll back rollout r1" in page.inner_text("#confirm-text")
    page.keyboard.press("Escape")
    page.wait_for_selector("#confirm:not([open])", state="hidden")
    assert hub.admin("GET", "/api/v1/admin/rollouts")[0]["state"] == "active"
    page.locator("article[data-rollout='r1'] [data-action=rollback]").click()
    page.click("#confirm-ok")
    page.wait_for_selector("article[data-rollout='r1'].state-rolled_back")
    assert hub.admin("GET", "/api/v1/admin/rollouts")[0]["state"] == "rolled_back"
    assert fleet.poll("s1")["models"] == []  # no earlier rollout for south: nothing assigned
    _check_rollouts_match_api(page, hub)
    assert axe_violations(page) == []
    screenshot(page, "hub-dashboard-rollouts-after")

    # Models with their acceptance cases; metadata expiry.
    page.click("nav a[data-view=models]")
    assert page.locator("#models tbody tr").count() == 2
    shown = page.locator("#models tr[data-model='iris/1'] td[data-field=acceptance]")
    assert shown.inner_text() == "1"
    page.click("#models tr[data-model='iris/1'] button")
    page.wait_for_selector("#model-detail:not([hidden])")
    assert json.loads(page.inner_text("#acceptance")) == [{**CASES[0], "rtol": 1e-4, "atol": 1e-5}]
    assert axe_violations(page) == []
    screenshot(page, "hub-dashboard-models")
    page.click("nav a[data-view=metadata]")
    meta = hub.admin("GET", "/api/v1/admin/metadata")["roles"]
    for role in ("root", "targets", "snapshot", "timestamp"):
        row = page.locator(f"#metadata tr[data-role={role}]")
        assert row.locator("td").first.inner_text() == meta[role]["expires"]
        assert row.locator("td").last.inner_text() == "ok"
    assert page.locator("#warnings p").count() == 0
    assert axe_violations(page) == []
    screenshot(page, "hub-dashboard-metadata")
    watched.assert_clean()
    assert re.fullmatch(r"Updated .+", page.inner_text("#updated"))
    page.context.close()


def test_the_dashboard_warns_of_expiring_metadata(browser: Any, tmp_path: Path) -> None:
    # Timestamp signed for 3.6 s and not re-signed for an hour: it soon runs out.
    hub = Hub(tmp_path / "hub", ["--timestamp-expiry-hours", "0.001"])
    hub.serve_args = ["--refresh-interval", "3600"]
    hub.start()
    try:
        watched = _open(browser, hub.url, hub.admin_token)
        page = watched.page
        page.wait_for_selector("#warnings p", timeout=20000)
        warning = page.inner_text("#warnings p")
        assert warning.startswith("Warning: timestamp metadata "), warning
        assert hub.admin("GET", "/api/v1/admin/metadata")["roles"]["timestamp"]["warning"]
        page.click("nav a[data-view=metadata]")
        state = page.inner_text("#metadata tr[data-role=timestamp] td:last-child")
        assert state in ("expiring soon", "expired")
        assert page.inner_text("#metadata tr[data-role=root] td:last-child") == "ok"
        assert axe_violations(page) == []
        screenshot(page, "hub-dashboard-metadata-warning")
        watched.assert_clean()
        page.context.close()
    finally:
        hub.stop()
