"""The TFLite backend on the real LiteRT runtime, with the .tflite files build/ makes offline:
inspect, dynamic batch, signatures, quantized tensors both ways, the interpreter pool, errors,
and the KServe v2 answers compared with LiteRT run directly."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter

from appliance.backends import detect_backend, get_backend
from appliance.backends.base import LoadContext, Quantization
from appliance.backends.tflite import TfliteBackend, load_runtime, runtime_info
from appliance.config import load_config
from appliance.errors import InvalidInput, ModelError
from appliance.manifest import Manifest
from appliance.registry import Registry
from appliance.server import sources_from_store
from appliance.tensors import TensorSpec
from tests.conftest import ClientFactory
from tests.support.images import litert

Array = np.ndarray[Any, Any]


def load(models: Path, name: str, **settings: Any) -> TfliteBackend:
    """Load `name`.tflite with `settings` as its [models.NAME] table."""
    path = models / f"{name}.tflite"
    signature, _ = TfliteBackend.inspect(path)
    manifest = Manifest(name, "1", "tflite", path.name, "", 0, signature, "", "test")
    config = load_config(None, {"models": {name: settings}}, {}).model_config(name)
    return TfliteBackend(manifest, path, LoadContext(config, models))


def tensor(name: str, datatype: str, value: Any) -> dict[str, Any]:
    """A KServe v2 JSON input."""
    array = np.asarray(value)
    return {"name": name, "datatype": datatype, "shape": list(array.shape),
            "data": array.ravel().tolist()}  # fmt: skip


X1 = [[1.0, 2.0, 3.0, 4.0]]


def rows(n: int, seed: int = 0) -> Array:
    return np.random.default_rng(seed).normal(0, 2, (n, 4)).astype(np.float32)


# -- inspect -----------------------------------------------------------------------------------


def test_inspect_reads_signature_quantization_and_dynamic_batch(tflite_models: Path) -> None:
    sig, params = TfliteBackend.inspect(tflite_models / "tfl_float.tflite")
    # A model with a signature is served under the signature's names.
    assert sig.inputs == (TensorSpec("features", "FP32", (-1, 4)),)
    assert sig.outputs == (
        TensorSpec("logits", "FP32", (-1, 3)),
        TensorSpec("scores", "FP32", (-1, 3)),
    )
    assert params == {"signatures": ["serving_default"]}

    sig, params = TfliteBackend.inspect(tflite_models / "tfl_int8.tflite")
    assert sig.inputs == (TensorSpec("x", "FP32", (-1, 4)),)  # real values by default
    assert sig.outputs == (TensorSpec("y", "FP32", (-1, 3)),)
    assert params["quantization"]["x"] == {
        "datatype": "INT8",
        "scale": pytest.approx(0.05),
        "zero_point": -3,
    }
    assert params["quantization"]["y"]["zero_point"] == 5


def test_detect_by_magic_and_lookup(tflite_models: Path, tmp_path: Path) -> None:
    assert get_backend("tflite") is TfliteBackend
    odd = tmp_path / "model.bin"
    shutil.copyfile(tflite_models / "tfl_float.tflite", odd)
    assert detect_backend(odd) == "tflite"  # b"TFL3" at bytes 4-8, whatever the suffix
    assert "litert" in runtime_info()


def test_a_file_that_is_not_a_model_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"\x1c\x00\x00\x00TFL3" + b"\x00" * 40)
    with pytest.raises(ModelError, match=r"bad\.tflite: litert cannot load bad\.tflite"):
        TfliteBackend.inspect(bad)


def test_tflite_runtime_fallback_reports_what_is_missing() -> None:
    """Where tflite_runtime is not installed, asking for it says so and what to install."""
    try:
        import tflite_runtime  # noqa: F401
    except ImportError:
        with pytest.raises(ModelError, match=r"no TFLite runtime is installed .*ai-edge-litert"):
            load_runtime("tflite_runtime")
    else:  # pragma: no cover - a machine with tflite_runtime
        assert load_runtime("tflite_runtime").name == "tflite_runtime"
    assert load_runtime("auto").name == "litert"


# -- float, dynamic batch, signatures ----------------------------------------------------------


def test_float_matches_litert_at_every_batch_size(tflite_models: Path) -> None:
    backend = load(tflite_models, "tfl_float")
    path = tflite_models / "tfl_float.tflite"
    for n in (1, 5, 2, 5, 1):  # grows, shrinks, and repeats a size (no re-allocation)
        x = rows(n, seed=n)
        out = backend.run({"features": x}, None)
        logits, probs = litert(path, [x])
        assert list(out) == ["logits", "scores"]
        np.testing.assert_array_equal(out["logits"], logits)
        np.testing.assert_array_equal(out["scores"], probs)
        assert out["scores"].shape == (n, 3)
    assert backend.run({"features": rows(2)}, ["scores"]).keys() == {"scores"}


def test_settings_reach_the_interpreter(tflite_models: Path) -> None:
    plain = load(tflite_models, "tfl_float", tflite={"xnnpack": False, "threads": 1})
    assert plain.placement.detail.endswith("builtin kernels, 1 threads")
    fast = load(tflite_models, "tfl_float", tflite={"threads": 2})
    assert "xnnpack, 2 threads" in fast.placement.detail
    x = rows(4)
    np.testing.assert_allclose(
        plain.run({"features": x}, None)["scores"],
        fast.run({"features": x}, None)["scores"],
        rtol=1e-5,
        atol=1e-6,
    )


def test_signature_setting(tflite_models: Path) -> None:
    backend = load(tflite_models, "tfl_float", tflite={"signature": "serving_default"})
    assert backend.signature.inputs[0].name == "features"
    with pytest.raises(ModelError, match=r"tflite.signature = 'nope', but the model's signatures"):
        load(tflite_models, "tfl_float", tflite={"signature": "nope"})
    with pytest.raises(ModelError, match=r"signatures are none"):
        load(tflite_models, "tfl_int8", tflite={"signature": "nope"})


def test_cuda_is_refused_on_the_cpu_only_backend(tflite_models: Path) -> None:
    with pytest.raises(ModelError, match="runs on the CPU"):
        load(tflite_models, "tfl_float", device="cuda")
    assert load(tflite_models, "tfl_float", device="cpu").placement.fallback_reason is None


# -- quantized ---------------------------------------------------------------------------------


def int8_by_hand(models: Path, x: Array) -> Array:
    """The int8 layer in numpy: quantize, integer matmul, requantize (within one step)."""
    interp = Interpreter(model_path=str(models / "tfl_int8.tflite"))
    details = {d["name"]: d for d in interp.get_tensor_details()}
    w = interp.get_tensor(details["w"]["index"]).astype(np.int32)
    b = interp.get_tensor(details["b"]["index"]).astype(np.int32)
    q = np.clip(np.round(x / 0.05) - 3, -128, 127)
    acc = (q + 3) @ w.T + b
    real = acc * (0.05 * 0.02)
    out: Array = (np.clip(np.round(real / 0.1) + 5, -128, 127) - 5) * np.float32(0.1)
    return out


def test_int8_takes_and_gives_real_values(tflite_models: Path) -> None:
    backend = load(tflite_models, "tfl_int8")
    q = Quantization("INT8", 0.05000000074505806, -3)
    assert backend.quantization["x"] == q
    x = rows(6, seed=3)
    out = backend.run({"x": x}, None)["y"]
    assert out.dtype == np.float32 and out.shape == (6, 3)
    # Exactly what LiteRT gives for the same quantized input, dequantized by hand.
    (raw,) = litert(tflite_models / "tfl_int8.tflite", [q.quantize(x)])
    np.testing.assert_array_equal(out, (raw.astype(np.float32) - 5) * np.float32(0.1))
    # And the layer's arithmetic by hand, within one output step.
    np.testing.assert_allclose(out, int8_by_hand(tflite_models, x), atol=0.1 + 1e-6)
    # Values out of range are clamped, as the model's own quantization would.
    big = backend.run({"x": np.full((1, 4), 1e6, np.float32)}, None)["y"]
    np.testing.assert_array_equal(
        big, backend.run({"x": np.full((1, 4), 6.5, np.float32)}, None)["y"]
    )


def test_uint8_both_directions(tflite_models: Path) -> None:
    backend = load(tflite_models, "tfl_uint8")
    assert [t.datatype for t in backend.signature.inputs] == ["FP32", "FP32"]
    assert [t.datatype for t in backend.signature.outputs] == ["FP32", "FP32"]
    u = np.array([[-64.0, 0.0, 0.5, 63.5]], np.float32)  # exactly representable: 0.5 steps
    f = np.array([[-25.0, 0.0, 1.25, 38.75]], np.float32)
    out = backend.run({"u": u, "f": f}, None)
    np.testing.assert_array_equal(out["real"], u)  # quantize then DEQUANTIZE: the same values
    np.testing.assert_array_equal(out["q"], f)  # QUANTIZE then dequantized by the backend


def test_dequantize_off_exposes_the_raw_tensors(tflite_models: Path) -> None:
    backend = load(tflite_models, "tfl_int8", tflite={"dequantize": False})
    assert backend.signature.inputs == (TensorSpec("x", "INT8", (-1, 4)),)
    assert backend.signature.outputs == (TensorSpec("y", "INT8", (-1, 3)),)
    assert backend.quantization == {}
    q = np.array([[-128, -3, 0, 127], [1, 2, 3, 4]], np.int8)
    out = backend.run({"x": q}, None)["y"]
    (raw,) = litert(tflite_models / "tfl_int8.tflite", [q])
    assert out.dtype == np.int8
    np.testing.assert_array_equal(out, raw)


# -- one interpreter per concurrent run --------------------------------------------------------


def test_concurrent_runs_each_get_their_own_interpreter(tflite_models: Path) -> None:
    backend = load(tflite_models, "tfl_float", tflite={"threads": 1})
    path = tflite_models / "tfl_float.tflite"
    inputs = [rows(1 + i % 4, seed=i) for i in range(8)]
    expected = [litert(path, [x])[1] for x in inputs]
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def worker(k: int) -> None:
        try:
            barrier.wait()
            for _ in range(25):
                for i in range(k, len(inputs), 4):
                    got = backend.run({"features": inputs[i]}, ["scores"])["scores"]
                    np.testing.assert_array_equal(got, expected[i])
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert 1 <= backend.instances <= 4  # made on demand, never more than runs at once


def test_a_rejected_shape_leaves_the_interpreter_usable(tflite_models: Path) -> None:
    backend = load(tflite_models, "tfl_int8")
    with pytest.raises(InvalidInput, match="the model rejected the input"):
        backend.run({"x": np.zeros((2, 5), np.float32)}, None)  # not a dynamic dimension
    x = rows(2)
    np.testing.assert_array_equal(
        backend.run({"x": x}, None)["y"], load(tflite_models, "tfl_int8").run({"x": x}, None)["y"]
    )


# -- over KServe v2 HTTP -----------------------------------------------------------------------


async def test_kserve_v2_answers_equal_litert(
    serve: ClientFactory, image_store: Registry, tflite_models: Path
) -> None:
    client = await serve(sources=sources_from_store(image_store.root))
    meta = await (await client.get("/v2/models/tfl_float")).json()
    assert meta["platform"] == "tensorflow_lite"
    assert meta["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, 4]}]
    x = rows(3, seed=9)
    body = {"inputs": [tensor("features", "FP32", x)]}
    r = await client.post("/v2/models/tfl_float/infer", json=body)
    assert r.status == 200, await r.text()
    outs = {o["name"]: o for o in (await r.json())["outputs"]}
    logits, probs = litert(tflite_models / "tfl_float.tflite", [x])
    assert outs["scores"]["shape"] == [3, 3] and outs["scores"]["datatype"] == "FP32"
    np.testing.assert_array_equal(np.array(outs["logits"]["data"], np.float32), logits.ravel())
    np.testing.assert_array_equal(np.array(outs["scores"]["data"], np.float32), probs.ravel())


async def test_kserve_v2_raw_quantized_on_request(
    serve: ClientFactory, image_store: Registry, tflite_models: Path
) -> None:
    client = await serve(sources=sources_from_store(image_store.root))
    meta = await (await client.get("/v2/models/tfl_int8")).json()
    assert meta["parameters"]["quantization"]["x"]["datatype"] == "INT8"
    q = np.array([[-128, -3, 0, 127], [10, -20, 30, -40]], np.int8)
    body = {
        "inputs": [{"name": "x", "datatype": "INT8", "shape": [2, 4], "data": q.ravel().tolist()}],
        "parameters": {"raw_quantized": True},
    }
    r = await client.post("/v2/models/tfl_int8/infer", json=body)
    assert r.status == 200, await r.text()
    (out,) = (await r.json())["outputs"]
    (raw,) = litert(tflite_models / "tfl_int8.tflite", [q])
    assert out["datatype"] == "INT8"
    assert out["data"] == raw.ravel().tolist()
    # The same input as real values gives the same answer as real values.
    real = Quantization("INT8", 0.05000000074505806, -3).dequantize(q)
    body = {"inputs": [tensor("x", "FP32", real)]}
    (out,) = (await (await client.post("/v2/models/tfl_int8/infer", json=body)).json())["outputs"]
    assert out["datatype"] == "FP32"
    np.testing.assert_allclose(out["data"], (raw.ravel() - 5) * 0.1, rtol=1e-6)


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (
            {"inputs": [{"name": "x", "datatype": "INT8", "shape": [1, 4], "data": [1, 2, 3, 4]}]},
            400,
            "input 'x': the model expects datatype FP32, got INT8",
        ),
        (
            {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]},
            400,
            "input 'x': shape [1, 3] does not match the model's [-1, 4]",
        ),
        (
            {
                "inputs": [
                    {"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}
                ],
                "parameters": {"raw_quantized": True},
            },
            400,
            "input 'x': with raw_quantized the model takes INT8",
        ),
        (
            {
                "inputs": [
                    {"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}
                ],
                "parameters": {"raw_quantized": "yes"},
            },
            400,
            "parameter raw_quantized must be true or false",
        ),
    ],
)
async def test_kserve_v2_errors(
    serve: ClientFactory, image_store: Registry, body: Any, status: int, message: str
) -> None:
    client = await serve(sources=sources_from_store(image_store.root))
    r = await client.post("/v2/models/tfl_int8/infer", json=body)
    assert r.status == status
    assert message in (await r.json())["error"]
    ok = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
    assert (await client.post("/v2/models/tfl_int8/infer", json=ok)).status == 200
    # A model with no quantized tensors: raw and real are the same, the parameter changes nothing.
    r = await client.post(
        "/v2/models/tfl_float/infer",
        json={
            "inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 4], "data": [1] * 4}],
            "parameters": {"raw_quantized": True},
        },
    )
    assert r.status == 200


@pytest.mark.parametrize("name", ["tfl_float", "tfl_int8"])
def test_bench_floor_is_litert_directly_with_the_same_answers(
    tflite_models: Path, name: str
) -> None:
    backend = load(tflite_models, name)
    spec = backend.signature.inputs[0]
    x = {spec.name: rows(3, seed=4)}
    call, names = backend.bare_call(x)
    assert names == [t.name for t in backend.signature.outputs]
    want = backend.run(x, None)
    for _ in range(2):  # the same interpreter, called again
        for got, expected in zip(call(), want.values(), strict=True):
            np.testing.assert_array_equal(got, expected)


def test_serve_one_tflite_file(tflite_models: Path) -> None:
    """`appliance serve --model FILE.tflite` in its own process, no store."""
    import json
    import urllib.request

    from tests.conftest import start_server_process, stop_server_process

    server = start_server_process(["--model", str(tflite_models / "tfl_float.tflite")])
    try:
        x = rows(2, seed=5)
        body = json.dumps({"inputs": [tensor("features", "FP32", x)]}).encode()
        request = urllib.request.Request(
            f"http://{server.url}/v2/models/tfl_float/infer", data=body, method="POST"
        )
        with urllib.request.urlopen(request, timeout=30) as r:
            outs = {o["name"]: o for o in json.loads(r.read())["outputs"]}
        _, probs = litert(tflite_models / "tfl_float.tflite", [x])
        np.testing.assert_array_equal(np.array(outs["scores"]["data"], np.float32), probs.ravel())
    finally:
        assert stop_server_process(server) == 0
