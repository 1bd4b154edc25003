"""Pipelines served over HTTP by the real server, with real ONNX models and test steps."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from appliance.api.http import ENGINE, ROUTER
from tests.pipelines.conftest import declare

INPUT = [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
CHAIN = {
    "kind": "pipeline",
    "inputs": INPUT,
    "nodes": [
        {"name": "a", "model": "double", "inputs": {"x": "request.x"}},
        {"name": "b", "model": "addone", "inputs": {"y": "a.y"}},
    ],
    "outputs": [{"name": "z", "source": "b.z"}, {"name": "y", "source": "a.y"}],
}
FAN = {
    "kind": "pipeline",
    "inputs": INPUT,
    "nodes": [
        {"name": "split", "step": {"type": "t_identity"}, "inputs": {"x": "request.x"},
         "fan_out": True},
        {"name": "a", "model": "double", "inputs": {"x": "split.x"}},
        {"name": "b", "model": "addone", "inputs": {"y": "a.y"}},
        {"name": "t", "model": "top", "inputs": {"z": "b.z"}},
        {"name": "scale", "step": {"type": "t_scale", "factor": 0.5}, "inputs": {"x": "b.z"},
         "gather": "split"},
    ],
    "outputs": [{"name": "z", "source": "b.z"}, {"name": "s", "source": "t.s"},
                {"name": "half", "source": "scale.y"}],
}  # fmt: skip


def body(x: np.ndarray[Any, Any], **extra: Any) -> dict[str, Any]:
    return {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape),
                    "data": x.reshape(-1).tolist()}],
        **extra,
    }  # fmt: skip


def outputs(answer: dict[str, Any]) -> dict[str, np.ndarray[Any, Any]]:
    return {
        o["name"]: np.array(o["data"], dtype=np.float32).reshape(o["shape"])
        for o in answer["outputs"]
    }


async def infer(client: Any, name: str, payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    r = await client.post(f"/v2/models/{name}/infer", json=payload)
    return r.status, await r.json()


async def metric(client: Any, pattern: str) -> float:
    text = await (await client.get("/metrics")).text()
    m = re.search(pattern + r" ([0-9.e+-]+)", text)
    assert m is not None, pattern
    return float(m.group(1))


async def test_a_chain_of_two_models(serve, tmp_path: Path):
    client = await serve(declare(tmp_path, {"chain": CHAIN}))
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    status, answer = await infer(client, "chain", body(x, id="r1"))
    assert status == 200, answer
    got = outputs(answer)
    np.testing.assert_allclose(got["z"], x * 2 + 1)
    np.testing.assert_allclose(got["y"], x * 2)
    assert answer["model_name"] == "chain" and answer["id"] == "r1"
    # only what the client asked for
    status, answer = await infer(client, "chain", body(x, outputs=[{"name": "y"}]))
    assert [o["name"] for o in answer["outputs"]] == ["y"]
    status, answer = await infer(client, "chain", body(x, outputs=[{"name": "q"}]))
    assert status == 400 and "unknown output 'q'" in answer["error"]
    # the pipeline's own inputs are checked like a model's
    bad = {"inputs": [{"name": "x", "datatype": "INT64", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
    status, answer = await infer(client, "chain", bad)
    assert status == 400 and "datatype" in answer["error"]

    meta = await (await client.get("/v2/models/chain")).json()
    assert meta["platform"] == "pipeline"
    assert meta["inputs"] == INPUT
    assert meta["outputs"] == [
        {"name": "z", "datatype": "FP32", "shape": [-1, 4]},
        {"name": "y", "datatype": "FP32", "shape": [-1, 4]},
    ]
    assert [n["name"] for n in meta["parameters"]["nodes"]] == ["a", "b"]
    assert meta["parameters"]["nodes"][1] == {"name": "b", "model": "addone",
                                              "inputs": {"y": "a.y"}}  # fmt: skip
    assert (await client.get("/v2/models/chain/ready")).status == 200
    index = await (await client.post("/v2/repository/index")).json()
    assert {"name": "chain", "version": "1", "state": "READY"} in index
    assert await metric(client, r'appliance_step_seconds_count\{model="chain",step="b"\}') == 2
    assert (
        await metric(
            client,
            r'appliance_pipeline_requests_total\{outcome="success",pipeline="chain",version="1"\}',
        )
        == 2
    )


BAD_INPUTS = [
    [{"name": "x", "datatype": "INT64", "shape": [1, 4], "data": [1, 2, 3, 4]}],
    [{"name": "x", "datatype": "FP64", "shape": [1, 4], "data": [1, 2, 3, 4]}],
    [{"name": "x", "datatype": "FP32", "shape": [1, 5], "data": [1, 2, 3, 4, 5]}],
    [{"name": "x", "datatype": "FP32", "shape": [4], "data": [1, 2, 3, 4]}],
    [{"name": "q", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}],
    [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]},
     {"name": "q", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}],
    [{"name": "x", "datatype": "BYTES", "shape": [1], "data": ["abcd"]}],
    [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, "NaN", 4]}],
    [],
]  # fmt: skip


async def test_a_chain_checks_its_inputs_once_with_the_same_messages(serve, tmp_path: Path):
    """A chain whose first model checks the pipeline's inputs skips its own check; every
    malformed request still gets the answer a chain that checks first gives (the first node
    pinned to a version: looked up per request, so the pipeline checks)."""
    nodes: list[dict[str, Any]] = CHAIN["nodes"]  # type: ignore[assignment]
    pinned = {**CHAIN, "nodes": [{**nodes[0], "version": "1"}, nodes[1]]}
    client = await serve(declare(tmp_path, {"chain": CHAIN, "pinned": pinned}))
    served = client.server.app[ROUTER].pipelines
    plans = {name: served.entries[name].plan for name in ("chain", "pinned")}
    assert all(plan is None for plan in plans.values())  # bound on the first request
    ok = body(np.ones((1, 4), dtype=np.float32))
    assert (await infer(client, "chain", ok))[0] == 200
    assert (await infer(client, "pinned", ok))[0] == 200
    assert served.entries["chain"].plan.first_checks
    assert not served.entries["pinned"].plan.first_checks
    for inputs in BAD_INPUTS:
        skipped = await infer(client, "chain", {"inputs": inputs})
        checked = await infer(client, "pinned", {"inputs": inputs})
        assert skipped[0] == checked[0] == 400, (inputs, skipped, checked)
        assert skipped[1]["error"] == checked[1]["error"].replace("pinned", "chain"), inputs


@pytest.mark.parametrize("rows", [0, 1, 5])
async def test_fan_out_runs_per_row_and_gathers(serve, tmp_path: Path, rows: int):
    client = await serve(declare(tmp_path, {"fan": FAN}))
    x = np.arange(rows * 4, dtype=np.float32).reshape(rows, 4)
    status, answer = await infer(client, "fan", body(x))
    assert status == 200, answer
    got = outputs(answer)
    z = x * 2 + 1
    assert got["z"].shape == (rows, 4)
    np.testing.assert_allclose(got["z"], z)
    assert got["s"].shape == (rows, 1)  # no rows: [0, 1] from the model's spec
    np.testing.assert_allclose(got["s"], z.max(axis=1, keepdims=True) if rows else got["s"])
    np.testing.assert_allclose(got["half"], z * 0.5)  # the gather node ran once on all rows
    assert got["half"].shape == (rows, 4)


async def test_the_rows_of_one_request_are_batched_together(serve, tmp_path: Path):
    client = await serve(declare(tmp_path, {"fan": FAN}))
    x = np.arange(16 * 4, dtype=np.float32).reshape(16, 4)
    status, answer = await infer(client, "fan", body(x))
    assert status == 200, answer
    double = next(m for m in client.server.app[ENGINE].models() if m.name == "double")
    assert double.stats is not None
    calls = sum(double.stats.batch.counts)
    assert 1 <= calls < 16, f"16 rows ran in {calls} runtime calls: they were not merged"
    np.testing.assert_allclose(outputs(answer)["z"], x * 2 + 1)


async def test_when_and_list_sources_per_row(serve, tmp_path: Path):
    doc = {
        "kind": "pipeline",
        "inputs": INPUT,
        "nodes": [
            {"name": "split", "step": {"type": "t_identity"}, "inputs": {"x": "request.x"},
             "fan_out": True},
            {"name": "cheap", "model": "double", "inputs": {"x": "split.x"}},
            {"name": "t", "model": "top", "inputs": {"z": "cheap.y"}},
            {"name": "big", "model": "addone", "inputs": {"y": "cheap.y"},
             "when": {"source": "t.s", "op": "<", "value": 5}},
        ],
        "outputs": [{"name": "answer", "source": ["big.z", "cheap.y"]},
                    {"name": "big_only", "source": "big.z"}],
    }  # fmt: skip
    client = await serve(declare(tmp_path, {"sw": doc}))
    x = np.array([[0, 0, 0, 1], [10, 0, 0, 0], [1, 2, 0, 0]], dtype=np.float32)
    status, answer = await infer(client, "sw", body(x))
    assert status == 200, answer
    got = outputs(answer)
    expected = np.stack([x[0] * 2 + 1, x[1] * 2, x[2] * 2 + 1])
    np.testing.assert_allclose(got["answer"], expected)
    # absent in one row: absent from the answer (its rows would not line up)
    assert "big_only" not in got
    # every row under the threshold: present
    status, answer = await infer(client, "sw", body(x[[0, 2]]))
    assert sorted(outputs(answer)) == ["answer", "big_only"]


def _broken(how: str, optional: bool) -> dict[str, Any]:
    return {
        "kind": "pipeline",
        "inputs": INPUT,
        "nodes": [
            {"name": "a", "model": "double", "inputs": {"x": "request.x"}},
            {"name": "broken", "step": {"type": "t_fail", "how": how},
             "inputs": {"x": "a.y"}, "optional": optional},
        ],
        "outputs": [{"name": "y", "source": "a.y"}, {"name": "never", "source": "broken.never"}],
    }  # fmt: skip


async def test_optional_and_broken_nodes(serve, tmp_path: Path):
    client = await serve(
        declare(
            tmp_path,
            {
                "opt": _broken("crash", True),
                "crash": _broken("crash", False),
                "invalid": _broken("invalid", False),
            },
        )
    )
    x = np.ones((1, 4), dtype=np.float32)
    status, answer = await infer(client, "opt", body(x))
    assert status == 200, answer
    assert [o["name"] for o in answer["outputs"]] == ["y"]
    assert (
        await metric(
            client, r'appliance_pipeline_optional_failures_total\{node="broken",pipeline="opt"\}'
        )
        == 1
    )
    status, answer = await infer(client, "crash", body(x))
    assert status == 500
    assert answer["error"].startswith("pipeline 'crash' node 'broken': step 't_fail' failed")
    assert "RuntimeError: boom" in answer["error"]
    status, answer = await infer(client, "invalid", body(x))
    assert status == 400  # the client's mistake stays a 400
    assert answer["error"] == (
        "pipeline 'invalid' node 'broken' (step 't_fail'): this step refuses its input"
    )
    status, _ = await infer(client, "opt", body(x))  # and the server goes on
    assert status == 200


async def test_a_failing_model_node_names_node_and_version(serve, tmp_path: Path):
    doc = {
        "kind": "pipeline",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, -1]}],
        "nodes": [{"name": "reshape", "model": "picky", "inputs": {"x": "request.x"}}],
        "outputs": [{"name": "y", "source": "reshape.y"}],
    }
    client = await serve(declare(tmp_path, {"pk": doc}))
    status, answer = await infer(client, "pk", body(np.ones((1, 3), dtype=np.float32)))
    assert status == 500, answer
    assert answer["error"].startswith("pipeline 'pk' node 'reshape' (model 'picky' version 1): ")
    status, answer = await infer(client, "pk", body(np.ones((1, 8), dtype=np.float32)))
    assert status == 200 and answer["outputs"][0]["shape"] == [2, 4]


async def test_max_fan_out(serve, tmp_path: Path):
    overrides = declare(tmp_path, {"fan": FAN})
    overrides["pipelines"]["fan"]["max_fan_out"] = 3
    client = await serve(overrides)
    status, answer = await infer(client, "fan", body(np.ones((4, 4), dtype=np.float32)))
    assert status == 400
    assert answer["error"] == (
        "pipeline 'fan' node 'split' (step 't_identity'): fan-out of 4 rows is more than "
        "max_fan_out = 3"
    )
    status, _ = await infer(client, "fan", body(np.ones((3, 4), dtype=np.float32)))
    assert status == 200


async def test_deadline_applies_to_every_node(serve, tmp_path: Path):
    client = await serve(declare(tmp_path, {"chain": CHAIN}))
    x = np.ones((1, 4), dtype=np.float32)
    r = await client.post(
        "/v2/models/chain/infer", json=body(x), headers={"X-Request-Timeout-Ms": "0.000001"}
    )
    assert r.status == 504, await r.text()
    assert "pipeline 'chain' node 'a'" in (await r.json())["error"]


async def test_not_ready_until_its_models_are(serve, tmp_path: Path, store, pipeline_models):
    late = {"name": "late", "model": "later", "inputs": {"z": "b.z"}}
    doc = {**CHAIN, "nodes": [*CHAIN["nodes"], late]}
    client = await serve(declare(tmp_path, {"waits": doc}))
    r = await client.get("/v2/models/waits/ready")
    assert r.status == 503
    assert "model 'later' is not served" in (await r.json())["error"]
    status, answer = await infer(client, "waits", body(np.ones((1, 4), dtype=np.float32)))
    assert status == 503 and "model 'later'" in answer["error"]
    meta = await (await client.get("/v2/models/waits")).json()
    assert meta["parameters"]["status"] == "failed"
    # the model arrives: the pipeline binds to it and serves
    store.add("later", pipeline_models["top"])
    assert (await client.post("/v2/repository/models/later/load")).status == 200
    assert (await client.get("/v2/models/waits/ready")).status == 200
    status, answer = await infer(client, "waits", body(np.ones((1, 4), dtype=np.float32)))
    assert status == 200, answer
    assert (await client.get("/v2/models/nope/ready")).status == 404


async def test_rows_to_a_model_that_does_not_batch_run_one_by_one(serve, tmp_path: Path):
    overrides = declare(tmp_path, {"fan": FAN})
    overrides["models"] = {"double": {"batching": {"enabled": False}}}
    client = await serve(overrides)
    x = np.arange(20, dtype=np.float32).reshape(5, 4)
    status, answer = await infer(client, "fan", body(x))
    assert status == 200, answer
    np.testing.assert_allclose(outputs(answer)["z"], x * 2 + 1)
    double = next(m for m in client.server.app[ENGINE].models() if m.name == "double")
    assert double.stats is not None
    assert sum(double.stats.batch.counts) == 5
    assert double.stats.outcomes["success"] == 5


async def test_an_image_body_goes_to_the_one_bytes_input(serve, tmp_path: Path):
    from tests.support.images import encode, picture

    doc = {
        "kind": "pipeline",
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [-1]}],
        "nodes": [{"name": "n", "step": {"type": "t_size"}, "inputs": {"data": "request.image"}}],
        "outputs": [{"name": "size", "source": "n.size"}],
    }
    client = await serve(declare(tmp_path, {"img": doc, "chain": CHAIN}))
    png = encode(picture(20, 10, 1), "PNG")
    r = await client.post("/v2/models/img/infer", data=png, headers={"Content-Type": "image/png"})
    answer = await r.json()
    assert r.status == 200, answer
    assert answer["outputs"][0]["data"] == [len(png)]
    r = await client.post("/v2/models/chain/infer", data=png, headers={"Content-Type": "image/png"})
    assert r.status == 415
    assert "takes no images" in (await r.json())["error"]
