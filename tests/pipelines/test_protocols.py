"""A pipeline to its clients is a KServe v2 model: tritonclient.http and MQTT, answers and a
broken node's error naming it."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.api.test_mqtt import DEVICE, body, mqtt_settings, peers  # noqa: F401
from tests.pipelines.conftest import declare
from tests.pipelines.test_execution import FAN, _broken
from tests.pipelines.test_execution import body as infer_body
from tests.support.mosquitto import mosquitto_factory_fixture, mosquitto_fixture  # noqa: F401

PICKY = {
    "kind": "pipeline",
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, -1]}],
    "nodes": [
        {
            "name": "a",
            "step": {"type": "t_identity"},
            "inputs": {"x": "request.x"},
            "fan_out": True,
        },
        {"name": "reshape", "model": "picky", "inputs": {"x": "a.x"}},
    ],
    "outputs": [{"name": "y", "source": "reshape.y"}],
}


def _triton(url: str, x: np.ndarray[Any, Any], name: str, binary: bool) -> dict[str, Any]:
    client = httpclient.InferenceServerClient(url)
    try:
        meta = client.get_model_metadata(name)
        i = httpclient.InferInput("x", list(x.shape), "FP32")
        i.set_data_from_numpy(x, binary_data=binary)
        result = client.infer(name, [i])
        out = {o["name"]: result.as_numpy(o["name"]) for o in meta["outputs"]}
        try:
            client.infer("crash", [i])
            error = ""
        except InferenceServerException as exc:
            error = str(exc.message())
        return {"meta": meta, "outputs": out, "ready": client.is_model_ready(name),
                "error": error}  # fmt: skip
    finally:
        client.close()


async def test_tritonclient(serve, tmp_path: Path):
    client = await serve(declare(tmp_path, {"fan": FAN, "crash": _broken("crash", False)}))
    url = f"127.0.0.1:{client.server.port}"
    x = np.arange(20, dtype=np.float32).reshape(5, 4)
    for binary in (True, False):
        got = await asyncio.to_thread(_triton, url, x, "fan", binary)
        assert got["ready"]
        assert got["meta"]["platform"] == "pipeline"
        np.testing.assert_allclose(got["outputs"]["z"], x * 2 + 1)
        np.testing.assert_allclose(got["outputs"]["half"], (x * 2 + 1) / 2)
        assert got["outputs"]["s"].shape == (5, 1)
        assert "pipeline 'crash' node 'broken': step 't_fail' failed" in got["error"]


async def test_mqtt_answers_and_names_a_broken_node(mosquitto, serve, peers, tmp_path: Path):  # noqa: F811
    overrides = declare(tmp_path, {"fan": FAN, "pk": PICKY})
    client = await serve({**overrides, **mqtt_settings(mosquitto)})
    peer = peers(mosquitto)
    replies = await peer.ready()
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    cases = [("fan", infer_body(x), 200), ("pk", infer_body(np.ones((2, 3), np.float32)), 500)]
    for i, (name, request, code) in enumerate(cases):
        r = await client.post(f"/v2/models/{name}/infer", json=request)
        expected = await r.json()
        assert r.status == code
        corr = f"p-{i}".encode()
        peer.publish(f"appliance/{DEVICE}/infer/{name}", body(request), response_topic=replies,
                     correlation=corr)  # fmt: skip
        reply = await peer.reply(replies, corr)
        assert reply.status == code
        if code == 200:
            assert reply.json() == expected
        else:
            assert reply.json()["error"] == expected["error"]
            assert expected["error"].startswith(
                "pipeline 'pk' node 'reshape' (model 'picky' version 1) row 0: "
            )
