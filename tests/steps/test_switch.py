"""A version switch while a request is inside its model's input steps: the new version takes
the prepared request only if it declares the same steps (Engine._successor)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest

from appliance.registry import Registry
from tests.conftest import ClientFactory
from tests.support.steps import GateStep

GATE = {"input": [{"type": "gate"}]}
BODY = orjson.dumps(
    {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
)


@pytest.fixture
def store(test_steps: None, tmp_path: Path, tflite_models: Path) -> Registry:
    registry = Registry(tmp_path / "store")
    model = tflite_models / "tfl_float.tflite"
    registry.add("m", model, version="1", steps=GATE)
    registry.add("m", model, version="2", steps=GATE, activate=False)
    classify = {"type": "classification", "output": "scores", "top_k": 1}
    registry.add("m", model, version="3", steps={**GATE, "output": [classify]}, activate=False)
    registry.activate("m", "1")
    return registry


async def _switch_during_prepare(client: Any, version: str) -> Any:
    GateStep.entered.clear()
    GateStep.release.clear()
    request = asyncio.ensure_future(client.post("/v2/models/m/infer", data=BODY))
    assert await asyncio.to_thread(GateStep.entered.wait, 10)
    r = await client.post("/v2/repository/models/m/load", json={"parameters": {"version": version}})
    assert r.status == 200, await r.text()
    GateStep.release.set()
    return await request


async def test_a_switch_while_preparing(serve: ClientFactory, store: Registry) -> None:
    client = await serve()  # over `store` (this module's)
    # the same steps: the prepared request runs on the new version
    r = await _switch_during_prepare(client, "2")
    assert r.status == 200, await r.text()
    assert (await r.json())["model_version"] == "2"
    # other steps: refused, so it is sent again rather than half-answered by either
    r = await _switch_during_prepare(client, "3")
    assert r.status == 503
    assert "prepares its inputs differently" in (await r.json())["error"]
    r = await client.post("/v2/models/m/infer", data=BODY)
    body = await r.json()
    assert body["model_version"] == "3"
    assert {o["name"] for o in body["outputs"]} >= {"top_k_indices", "scores"}
