"""A model that does not fit in memory (`max_memory_mb`, RLIMIT_AS on the child process that
loads it) fails to load with a reason that says so, while the other models serve.

The model that does not fit is an ONNX graph whose 1.5 GiB initializer lives in a sparse
external data file: no disk is used, and onnxruntime needs the whole of it in memory to load.
It is only ever loaded under the limit, in a child."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from appliance.config import load_config
from appliance.engine import ModelSource
from appliance.errors import ConfigError
from appliance.manifest import Manifest
from appliance.server import source_from_file
from appliance.tensors import Signature, TensorSpec

WEIGHTS = 384 << 20  # float32 elements: 1.5 GiB
REQ = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}


def too_big(where: Path) -> ModelSource:
    """The model, and its source described by hand (inspecting it would load it here)."""
    with (where / "weights.bin").open("wb") as f:
        f.truncate(WEIGHTS * 4)  # sparse: reads as zeros, takes no blocks
    w = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[WEIGHTS])
    w.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "weights.bin"), ("offset", "0"), ("length", str(WEIGHTS * 4))):
        w.external_data.add(key=key, value=value)
    graph = helper.make_graph(
        [
            helper.make_node("ReduceSum", ["w"], ["s"], keepdims=0),
            helper.make_node("Add", ["x", "s"], ["y"]),
        ],
        "too_big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = where / "too_big.onnx"
    onnx.save(model, str(path))
    signature = Signature((TensorSpec("x", "FP32", (1,)),), (TensorSpec("y", "FP32", (1,)),))
    size = path.stat().st_size
    manifest = Manifest("too_big", "1", "onnx", path.name, "", size, signature, "", "test")
    return ModelSource(manifest, path, verify=False)


@pytest.mark.parametrize("isolation", ["none", "process"])
async def test_a_model_over_its_memory_limit_fails_to_load_and_the_others_serve(
    serve, tmp_path: Path, samples: Path, isolation: str
) -> None:
    sources = [source_from_file(samples / "sample.onnx"), too_big(tmp_path)]
    limits = {"max_memory_mb": 1024, "isolation": isolation, "probe_first_load": True}
    client = await serve({"models": {"too_big": limits, "sample": limits}}, sources)
    r = await client.get("/v2/models/too_big/ready")
    assert r.status != 200
    body = await (await client.get("/v2/models/too_big")).json()
    reason = str(body)
    assert "max_memory_mb = 1024 MiB" in reason and "bad_alloc" in reason, reason
    r = await client.post("/v2/models/sample/infer", json=REQ)
    assert r.status == 200  # the same limit leaves room for a model that fits
    assert (await client.get("/v2/health/live")).status == 200


def test_a_limit_needs_a_child_process_to_apply_to() -> None:
    model = {"max_memory_mb": 512, "isolation": "none", "probe_first_load": False}
    with pytest.raises(ConfigError, match="max_memory_mb"):
        load_config(None, {"model_defaults": model}, {})
