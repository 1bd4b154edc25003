"""Zero-downtime version switches: under load no request fails, in-flight work finishes on the
old version, a bad version changes nothing. Real HTTP, real onnxruntime, a real process for
SIGHUP."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import urllib.request
from pathlib import Path

import orjson
import pytest

from appliance.api.http import ENGINE
from appliance.engine import ModelSource
from appliance.manifest import Manifest
from appliance.registry import Registry
from tests.conftest import start_server_process, stop_server_process
from tests.support.gated import SIGNATURE, GatedBackend

SAMPLE_REQ = {
    "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [5.1, 3.5, 1.4, 0.2]}]
}
GATED_REQ = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1, 2]}]}


def _load(version: str) -> dict[str, object]:
    return {"parameters": {"version": version}}


async def test_switch_under_load_fails_no_request(serve, store: Registry, samples: Path):
    store.add("sample", samples / "sample.onnx", version="2", activate=False)
    client = await serve()
    statuses: list[int] = []
    versions: set[str] = set()
    stop = asyncio.Event()

    async def hammer() -> None:
        while not stop.is_set():
            r = await client.post("/v2/models/sample/infer", json=SAMPLE_REQ)
            statuses.append(r.status)
            if r.status == 200:
                versions.add((await r.json())["model_version"])

    workers = [asyncio.ensure_future(hammer()) for _ in range(4)]
    try:
        for i in range(10):
            version = "2" if i % 2 == 0 else "1"
            r = await client.post("/v2/repository/models/sample/load", json=_load(version))
            assert r.status == 200, await r.text()
            assert (await r.json()) == {"name": "sample", "version": version, "state": "READY"}
            assert store.entry("sample").active == version
            before = len(statuses)
            while len(statuses) < before + 20:  # let some traffic reach this version
                await asyncio.sleep(0.005)
    finally:
        stop.set()
        await asyncio.gather(*workers)
    assert len(statuses) > 200
    assert set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
    assert versions == {"1", "2"}
    meta = await (await client.get("/v2/models/sample")).json()
    assert meta["versions"] == ["1"]
    index = await (await client.post("/v2/repository/index")).json()
    assert [m for m in index if m["name"] == "sample"] == [
        {"name": "sample", "version": "1", "state": "READY"}
    ]


async def test_in_flight_request_finishes_on_the_old_version(serve, gated, tmp_path):
    client = await serve({}, gated)
    engine = client.app[ENGINE]
    first = asyncio.ensure_future(client.post("/v2/models/gated/infer", json=GATED_REQ))
    assert await asyncio.to_thread(GatedBackend.started.acquire, True, 10)
    f = tmp_path / "gated2.bin"
    f.write_bytes(b"")
    v2 = Manifest("gated", "2", "gated", f.name, "", 0, SIGNATURE, "", "test")
    switch = asyncio.ensure_future(engine.activate(ModelSource(v2, f, verify=False)))
    for _ in range(500):  # the switch happens while version 1 still runs the first request
        if engine.model("gated").version == "2":
            break
        await asyncio.sleep(0.01)
    assert engine.model("gated").version == "2"
    assert not switch.done(), "the old version must drain before it unloads"
    GatedBackend.gate.set()
    r = await first
    assert r.status == 200 and (await r.json())["model_version"] == "1"
    await switch
    r = await client.post("/v2/models/gated/infer", json=GATED_REQ)
    assert (await r.json())["model_version"] == "2"


async def test_a_version_that_fails_to_load_changes_nothing(serve, store, samples):
    mv = store.add("sample", samples / "sample.onnx", version="2", activate=False)
    os.chmod(mv.file, 0o644)
    mv.file.write_bytes(mv.file.read_bytes()[:-10] + b"0123456789")  # tampered after adding
    client = await serve()
    r = await client.post("/v2/repository/models/sample/load", json=_load("2"))
    assert r.status == 500
    error = (await r.json())["error"]
    assert "version 2 failed to load" in error and "sha256" in error
    assert "still serves" in error
    assert store.entry("sample").active == "1"
    r = await client.post("/v2/models/sample/infer", json=SAMPLE_REQ)
    assert r.status == 200 and (await r.json())["model_version"] == "1"


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        (b"{", 400, "not valid JSON"),
        (b'{"parameters": [1]}', 400, "expected"),
        (b'{"parameters": {"version": [1]}}', 400, "must be a string"),
        (b'{"parameters": {"version": "7"}}', 404, "no version '7'"),
        (b'{"parameters": {"version": "../x"}}', 400, "version"),
    ],
)
async def test_bad_load_requests(serve, body, status, fragment):
    client = await serve()
    r = await client.post("/v2/repository/models/sample/load", data=body)
    assert r.status == status, await r.text()
    assert fragment in (await r.json())["error"]
    r = await client.post("/v2/models/sample/infer", json=SAMPLE_REQ)
    assert r.status == 200


async def test_unload_and_load_again(serve):
    client = await serve()
    r = await client.post("/v2/repository/models/sample/unload")
    assert r.status == 200
    r = await client.post("/v2/models/sample/infer", json=SAMPLE_REQ)
    assert r.status == 404
    assert (await client.post("/v2/repository/models/sample/unload")).status == 404
    r = await client.post("/v2/repository/models/sample/load")
    assert r.status == 200 and (await r.json())["version"] == "1"
    assert (await client.post("/v2/models/sample/infer", json=SAMPLE_REQ)).status == 200


async def test_load_needs_a_store(serve, gated):
    client = await serve({}, gated)
    r = await client.post("/v2/repository/models/gated/load")
    assert r.status == 400 and "not a model store" in (await r.json())["error"]


def _served_version(url: str) -> str:
    with urllib.request.urlopen(f"http://{url}/v2/models/sample", timeout=5) as r:
        return str(orjson.loads(r.read())["versions"][0])


def test_sighup_serves_the_stores_active_versions(tmp_path, samples):
    registry = Registry(tmp_path / "models")
    registry.add("sample", samples / "sample.onnx")
    server = start_server_process(["--models", str(registry.root)])
    try:
        assert _served_version(server.url) == "1"
        registry.add("sample", samples / "sample.onnx", version="2")  # activates it in the store
        os.kill(server.proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 30
        while _served_version(server.url) != "2" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _served_version(server.url) == "2"
        assert server.proc.poll() is None
        # the log line comes once the reload is done, and is read by another thread
        while not any("reload: sample/2" in line for line in server.lines):
            assert time.monotonic() < deadline, server.lines[-20:]
            time.sleep(0.05)
    finally:
        assert stop_server_process(server) == 0
