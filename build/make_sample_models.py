"""Build the sample ONNX models offline with onnx.helper (nothing is downloaded).

    python build/make_sample_models.py --out build/samples [--store models]

Writes:
  sample.onnx    a small MLP classifier:
                 input FP32[-1,4] -> probabilities FP32[-1,3], label INT64[-1]
  multi_io.onnx  several inputs and outputs of float, integer and bool types
  strings.onnx   a BYTES (string) tensor in and out
  fp16.onnx      FP16 in and out
With --heavy, also heavy_mlp.onnx: a compute-bound MLP (4 layers of 2048x2048, 64 MB) for the
batching benchmark (input FP32[-1,2048] -> output FP32[-1,2048]); not built by default.
With --store, `sample` is added to that model store (and activated) unless it is already there.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8  # readable by older onnxruntime builds such as JetPack's


def _model(graph: onnx.GraphProto, doc: str) -> onnx.ModelProto:
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="appliance-build",
        doc_string=doc,
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def sample() -> onnx.ModelProto:
    rng = np.random.default_rng(7)
    w1 = rng.normal(0, 0.5, (4, 8)).astype(np.float32)
    b1 = rng.normal(0, 0.1, (8,)).astype(np.float32)
    w2 = rng.normal(0, 0.5, (8, 3)).astype(np.float32)
    b2 = rng.normal(0, 0.1, (3,)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["input", "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "w2"], ["l0"]),
        helper.make_node("Add", ["l0", "b2"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
        helper.make_node("ArgMax", ["logits"], ["label"], axis=-1, keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "sample",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
        [
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("label", TensorProto.INT64, ["batch"]),
        ],
        initializer=[
            numpy_helper.from_array(a, n)
            for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))
        ],
    )
    return _model(graph, "Sample 4-feature, 3-class MLP classifier")


def multi_io() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Cast", ["y"], ["y_f"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["x", "y_f"], ["sum"]),
        helper.make_node("Mul", ["y", "two"], ["y_times_2"]),
        helper.make_node("Greater", ["x", "zero"], ["x_positive"]),
        helper.make_node("Cast", ["pixels"], ["p_f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["p_f"], ["p_mean"], axes=[1, 2], keepdims=0),
        helper.make_node("Cast", ["p_mean"], ["pixel_mean"], to=TensorProto.INT32),
    ]
    graph = helper.make_graph(
        nodes,
        "multi_io",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("y", TensorProto.INT64, ["batch", 3]),
            helper.make_tensor_value_info("pixels", TensorProto.UINT8, ["batch", 2, 2]),
        ],
        [
            helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("y_times_2", TensorProto.INT64, ["batch", 3]),
            helper.make_tensor_value_info("x_positive", TensorProto.BOOL, ["batch", 3]),
            helper.make_tensor_value_info("pixel_mean", TensorProto.INT32, ["batch"]),
        ],
        initializer=[
            numpy_helper.from_array(np.array(2, dtype=np.int64), "two"),
            numpy_helper.from_array(np.array(0, dtype=np.float32), "zero"),
        ],
    )
    return _model(graph, "Several inputs and outputs of mixed types")


def strings() -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["text"], ["echo"])],
        "strings",
        [helper.make_tensor_value_info("text", TensorProto.STRING, ["n"])],
        [helper.make_tensor_value_info("echo", TensorProto.STRING, ["n"])],
    )
    return _model(graph, "Echoes a string tensor")


def fp16() -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Mul", ["a", "k"], ["doubled"])],
        "fp16",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT16, ["batch", 2])],
        [helper.make_tensor_value_info("doubled", TensorProto.FLOAT16, ["batch", 2])],
        initializer=[numpy_helper.from_array(np.array(2, dtype=np.float16), "k")],
    )
    return _model(graph, "Doubles a half-precision tensor")


def heavy_mlp(width: int = 2048, layers: int = 4) -> onnx.ModelProto:
    """A model whose batch-1 run takes milliseconds on a small CPU: the runtime dominates."""
    rng = np.random.default_rng(11)
    scale = np.float32(1.0 / np.sqrt(width))  # keeps activations in range (and float32)
    nodes, inits, prev = [], [], "input"
    for i in range(layers):
        w = (rng.standard_normal((width, width), dtype=np.float32) * scale).astype(np.float32)
        b = np.zeros(width, dtype=np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes.append(helper.make_node("Gemm", [prev, f"w{i}", f"b{i}"], [f"g{i}"]))
        out = "output" if i == layers - 1 else f"h{i}"
        nodes.append(helper.make_node("Relu", [f"g{i}"], [out]))
        prev = out
    graph = helper.make_graph(
        nodes,
        "heavy_mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", width])],
        initializer=inits,
    )
    return _model(graph, f"{layers}x{width} ReLU MLP for batching benchmarks")


MODELS = {"sample": sample, "multi_io": multi_io, "strings": strings, "fp16": fp16}

#: The self-test's input: one flower-like row of four features.
SELFTEST_INPUT = [[5.1, 3.5, 1.4, 0.2]]


def write_selftest_data(out: Path) -> None:
    """The bundled self-test model and the answer onnxruntime gives for SELFTEST_INPUT."""
    import json

    import onnxruntime as ort

    out.mkdir(parents=True, exist_ok=True)
    data = sample().SerializeToString()
    (out / "sample.onnx").write_bytes(data)
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    probabilities, label = session.run(None, {"input": np.array(SELFTEST_INPUT, np.float32)})
    expected = {
        "input": SELFTEST_INPUT,
        "probabilities": [round(float(p), 6) for p in probabilities.reshape(-1)],
        "label": [int(x) for x in label.reshape(-1)],
    }
    (out / "sample.expected.json").write_text(json.dumps(expected, indent=2) + "\n")
    print(f"wrote {out / 'sample.onnx'} and {out / 'sample.expected.json'}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default="build/samples", help="directory for the .onnx files")
    ap.add_argument("--store", help="also add `sample` to this model store if it is missing")
    ap.add_argument(
        "--selftest-data",
        metavar="DIR",
        help="write sample.onnx and its expected answer for `appliance selftest` (appliance/data)",
    )
    ap.add_argument(
        "--heavy", action="store_true", help="also write heavy_mlp.onnx (64 MB, for benchmarks)"
    )
    args = ap.parse_args(argv)
    if args.selftest_data:
        write_selftest_data(Path(args.selftest_data))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    models = dict(MODELS)
    if args.heavy:
        models["heavy_mlp"] = heavy_mlp
    for name, make in models.items():
        data = make().SerializeToString()
        path = out / f"{name}.onnx"
        if not path.exists() or path.read_bytes() != data:
            path.write_bytes(data)
        print(f"wrote {path} ({len(data)} bytes)")
    if args.store:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from appliance.registry import Registry

        registry = Registry(Path(args.store))
        if "sample" in registry.names() and registry.entry("sample").active:
            print(f"{args.store}: sample already present")
        else:
            mv = registry.add("sample", out / "sample.onnx")
            print(f"{args.store}: added sample version {mv.manifest.version}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
