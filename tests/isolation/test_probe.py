"""The first load of a model file happens in a child process: a runtime that crashes on a file
fails that model's load, naming the signal, and the server serves the others."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from appliance.registry import Registry
from appliance.server import source_from_file, sources_from_store

from .conftest import add_crashy

SAMPLE = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
PROBE = {"model_defaults": {"probe_first_load": True}}
PROBED = "loaded in a test process first"


async def ready_error(client, name: str) -> str:
    r = await client.get(f"/v2/models/{name}/ready")
    assert r.status == 503
    error: str = (await r.json())["error"]
    return error


@pytest.mark.parametrize("isolation", ["none", "process"])
async def test_a_crash_on_load_fails_that_model_and_the_server_serves_on(
    serve, store: Registry, plugin: None, tmp_path: Path, isolation: str
) -> None:
    add_crashy(store, tmp_path, "bomb", b"crash on load: a file the runtime chokes on")
    client = await serve({"model_defaults": {"probe_first_load": True, "isolation": isolation}})
    error = await ready_error(client, "bomb")
    assert "died from signal 11 (SIGSEGV)" in error, error
    if isolation == "none":
        assert "while loading model.bin in a test process" in error, error
    else:  # the worker's own load is the first load
        assert "the worker process died from signal 11 (SIGSEGV) while loading" in error, error
    r = await client.post("/v2/models/sample/infer", json=SAMPLE)
    assert r.status == 200
    r = await client.get("/v2/health/ready")
    assert r.status == 503 and "bomb: failed" in (await r.json())["error"]


async def test_a_malformed_onnx_file_fails_with_the_runtime_s_message(
    serve, store: Registry, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07\x12\x04junk" + bytes(range(256)))
    client = await serve(PROBE, [source_from_file(bad, "bad"), *sources_from_store(store.root)])
    error = await ready_error(client, "bad")
    assert "onnxruntime cannot load bad.onnx" in error, error
    assert (await client.post("/v2/models/sample/infer", json=SAMPLE)).status == 200


async def test_a_file_is_probed_once_then_remembered_by_its_sha256(
    serve, store: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="appliance.isolation")
    client = await serve(PROBE)
    assert (await client.post("/v2/models/sample/infer", json=SAMPLE)).status == 200
    probed = [r for r in caplog.records if PROBED in r.getMessage()]
    assert len(probed) == len(store.names())
    markers = sorted(p.name for p in (store.root / ".cache" / "probed").iterdir())
    assert markers == sorted(store.active(n).manifest.sha256 for n in store.names())
    caplog.clear()
    await serve(PROBE)  # a restart: nothing is probed again
    assert not [r for r in caplog.records if PROBED in r.getMessage()]


async def test_probing_can_be_switched_off(serve, store: Registry, caplog) -> None:
    caplog.set_level(logging.INFO, logger="appliance.isolation")
    await serve({"model_defaults": {"probe_first_load": False}})
    assert not [r for r in caplog.records if PROBED in r.getMessage()]
    assert not (store.root / ".cache" / "probed").exists()
