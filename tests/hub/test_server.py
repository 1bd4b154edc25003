"""The hub's HTTP API over real loopback HTTP: auth, publishing, rollouts, telemetry, ranges."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

from appliance.hub.service import in_percent

from .conftest import HubEnv


# -- auth ------------------------------------------------------------------------------------
async def test_routes_need_the_right_credential(env: HubEnv) -> None:
    dev1 = await env.enroll("dev1")
    dev2 = await env.enroll("dev2")
    c = env.client
    # No token, or a wrong one: 401 everywhere but /healthz.
    assert (await c.get("/healthz")).status == 200
    for path in (
        "/api/v1/device/assignments",
        "/api/v1/admin/devices",
        "/tuf/metadata/timestamp.json",
        "/metrics",
    ):
        assert (await c.get(path)).status == 401, path
        resp = await c.get(path, headers=env.bearer("not-a-token"))
        assert resp.status == 401, path
        assert "error" in await resp.json()
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    # A device token on admin routes: 403, including another device's events.
    for path in ("/api/v1/admin/devices", "/api/v1/admin/devices/dev2/events", "/metrics"):
        resp = await c.get(path, headers=env.bearer(dev1))
        assert resp.status == 403, path
    resp = await c.post(
        "/api/v1/admin/devices", json={"device_id": "evil"}, headers=env.bearer(dev1)
    )
    assert resp.status == 403
    # The admin token is not a device token.
    assert (await c.get("/api/v1/device/assignments", headers=env.admin())).status == 403
    # X-Device-Id, when sent, must name the token's own device.
    h = {**env.bearer(dev1), "X-Device-Id": "dev2"}
    assert (await c.get("/api/v1/device/assignments", headers=h)).status == 403
    h = {**env.bearer(dev1), "X-Device-Id": "dev1"}
    assert (await c.get("/api/v1/device/assignments", headers=h)).status == 200
    # Each token reads its own device's assignments only.
    body = await (await c.get("/api/v1/device/assignments", headers=env.bearer(dev2))).json()
    assert body["device_id"] == "dev2"
    # Only the token's hash is stored.
    stored = env.hub.store.device("dev1")
    assert stored is not None
    assert stored.token_hash == hashlib.sha256(dev1.encode()).hexdigest()
    if env.hub.config.on_postgres:
        import psycopg

        with psycopg.connect(env.hub.config.database or "") as conn:
            rows = conn.execute("SELECT devices::text FROM devices").fetchall()
        assert rows and not [r for r in rows if dev1 in r[0]]
    else:
        assert dev1 not in (env.hub.config.db_path.read_bytes().decode("latin-1"))


async def test_enrolment_is_validated(env: HubEnv) -> None:
    c = env.client
    await env.enroll("dev1")
    resp = await c.post("/api/v1/admin/devices", json={"device_id": "dev1"}, headers=env.admin())
    assert resp.status == 409
    for bad in ("../x", "", "a/b", 7, "x" * 65):
        resp = await c.post("/api/v1/admin/devices", json={"device_id": bad}, headers=env.admin())
        assert resp.status == 400, bad
    resp = await c.post("/api/v1/admin/devices", data=b"{not json", headers=env.admin())
    assert resp.status == 400


# -- publishing ------------------------------------------------------------------------------
async def test_publish_conflicts_names_and_limits(hub_factory: Any, samples: Path) -> None:
    env: HubEnv = await hub_factory(max_upload_bytes=4096, max_custom_bytes=2048)
    model = samples / "sample.onnx"
    assert model.stat().st_size <= 4096
    status, body = await env.publish("sample", "1", model)
    assert status == 201 and body["new"] is True
    status, body = await env.publish("sample", "1", model)  # same bytes: a no-op
    assert status == 200 and body["new"] is False
    status, body = await env.publish("sample", "1", samples / "multi_io.onnx")
    assert status == 409 and "already published" in body["error"]
    for name, version in (("../etc", "1"), ("sample", "1/../../x"), ("sample", ".hidden")):
        status, body = await env.publish(name, version, model)
        assert status == 400, (name, version)
    big = samples.parent / "big.onnx"
    big.write_bytes(model.read_bytes() + b"\0" * 5000)
    status, body = await env.publish("sample", "9", big)
    assert status == 413 and "4096" in body["error"]
    status, body = await env.publish("sample", "2", model, acceptance="[{]")
    assert status == 400 and "acceptance" in body["error"]
    status, body = await env.publish("sample", "2", model, acceptance='[{"inputs": 1}]')
    assert status == 400
    cases = [{"inputs": [{"name": "x", "data": [0.5] * 500}], "outputs": []}]
    status, body = await env.publish("sample", "2", model, acceptance=json.dumps(cases))
    assert status == 413 and "2048" in body["error"]
    # Nothing half-published: one target, one artifact, no leftovers in tmp.
    assert [t.path for t in env.hub.store.targets()] == ["sample/1/model.onnx"]
    files = [p for p in (env.hub.config.data_dir / "artifacts").rglob("*") if p.is_file()]
    assert len(files) == 1
    assert not [p for p in env.hub.config.tmp_dir.iterdir()]


async def test_a_pipeline_is_published_checked(env: HubEnv, tmp_path: Path) -> None:
    """A declaration is published as name/version/pipeline.json, its inputs signed as the
    manifest (whatever manifest the client sent); a broken one is a 400 naming what is wrong."""
    decl = {
        "kind": "pipeline",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
        "nodes": [{"name": "m", "model": "sample", "inputs": {"input": "request.x"}}],
        "outputs": [{"name": "p", "source": "m.probabilities"}],
    }
    path = tmp_path / "iris.pipeline.json"
    path.write_text(json.dumps(decl))
    status, body = await env.publish("iris", "1", path, manifest='{"steps": {"x": 1}}')
    assert status == 201, body
    (target,) = env.hub.store.targets()
    assert target.path == "iris/1/pipeline.json"
    custom = target.custom["appliance"]
    assert custom["backend"] == "pipeline"
    assert json.loads(custom["manifest"]) == {"inputs": decl["inputs"]}
    bad = {**decl, "nodes": [{"name": "m", "step": {"type": "no_such_step"},
                              "inputs": {"x": "request.x"}}]}  # fmt: skip
    path.write_text(json.dumps(bad))
    status, body = await env.publish("iris", "2", path)
    assert status == 400 and "no_such_step" in body["error"], body
    path.write_text(json.dumps({**decl, "templates": {"md": "report.md.j2"}}))
    status, body = await env.publish("iris", "3", path)
    assert status == 400 and "templates" in body["error"], body
    path.write_text("{not json")
    status, body = await env.publish("iris", "4", path)
    assert status == 400 and "not valid JSON" in body["error"], body
    assert [t.path for t in env.hub.store.targets()] == ["iris/1/pipeline.json"]


# -- targets and ranges ----------------------------------------------------------------------
async def test_targets_are_served_with_ranges(env: HubEnv, samples: Path) -> None:
    token = await env.enroll("dev1")
    model = samples / "sample.onnx"
    data = model.read_bytes()
    await env.publish("sample", "1", model)
    digest = hashlib.sha256(data).hexdigest()
    url = f"/tuf/targets/sample/1/{digest}.model.onnx"
    h = env.bearer(token)
    resp = await env.client.get(url, headers=h)
    assert resp.status == 200 and await resp.read() == data
    assert resp.headers["Accept-Ranges"] == "bytes"
    resp = await env.client.get(url, headers={**h, "Range": "bytes=100-"})
    assert resp.status == 206
    assert await resp.read() == data[100:]
    assert resp.headers["Content-Range"] == f"bytes 100-{len(data) - 1}/{len(data)}"
    resp = await env.client.get(url, headers={**h, "Range": "bytes=10-19"})
    assert resp.status == 206 and await resp.read() == data[10:20]
    resp = await env.client.get(url, headers={**h, "Range": "bytes=-5"})
    assert resp.status == 206 and await resp.read() == data[-5:]
    resp = await env.client.get(url, headers={**h, "Range": f"bytes={len(data)}-"})
    assert resp.status == 416
    assert resp.headers["Content-Range"] == f"bytes */{len(data)}"
    # Only the exact published hash and name are served.
    for bad in (
        f"/tuf/targets/sample/1/{'0' * 64}.model.onnx",
        f"/tuf/targets/sample/2/{digest}.model.onnx",
        f"/tuf/targets/sample/1/{digest}.other.onnx",
        "/tuf/targets/sample/1/model.onnx",
        "/tuf/targets/../hub.db",
        "/tuf/targets/%2E%2E/%2E%2E/admin.token",
    ):
        resp = await env.client.get(bad, headers=h)
        # 403: the client normalised the dots away and a device may not read other routes.
        assert resp.status in (403, 404), bad
        assert "error" in await resp.json()


# -- rollouts and assignments ----------------------------------------------------------------
async def _publish_two(env: HubEnv, samples: Path) -> None:
    for v, f in (("1", "sample.onnx"), ("2", "fp16.onnx")):
        status, body = await env.publish("sample", v, samples / f)
        assert status == 201, body


async def test_rollout_targets_all_group_and_devices(env: HubEnv, samples: Path) -> None:
    await _publish_two(env, samples)
    a = await env.enroll("a", "lab")
    b = await env.enroll("b", "field")
    c = await env.enroll("c", "field")
    await env.rollout("sample", "1", {"all": True})
    assert [await env.assignments(t) for t in (a, b, c)] == [{"sample": "1"}] * 3
    await env.rollout("sample", "2", {"group": "field"})
    assert [await env.assignments(t) for t in (a, b, c)] == [
        {"sample": "1"},
        {"sample": "2"},
        {"sample": "2"},
    ]
    await env.rollout("sample", "1", {"devices": ["c"]})
    assert await env.assignments(c) == {"sample": "1"}
    resp = await env.client.get("/api/v1/device/assignments", headers=env.bearer(c))
    body = await resp.json()
    assert body["models"][0]["target"] == "sample/1/model.onnx"
    assert body["models"][0]["rollout"] == "r3"
    assert body["poll_interval_s"] == 60
    # Bad rollouts are refused.
    for bad in (
        {"model": "sample", "version": "3", "target": {"all": True}},
        {"model": "sample", "version": "1", "target": {"all": False}},
        {"model": "sample", "version": "1", "target": {"devices": []}},
        {"model": "sample", "version": "1", "target": {"all": True}, "percent": 101},
        {"model": "sample", "version": "1", "target": {"all": True}, "percent": "50"},
    ):
        resp = await env.client.post("/api/v1/admin/rollouts", json=bad, headers=env.admin())
        assert resp.status in (400, 404), bad


async def test_assignments_etag_gives_304(env: HubEnv, samples: Path) -> None:
    await _publish_two(env, samples)
    token = await env.enroll("dev1")
    await env.rollout("sample", "1", {"all": True})
    h = env.bearer(token)
    resp = await env.client.get("/api/v1/device/assignments", headers=h)
    etag = resp.headers["ETag"]
    resp = await env.client.get("/api/v1/device/assignments", headers={**h, "If-None-Match": etag})
    assert resp.status == 304 and await resp.read() == b""
    await env.rollout("sample", "2", {"all": True})
    resp = await env.client.get("/api/v1/device/assignments", headers={**h, "If-None-Match": etag})
    assert resp.status == 200 and resp.headers["ETag"] != etag


async def test_halt_keeps_running_devices_and_rollback_restores_previous(
    env: HubEnv, samples: Path
) -> None:
    await _publish_two(env, samples)
    a = await env.enroll("a")
    b = await env.enroll("b")
    await env.rollout("sample", "1", {"all": True})
    r2 = await env.rollout("sample", "2", {"all": True})
    # a installed version 2 before the halt; b had not yet.
    await env.telemetry(
        a,
        [
            {
                "seq": 1,
                "time": "t",
                "kind": "activated",
                "data": {"model": "sample", "version": "2", "previous": "1"},
            }
        ],
    )
    resp = await env.client.post(f"/api/v1/admin/rollouts/{r2}/halt", headers=env.admin())
    assert resp.status == 200 and (await resp.json())["state"] == "halted"
    assert await env.assignments(a) == {"sample": "2"}
    assert await env.assignments(b) == {"sample": "1"}
    resp = await env.client.post(f"/api/v1/admin/rollouts/{r2}/halt", headers=env.admin())
    assert resp.status == 409
    resp = await env.client.post(f"/api/v1/admin/rollouts/{r2}/rollback", headers=env.admin())
    assert resp.status == 200 and (await resp.json())["state"] == "rolled_back"
    assert await env.assignments(a) == {"sample": "1"}
    assert await env.assignments(b) == {"sample": "1"}
    # The fleet view shows a's pending downgrade until it reports version 1 active.
    devices = {
        d["device_id"]: d
        for d in await (await env.client.get("/api/v1/admin/devices", headers=env.admin())).json()
    }
    assert devices["a"]["active"] == {"sample": "2"}
    assert devices["a"]["pending"] == {"sample": "1"}
    assert devices["b"]["pending"] == {"sample": "1"}
    assert devices["a"]["last_seen"] is not None
    resp = await env.client.post("/api/v1/admin/rollouts/r99/halt", headers=env.admin())
    assert resp.status == 404


def test_percentage_membership_matches_the_ratio_and_is_stable() -> None:
    ids = [f"device-{i:04d}" for i in range(1000)]
    for percent in (5, 20, 50, 90):
        n = sum(in_percent("r7", d, percent) for d in ids)
        p = percent / 100
        sigma = math.sqrt(len(ids) * p * (1 - p))
        assert abs(n - len(ids) * p) < 4 * sigma, (percent, n)
    # Growing a staged rollout never drops a device that was in.
    for d in ids:
        if in_percent("r7", d, 20):
            assert in_percent("r7", d, 50)
    assert not any(in_percent("r7", d, 0) for d in ids)
    assert all(in_percent("r7", d, 100) for d in ids)
    # Another rollout picks another subset.
    first = {d for d in ids if in_percent("r7", d, 30)}
    second = {d for d in ids if in_percent("r8", d, 30)}
    assert first != second


async def test_percent_rollout_over_the_api(env: HubEnv, samples: Path) -> None:
    await _publish_two(env, samples)
    tokens = {f"d{i}": await env.enroll(f"d{i}") for i in range(40)}
    await env.rollout("sample", "1", {"all": True})
    rid = await env.rollout("sample", "2", {"all": True}, percent=25)
    got = {d: (await env.assignments(t))["sample"] for d, t in tokens.items()}
    expected = {d: "2" if in_percent(rid, d, 25) else "1" for d in tokens}
    assert got == expected
    resp = await env.client.post(
        f"/api/v1/admin/rollouts/{rid}/percent", json={"percent": 100}, headers=env.admin()
    )
    assert resp.status == 200
    assert {(await env.assignments(t))["sample"] for t in tokens.values()} == {"2"}


# -- telemetry -------------------------------------------------------------------------------
def _events(seqs: range, kind: str = "metrics") -> list[dict[str, Any]]:
    return [
        {"seq": s, "time": f"2026-11-22T05:00:{s % 60:02d}Z", "kind": kind, "data": {"n": s}}
        for s in seqs
    ]


async def test_telemetry_is_stored_once_in_order(env: HubEnv) -> None:
    token = await env.enroll("dev1")
    other = await env.enroll("dev2")
    assert await env.telemetry(token, _events(range(1, 4))) == {
        "stored": 3,
        "duplicates": 0,
        "max_seq": 3,
    }
    # A retried batch with new events after it (the device never saw the first answer).
    assert await env.telemetry(token, _events(range(1, 6))) == {
        "stored": 2,
        "duplicates": 3,
        "max_seq": 5,
    }
    # Out of order and with a gap: stored, listed back in seq order.
    assert (await env.telemetry(token, _events(range(9, 7, -1))))["stored"] == 2
    assert (await env.telemetry(token, _events(range(6, 8))))["max_seq"] == 9
    await env.telemetry(other, _events(range(1, 3)))
    resp = await env.client.get("/api/v1/admin/devices/dev1/events", headers=env.admin())
    rows = await resp.json()
    assert [e["seq"] for e in rows] == list(range(1, 10))
    assert rows[0]["data"] == {"n": 1} and rows[0]["kind"] == "metrics"
    resp = await env.client.get(
        "/api/v1/admin/devices/dev1/events?after=7&limit=1", headers=env.admin()
    )
    assert [e["seq"] for e in await resp.json()] == [8]
    resp = await env.client.get("/api/v1/admin/devices/nobody/events", headers=env.admin())
    assert resp.status == 404
    metrics = await (await env.client.get("/metrics", headers=env.admin())).text()
    assert "appliance_hub_events_stored_total 11.0" in metrics
    assert "appliance_hub_events_duplicate_total 3.0" in metrics
    assert "appliance_hub_devices 2.0" in metrics


async def test_telemetry_limits_and_validation(env: HubEnv) -> None:
    token = await env.enroll("dev1")
    h = env.bearer(token)
    post = env.client.post
    resp = await post(
        "/api/v1/device/telemetry", json={"events": _events(range(1, 502))}, headers=h
    )
    assert resp.status == 413 and "500" in (await resp.json())["error"]
    huge = [{"seq": 1, "time": "t", "kind": "metrics", "data": {"x": "y" * (1 << 20)}}]
    resp = await post("/api/v1/device/telemetry", json={"events": huge}, headers=h)
    assert resp.status == 413
    bad: Any
    for bad in (
        {"events": [{"seq": 0, "time": "t", "kind": "k"}]},
        {"events": [{"seq": "1", "time": "t", "kind": "k"}]},
        {"events": [{"seq": 1, "time": "t", "kind": "bad kind!"}]},
        {"events": [{"seq": 1, "time": "t", "kind": "k", "data": []}]},
        {"events": [{"seq": 1, "time": "t", "kind": "k"}, {"seq": 1, "time": "t", "kind": "k"}]},
        {"events": "nope"},
        [],
    ):
        resp = await post("/api/v1/device/telemetry", data=json.dumps(bad), headers=h)
        assert resp.status == 400, bad
    assert env.hub.store.max_seq("dev1") == 0  # a refused batch stores nothing
    # The hub keeps serving after bad input.
    assert (await env.telemetry(token, _events(range(1, 2))))["stored"] == 1


async def test_device_state_follows_its_events(env: HubEnv) -> None:
    token = await env.enroll("dev1")
    await env.telemetry(
        token,
        [
            {
                "seq": 1,
                "time": "t1",
                "kind": "activated",
                "data": {"model": "sample", "version": "1", "previous": None},
            },
            {
                "seq": 2,
                "time": "t2",
                "kind": "update_failed",
                "data": {
                    "model": "sample",
                    "version": "2",
                    "stage": "acceptance",
                    "reason": "wrong",
                },
            },
            {
                "seq": 4,
                "time": "t4",
                "kind": "status",
                "data": {
                    "active": {"sample": "1", "llm": "3"},
                    "pending": {},
                    "tuf": "expired",
                    "last_error": "TUF metadata expired",
                },
            },
        ],
    )
    # A late, older event does not overwrite the newer state.
    await env.telemetry(
        token,
        [
            {
                "seq": 3,
                "time": "t3",
                "kind": "activated",
                "data": {"model": "sample", "version": "0"},
            }
        ],
    )
    resp = await env.client.get("/api/v1/admin/devices", headers=env.admin())
    (d,) = await resp.json()
    assert d["active"] == {"sample": "1", "llm": "3"}
    assert d["tuf"] == "expired"
    assert d["last_error"] == "TUF metadata expired"
    assert d["last_seq"] == 4


async def test_concurrent_retries_store_each_event_once(env: HubEnv) -> None:
    import asyncio

    token = await env.enroll("dev1")
    batches = [_events(range(start, start + 20)) for start in range(1, 60, 5)] * 2
    answers = await asyncio.gather(*(env.telemetry(token, b) for b in batches))
    unique = {e["seq"] for b in batches for e in b}
    assert sum(a["stored"] for a in answers) == len(unique)
    assert sum(a["duplicates"] for a in answers) == sum(len(b) for b in batches) - len(unique)
    rows = env.hub.store.events("dev1", 0, 1000)
    assert [e.seq for e in rows] == sorted(unique)


async def test_a_download_cut_short_is_resumed_with_a_range(
    env: HubEnv, tmp_path: Path, caplog: Any
) -> None:
    import asyncio
    import os

    token = await env.enroll("dev1")
    caplog.set_level("INFO", logger="appliance.hub.http")
    blob = tmp_path / "big.onnx"  # not a loadable model: published without inputs/outputs
    blob.write_bytes(os.urandom(32 << 20))
    env.hub.publish("big", "1", blob)
    digest = hashlib.sha256(blob.read_bytes()).hexdigest()
    path = f"/tuf/targets/big/1/{digest}.model.onnx"
    host, port = env.client.server.host, env.client.server.port
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
    )
    await writer.drain()
    got = await reader.read(64 << 10)
    assert got.startswith(b"HTTP/1.1 200")
    writer.transport.abort()  # the device loses its link mid-download
    await asyncio.sleep(1.0)
    resp = await env.client.get(path, headers={**env.bearer(token), "Range": "bytes=4194304-"})
    assert resp.status == 206
    assert await resp.read() == blob.read_bytes()[4 << 20 :]
    # Neither the cut (ConnectionResetError) nor a cancelled handler is an unhandled error.
    assert not [r for r in caplog.records if "unhandled" in r.getMessage()]
