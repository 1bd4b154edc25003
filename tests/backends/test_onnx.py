"""The ONNX backend on the real onnxruntime: inspect, run, errors, device choice, settings."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from appliance import device
from appliance.backends import detect_backend, get_backend
from appliance.backends.base import LoadContext
from appliance.backends.onnx import OnnxBackend, providers_for
from appliance.config import OnnxConfig, load_config
from appliance.device import Placement, log_once, settle, want_accelerator
from appliance.errors import InferenceFailed, InvalidInput, ModelError
from appliance.registry import Registry
from appliance.tensors import TensorSpec
from tests.conftest import ClientFactory

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
HAS_GPU = any(p in ort.get_available_providers() for p in GPU_PROVIDERS)
cpu_only = pytest.mark.skipif(HAS_GPU, reason="this onnxruntime offers a GPU provider")

Array = np.ndarray[Any, Any]


def load(store: Registry, name: str, cache_dir: Path, **settings: Any) -> OnnxBackend:
    """Load the active version of `name` with `settings` as its [models.NAME] table."""
    mv = store.active(name)
    config = load_config(None, {"models": {name: settings}}, {})
    return OnnxBackend(mv.manifest, mv.file, LoadContext(config.model_config(name), cache_dir))


def reference(path: Path, feed: dict[str, Array]) -> dict[str, Array]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feed), strict=True))


def save(model_dir: Path, name: str, graph: onnx.GraphProto, **props: str) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if props:
        helper.set_model_props(model, props)
    path = model_dir / f"{name}.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def info(name: str, elem: int, shape: list[Any]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def multi_io_feed(x_batch: int = 2, y_batch: int = 2) -> dict[str, Array]:
    return {
        "x": np.arange(x_batch * 3, dtype=np.float32).reshape(x_batch, 3) - 2,
        "y": np.arange(y_batch * 3, dtype=np.int64).reshape(y_batch, 3),
        "pixels": np.arange(8, dtype=np.uint8).reshape(2, 2, 2)[:x_batch],
    }


# -- inspect -----------------------------------------------------------------------------------

Spec = tuple[str, str, tuple[int, ...]]
SIGNATURES: dict[str, tuple[list[Spec], list[Spec]]] = {
    "sample": (
        [("input", "FP32", (-1, 4))],
        [("probabilities", "FP32", (-1, 3)), ("label", "INT64", (-1,))],
    ),
    "multi_io": (
        [("x", "FP32", (-1, 3)), ("y", "INT64", (-1, 3)), ("pixels", "UINT8", (-1, 2, 2))],
        [
            ("sum", "FP32", (-1, 3)),
            ("y_times_2", "INT64", (-1, 3)),
            ("x_positive", "BOOL", (-1, 3)),
            ("pixel_mean", "INT32", (-1,)),
        ],
    ),
    "strings": ([("text", "BYTES", (-1,))], [("echo", "BYTES", (-1,))]),
    "fp16": ([("a", "FP16", (-1, 2))], [("doubled", "FP16", (-1, 2))]),
}


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_inspect_sample_models(samples: Path, name: str) -> None:
    signature, params = OnnxBackend.inspect(samples / f"{name}.onnx")
    inputs, outputs = SIGNATURES[name]
    assert signature.inputs == tuple(TensorSpec(*t) for t in inputs)
    assert signature.outputs == tuple(TensorSpec(*t) for t in outputs)
    assert params == {"producer": "appliance-build"}


def test_inspect_fixed_and_unnamed_dims_and_metadata(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["a"], ["b"])],
        "g",
        [info("a", TensorProto.DOUBLE, [None, 2, 5])],  # None: a dimension with no name at all
        [info("b", TensorProto.DOUBLE, [None, 2, 5])],
    )
    path = save(tmp_path, "fixed", graph, labels="cat,dog", chat_template="{{x}}")
    signature, params = OnnxBackend.inspect(path)
    assert signature.inputs == (TensorSpec("a", "FP64", (-1, 2, 5)),)
    assert signature.outputs == (TensorSpec("b", "FP64", (-1, 2, 5)),)
    # no producer_name: only the metadata
    assert params == {"metadata": {"labels": "cat,dog", "chat_template": "{{x}}"}}


def test_inspect_refuses_types_that_cannot_be_served(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("SequenceLength", ["s"], ["n"])],
        "g",
        [helper.make_tensor_sequence_value_info("s", TensorProto.FLOAT, None)],
        [info("n", TensorProto.INT64, [])],
    )
    with pytest.raises(ModelError) as exc:
        OnnxBackend.inspect(save(tmp_path, "seq", graph))
    assert exc.value.message == "input 's' has type seq(tensor(float)), which cannot be served"


def test_inspect_refuses_a_file_that_is_not_a_model(tmp_path: Path) -> None:
    path = tmp_path / "x.onnx"
    path.write_text("hello")
    with pytest.raises(ModelError, match=r"x\.onnx: onnxruntime cannot load this model: "):
        OnnxBackend.inspect(path)


def test_backend_lookup(samples: Path, tmp_path: Path) -> None:
    assert get_backend("onnx") is OnnxBackend
    assert detect_backend(samples / "sample.onnx") == "onnx"
    with pytest.raises(ModelError, match="unknown backend 'tensorrt'"):
        get_backend("tensorrt")
    with pytest.raises(ModelError, match="cannot read"):
        detect_backend(tmp_path / "missing.onnx")


# -- run ---------------------------------------------------------------------------------------


def test_run_returns_every_output_in_model_order(
    store: Registry, samples: Path, tmp_path: Path
) -> None:
    backend = load(store, "multi_io", tmp_path)
    feed = multi_io_feed()
    out = backend.run(feed, None)
    want = reference(samples / "multi_io.onnx", feed)
    assert list(out) == ["sum", "y_times_2", "x_positive", "pixel_mean"]
    for name, value in want.items():
        assert out[name].dtype == value.dtype, name
        assert np.array_equal(out[name], value), name


def test_run_returns_only_the_requested_outputs(
    store: Registry, samples: Path, tmp_path: Path
) -> None:
    backend = load(store, "multi_io", tmp_path)
    feed = multi_io_feed()
    want = reference(samples / "multi_io.onnx", feed)
    out = backend.run(feed, ["pixel_mean", "sum"])
    assert list(out) == ["pixel_mean", "sum"]  # in the order asked for
    assert np.array_equal(out["pixel_mean"], want["pixel_mean"])
    assert np.array_equal(out["sum"], want["sum"])
    assert list(backend.run(feed, ["x_positive"])) == ["x_positive"]


def test_run_sample_fp16_and_an_empty_batch(store: Registry, samples: Path, tmp_path: Path) -> None:
    sample = load(store, "sample", tmp_path)
    x = np.array([[1, 2, 3, 4], [0, -1, 0.5, 2]], np.float32)
    out = sample.run({"input": x}, None)
    want = reference(samples / "sample.onnx", {"input": x})
    assert np.array_equal(out["probabilities"], want["probabilities"])
    assert np.array_equal(out["label"], want["label"])
    zero = {"input": np.zeros((0, 4), np.float32)}
    empty = sample.run(zero, None)
    assert empty["probabilities"].shape == (0, 3)
    # (onnxruntime's ArgMax gives label the shape (0, 3) here; the backend passes it on as is)
    assert empty["label"].shape == reference(samples / "sample.onnx", zero)["label"].shape

    fp16 = load(store, "fp16", tmp_path)
    out = fp16.run({"a": np.array([[1.5, -2]], np.float16)}, None)
    assert out["doubled"].dtype == np.float16
    assert out["doubled"].tolist() == [[3.0, -4.0]]


def test_string_tensors_round_trip_as_bytes(store: Registry, tmp_path: Path) -> None:
    backend = load(store, "strings", tmp_path)
    text = np.array(["héllo".encode(), b"", b"x y"], dtype=object)
    out = backend.run({"text": text}, None)["echo"]
    assert out.dtype == object and out.shape == (3,)
    assert out.tolist() == ["héllo".encode(), b"", b"x y"]
    assert all(type(v) is bytes for v in out)
    # str elements are accepted too, and come back as UTF-8 bytes
    out = backend.run({"text": np.array(["ünï", "b"], dtype=object)}, None)["echo"]
    assert out.tolist() == ["ünï".encode(), b"b"]


def test_string_input_that_is_not_utf8_is_invalid(store: Registry, tmp_path: Path) -> None:
    backend = load(store, "strings", tmp_path)
    with pytest.raises(InvalidInput, match=r"^input 'text': element 1 is not UTF-8 text$"):
        backend.run({"text": np.array([b"ok", b"\xff\xfe"], dtype=object)}, None)


@pytest.mark.parametrize(
    ("x", "fragment"),
    [
        (np.zeros((2, 4), np.float64), "INVALID_ARGUMENT : Unexpected input data type"),
        (np.zeros((2, 5), np.float32), "INVALID_ARGUMENT : Got invalid dimensions for input"),
        (np.zeros((4,), np.float32), "INVALID_ARGUMENT : Invalid rank for input"),
    ],
)
def test_invalid_argument_from_onnxruntime_is_invalid_input(
    store: Registry, tmp_path: Path, x: Array, fragment: str
) -> None:
    backend = load(store, "sample", tmp_path)
    with pytest.raises(InvalidInput) as exc:
        backend.run({"input": x}, None)
    assert exc.value.message.startswith("the model rejected the input: ")
    assert fragment in exc.value.message
    assert exc.value.status == 400
    # the session is fine afterwards
    assert backend.run({"input": np.zeros((1, 4), np.float32)}, None)["label"].shape == (1,)


def test_inputs_sharing_a_named_dimension_must_agree(store: Registry, tmp_path: Path) -> None:
    """x and y are both [batch, 3]: each passes the per-input checks, together they cannot."""
    backend = load(store, "multi_io", tmp_path)
    with pytest.raises(InvalidInput) as exc:
        backend.run(multi_io_feed(x_batch=2, y_batch=3), None)
    assert exc.value.message == (
        "input 'y' has size 3 in dimension 0 ('batch'), but input 'x' has 2 in dimension 0: "
        "the model names both 'batch', so they must be equal"
    )
    assert backend.run(multi_io_feed(x_batch=1, y_batch=1), None)["sum"].shape == (1, 3)


def test_differently_named_dimensions_may_differ(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Concat", ["a", "b"], ["ab"], axis=0)],
        "g",
        [info("a", TensorProto.FLOAT, ["n", 2]), info("b", TensorProto.FLOAT, ["m", 2])],
        [info("ab", TensorProto.FLOAT, ["k", 2])],
    )
    store = Registry(tmp_path / "models")
    store.add("concat", save(tmp_path, "concat", graph))
    backend = load(store, "concat", tmp_path)
    out = backend.run({"a": np.ones((1, 2), np.float32), "b": np.zeros((3, 2), np.float32)}, None)
    assert out["ab"].tolist() == [[1, 1], [0, 0], [0, 0], [0, 0]]


def test_a_runtime_failure_is_inference_failed(tmp_path: Path) -> None:
    """Shapes the signature allows but the graph cannot compute: a server-side failure."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["c"])],
        "g",
        [info("a", TensorProto.FLOAT, ["n"]), info("b", TensorProto.FLOAT, ["m"])],
        [info("c", TensorProto.FLOAT, ["k"])],
    )
    store = Registry(tmp_path / "models")
    store.add("add", save(tmp_path, "add", graph))
    backend = load(store, "add", tmp_path)
    with pytest.raises(InferenceFailed) as exc:
        backend.run({"a": np.ones(2, np.float32), "b": np.ones(3, np.float32)}, None)
    assert exc.value.message.startswith("onnxruntime failed: ")
    assert exc.value.status == 500
    assert backend.run({"a": np.ones(2, np.float32), "b": np.ones(2, np.float32)}, None)[
        "c"
    ].tolist() == [2, 2]


async def test_named_dimension_mismatch_is_400_over_http(serve: ClientFactory) -> None:
    client = await serve()
    feed = multi_io_feed(x_batch=2, y_batch=3)
    request = {
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": [2, 3], "data": feed["x"].tolist()},
            {"name": "y", "datatype": "INT64", "shape": [3, 3], "data": feed["y"].tolist()},
            {
                "name": "pixels",
                "datatype": "UINT8",
                "shape": [2, 2, 2],
                "data": feed["pixels"].tolist(),
            },
        ]
    }
    r = await client.post("/v2/models/multi_io/infer", json=request)
    assert r.status == 400, await r.text()
    assert r.content_type == "application/json"
    assert "('batch')" in (await r.json())["error"]
    request["inputs"][1] = {"name": "y", "datatype": "INT64", "shape": [2, 3], "data": [1] * 6}
    assert (await client.post("/v2/models/multi_io/infer", json=request)).status == 200


def test_unload_releases_the_session(store: Registry, tmp_path: Path) -> None:
    backend = load(store, "sample", tmp_path)
    assert backend.session is not None
    backend.unload()
    assert backend.session is None


# -- device ------------------------------------------------------------------------------------


@cpu_only
def test_auto_falls_back_to_the_cpu(store: Registry, tmp_path: Path) -> None:
    backend = load(store, "sample", tmp_path, device="auto")
    p = backend.placement
    assert p.device == "cpu"
    assert p.detail == "CPUExecutionProvider"
    assert p.fallback_reason is not None
    assert p.fallback_reason.startswith("onnxruntime offers no GPU execution provider (it has ")
    assert "CPUExecutionProvider" in p.fallback_reason
    assert not (tmp_path / "tensorrt").exists()  # nothing cached for the CPU


@cpu_only
def test_cuda_that_cannot_be_honoured_is_refused(store: Registry, tmp_path: Path) -> None:
    with pytest.raises(ModelError) as exc:
        load(store, "sample", tmp_path, device="cuda")
    assert exc.value.message.startswith(
        "model 'sample' version 1: device = 'cuda' was asked for but onnxruntime offers no GPU "
        "execution provider"
    )


def test_cpu_has_no_fallback_reason(store: Registry, tmp_path: Path) -> None:
    backend = load(store, "sample", tmp_path, device="cpu")
    assert backend.placement == Placement("cpu", "CPUExecutionProvider")
    assert backend.placement.fallback_reason is None


@cpu_only
def test_fallback_warning_is_logged_once(
    store: Registry,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(device, "_logged", set())  # as in a fresh process
    caplog.set_level(logging.WARNING, logger="appliance.device")
    for name in ("sample", "multi_io", "sample"):
        assert load(store, name, tmp_path, device="auto").placement.fallback_reason
    warnings = [r for r in caplog.records if r.name == "appliance.device"]
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING
    assert warnings[0].getMessage().startswith("no usable accelerator, running on the CPU: ")
    load(store, "sample", tmp_path, device="cpu")  # an explicit cpu is no fallback
    assert len([r for r in caplog.records if r.name == "appliance.device"]) == 1


def test_log_once(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device, "_logged", set())
    caplog.set_level(logging.WARNING, logger="appliance.device")
    log_once("k1", "first %s", "a")
    log_once("k1", "first %s", "b")
    log_once("k2", "second")
    assert [r.getMessage() for r in caplog.records] == ["first a", "second"]


def test_want_accelerator() -> None:
    assert want_accelerator("auto", True, "why", "m") is True
    assert want_accelerator("auto", False, "why", "m") is False
    assert want_accelerator("cuda", True, "why", "m") is True
    assert want_accelerator("cpu", True, "why", "m") is False
    assert want_accelerator("cpu", False, "why", "m") is False
    with pytest.raises(ModelError) as exc:
        want_accelerator("cuda", False, "no GPU here", "model 'm' version 1")
    assert exc.value.message == "model 'm' version 1: device = 'cuda' was asked for but no GPU here"


def test_settle(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device, "_logged", set())
    caplog.set_level(logging.WARNING, logger="appliance.device")
    assert settle("auto", True, "CUDAExecutionProvider", "-", "m") == Placement(
        "cuda", "CUDAExecutionProvider"
    )
    assert settle("cuda", True, "TRT", "-", "m").device == "cuda"
    assert settle("cpu", False, "CPU", "-", "m") == Placement("cpu", "CPU")
    assert caplog.records == []
    assert settle("auto", False, "CPU", "the GPU failed", "m") == Placement(
        "cpu", "CPU", fallback_reason="the GPU failed"
    )
    assert len(caplog.records) == 1
    # the GPU providers were offered but did not start: an explicit cuda is refused
    with pytest.raises(ModelError, match=r"^m: device = 'cuda' was asked for but the GPU failed$"):
        settle("cuda", False, "CPU", "the GPU failed", "m")


# -- execution providers (a pure function: any list of providers can be tried) -----------------

ALL = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def test_providers_prefer_tensorrt_then_cuda_then_cpu(tmp_path: Path) -> None:
    cfg = OnnxConfig(cuda_device_id=1, tensorrt_fp16=True)
    providers = providers_for("auto", ALL, cfg, tmp_path / ".cache", "m")
    assert providers == [
        (
            "TensorrtExecutionProvider",
            {
                "device_id": 1,
                "trt_fp16_enable": True,
                "trt_engine_cache_enable": True,
                "trt_engine_cache_path": str(tmp_path / ".cache" / "tensorrt"),
            },
        ),
        ("CUDAExecutionProvider", {"device_id": 1}),
        "CPUExecutionProvider",
    ]
    assert providers_for("cuda", ALL, cfg, tmp_path, "m")[0][0] == "TensorrtExecutionProvider"


def test_providers_cuda_then_cpu(tmp_path: Path) -> None:
    available = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    for requested in ("auto", "cuda"):
        assert providers_for(requested, available, OnnxConfig(), tmp_path, "m") == [
            ("CUDAExecutionProvider", {"device_id": 0}),
            "CPUExecutionProvider",
        ]


def test_providers_tensorrt_cache_dir_setting(tmp_path: Path) -> None:
    cfg = OnnxConfig(tensorrt_cache_dir=str(tmp_path / "engines"))
    trt = providers_for("auto", ALL, cfg, tmp_path / ".cache", "m")[0]
    assert isinstance(trt, tuple)
    assert trt[1]["trt_engine_cache_path"] == str(tmp_path / "engines")
    assert trt[1]["trt_fp16_enable"] is False


def test_providers_cpu_only(tmp_path: Path) -> None:
    cpu = ["CPUExecutionProvider"]
    assert providers_for("cpu", ALL, OnnxConfig(), tmp_path, "m") == cpu  # asked for the CPU
    assert providers_for("auto", ["AzureExecutionProvider", *cpu], OnnxConfig(), tmp_path, "m") == (
        cpu
    )
    with pytest.raises(ModelError) as exc:
        providers_for("cuda", ["AzureExecutionProvider", *cpu], OnnxConfig(), tmp_path, "m")
    assert exc.value.message == (
        "m: device = 'cuda' was asked for but onnxruntime offers no GPU execution provider "
        "(it has AzureExecutionProvider, CPUExecutionProvider)"
    )
    assert not any(tmp_path.iterdir())  # a pure function: nothing created


# -- session settings --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("level", "ort_level"),
    [
        ("disable", ort.GraphOptimizationLevel.ORT_DISABLE_ALL),
        ("basic", ort.GraphOptimizationLevel.ORT_ENABLE_BASIC),
        ("extended", ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED),
        ("all", ort.GraphOptimizationLevel.ORT_ENABLE_ALL),
    ],
)
def test_session_settings_are_applied(
    store: Registry, tmp_path: Path, level: str, ort_level: Any
) -> None:
    onnx_settings = {
        "intra_op_threads": 2,
        "inter_op_threads": 3,
        "graph_optimization": level,
        "allow_spinning": True,
    }
    backend = load(store, "sample", tmp_path, onnx=onnx_settings)
    so = backend.session.get_session_options()
    assert so.intra_op_num_threads == 2
    assert so.inter_op_num_threads == 3
    assert so.graph_optimization_level == ort_level
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert so.get_session_config_entry("session.inter_op.allow_spinning") == "1"
    # and it still computes the same thing
    x = np.ones((1, 4), np.float32)
    assert backend.run({"input": x}, ["label"])["label"].shape == (1,)


def test_session_defaults(store: Registry, tmp_path: Path) -> None:
    so = load(store, "sample", tmp_path).session.get_session_options()
    assert so.intra_op_num_threads == 0
    assert so.inter_op_num_threads == 1
    assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert so.get_session_config_entry("session.inter_op.allow_spinning") == "0"


def test_model_defaults_and_model_tables_reach_the_session(store: Registry, tmp_path: Path) -> None:
    config = load_config(
        None,
        {
            "model_defaults": {"onnx": {"intra_op_threads": 1, "inter_op_threads": 2}},
            "models": {"sample": {"onnx": {"inter_op_threads": 4}}},
        },
        {},
    )
    mv = store.active("sample")
    backend = OnnxBackend(
        mv.manifest, mv.file, LoadContext(config.model_config("sample"), tmp_path)
    )
    so = backend.session.get_session_options()
    assert (so.intra_op_num_threads, so.inter_op_num_threads) == (1, 4)
