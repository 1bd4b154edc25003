"""The dashboard's JSON (rollout progress per group, metadata expiry, a version's acceptance
cases) and its static files, on a hub served over loopback HTTP."""

from __future__ import annotations

import asyncio
import gzip
import json
from pathlib import Path
from typing import Any

from appliance.hub.server import UI_FILES

from .conftest import HubEnv

CASES = [{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.5]}],
          "outputs": [{"name": "y", "shape": [1], "datatype": "FP32", "data": [3.0]}]}]  # fmt: skip


async def _status(env: HubEnv, token: str, seq: int, **data: Any) -> None:
    await env.telemetry(token, [{"seq": seq, "kind": "status", "time": "t", "data": data}])


async def test_rollout_progress_counts_each_device_once_per_group(
    env: HubEnv, tmp_path: Path
) -> None:
    model, model2 = tmp_path / "m1.onnx", tmp_path / "m2.onnx"
    model.write_bytes(b"\x08\x07" + b"\0" * 64)
    model2.write_bytes(b"\x08\x07" + b"\1" * 64)
    status, _ = await env.publish(
        "iris", "1", model, backend="onnx", manifest="{}", acceptance=json.dumps(CASES)
    )
    assert status == 201
    status, _ = await env.publish("iris", "2", model2, backend="onnx", manifest="{}")
    assert status == 201
    tokens = {}
    for i, group in enumerate(["north", "north", "north", "south", "south"]):
        tokens[f"d{i}"] = await env.enroll(f"d{i}", group)
    for t in tokens.values():
        await _status(env, t, 1, active={"iris": "1"})
    rid = await env.rollout("iris", "2", {"all": True}, 100)
    await env.telemetry(tokens["d0"], [{"seq": 2, "kind": "activated", "time": "t",
                                        "data": {"model": "iris", "version": "2"}}])  # fmt: skip
    await _status(env, tokens["d1"], 2, active={"iris": "1"}, pending={"iris": "2"})
    await env.telemetry(tokens["d2"], [{"seq": 2, "kind": "update_failed", "time": "t",
        "data": {"model": "iris", "version": "2", "stage": "load", "reason": "bad"}},
        {"seq": 3, "kind": "rolled_back", "time": "t",
         "data": {"model": "iris", "from": "2", "to": "1", "reason": "bad"}}])  # fmt: skip
    await env.telemetry(tokens["d3"], [{"seq": 2, "kind": "rolled_back", "time": "t",
        "data": {"model": "iris", "from": "2", "to": "1", "reason": "errors"}}])  # fmt: skip
    # d4 has not polled since: waiting

    resp = await env.client.get("/api/v1/admin/rollouts/progress", headers=env.admin())
    assert resp.status == 200
    (r,) = await resp.json()
    assert r["rollout"] == rid and r["state"] == "active" and r["percent"] == 100
    groups = {g["group"]: g for g in r["groups"]}
    assert groups["north"] == {"group": "north", "devices": 3, "waiting": 0, "downloading": 1,
        "active": 1, "failed": 1, "rolled_back": 0, "error_rate": round(1 / 3, 4)}  # fmt: skip
    assert groups["south"] == {"group": "south", "devices": 2, "waiting": 1, "downloading": 0,
        "active": 0, "failed": 0, "rolled_back": 1, "error_rate": 0.5}  # fmt: skip
    assert r["total"]["devices"] == 5 and r["total"]["error_rate"] == 0.4

    # Refused for good (failed, or rolled back) is not pending; being worked on is.
    resp = await env.client.get("/api/v1/admin/devices", headers=env.admin())
    pending = {d["device_id"]: d["pending"] for d in await resp.json()}
    assert pending == {"d0": {}, "d1": {"iris": "2"}, "d2": {}, "d3": {}, "d4": {"iris": "2"}}

    # A halt keeps counting the devices that run it; a device token cannot read this.
    await env.client.post(f"/api/v1/admin/rollouts/{rid}/halt", headers=env.admin())
    resp = await env.client.get("/api/v1/admin/rollouts/progress", headers=env.admin())
    (r,) = await resp.json()
    assert r["state"] == "halted" and r["total"]["active"] == 1
    resp = await env.client.get("/api/v1/admin/rollouts/progress", headers=env.bearer(tokens["d0"]))
    assert resp.status == 403

    resp = await env.client.get("/api/v1/admin/models/iris/1", headers=env.admin())
    detail = await resp.json()
    assert detail["acceptance"][0]["inputs"] == CASES[0]["inputs"]
    assert detail["backend"] == "onnx" and detail["target"] == "iris/1/model.onnx"
    resp = await env.client.get("/api/v1/admin/models/iris/9", headers=env.admin())
    assert resp.status == 404 and "not published" in (await resp.json())["error"]
    resp = await env.client.get("/api/v1/admin/models", headers=env.admin())
    listed = {m["version"]: m for m in await resp.json()}
    assert listed["1"]["backend"] == "onnx" and listed["1"]["acceptance_cases"] == 1
    assert listed["2"]["acceptance_cases"] == 0


async def test_metadata_expiry_flags_a_role_close_to_its_end(hub_factory: Any) -> None:
    from appliance.hub.repository import Expiry

    # timestamp signed for 2 s and not re-signed: it soon expires, the others are far off.
    env: HubEnv = await hub_factory(resign=False, expiry=Expiry(timestamp=2.0))

    async def roles() -> dict[str, Any]:
        resp = await env.client.get("/api/v1/admin/metadata", headers=env.admin())
        assert resp.status == 200
        out: dict[str, Any] = (await resp.json())["roles"]
        return out

    first = await roles()
    assert set(first) == {"root", "targets", "snapshot", "timestamp"}
    assert not first["root"]["warning"] and first["root"]["lifetime_s"] == 365 * 86400
    assert 364 * 86400 < first["root"]["seconds_left"] <= 365 * 86400
    for _ in range(50):
        now = await roles()
        if now["timestamp"]["expired"]:
            break
        await asyncio.sleep(0.1)
    assert now["timestamp"]["expired"] and now["timestamp"]["warning"]
    assert not now["snapshot"]["warning"]
    resp = await env.client.get("/api/v1/admin/metadata")
    assert resp.status == 401


async def test_dashboard_files_are_served_without_token_and_only_those(env: HubEnv) -> None:
    resp = await env.client.get("/")
    assert resp.status == 200 and resp.content_type == "text/html"
    html = await resp.text()
    assert 'src="ui/app.js"' in html  # relative: works under any proxy prefix
    assert "default-src 'self'" in resp.headers["Content-Security-Policy"]
    for name in UI_FILES:
        resp = await env.client.get(f"/ui/{name}")
        assert resp.status == 200, name
    for path in ("/ui/../server.py", "/ui/%2e%2e%2fserver.py", "/ui/nope.js", "/ui/"):
        resp = await env.client.get(path)
        assert resp.status in (401, 404), path
    # The data stays behind the token.
    resp = await env.client.get("/api/v1/admin/devices")
    assert resp.status == 401


def test_the_dashboard_weighs_under_150_kb_compressed() -> None:
    total = sum(len(gzip.compress(p.read_bytes(), 9)) for p in UI_FILES.values())
    assert set(UI_FILES) >= {"index.html", "app.js", "api.js", "dom.js", "style.css"}
    assert total <= 150 * 1024, total
