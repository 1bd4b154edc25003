"""Tiny ONNX models for the pipeline tests, written with onnx.helper (nothing downloaded)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def _io(name: str, shape: list[int | str], t: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, t, shape)


def affine(path: Path, inp: str, out: str, mul: float, add: float) -> Path:
    """out = inp * mul + add, FP32 [N, 4] (batchable)."""
    consts = [
        numpy_helper.from_array(np.array(mul, dtype=np.float32), "mul"),
        numpy_helper.from_array(np.array(add, dtype=np.float32), "add"),
    ]
    nodes = [
        helper.make_node("Mul", [inp, "mul"], ["t"]),
        helper.make_node("Add", ["t", "add"], [out]),
    ]
    graph = helper.make_graph(
        nodes, "affine", [_io(inp, ["N", 4])], [_io(out, ["N", 4])], initializer=consts
    )
    return _save(graph, path)


def top(path: Path) -> Path:
    """s = max over the row of z: FP32 [N, 4] -> [N, 1]."""
    nodes = [helper.make_node("ReduceMax", ["z"], ["s"], keepdims=1, axes=[1])]
    graph = helper.make_graph(nodes, "top", [_io("z", ["N", 4])], [_io("s", ["N", 1])])
    return _save(graph, path)


def picky(path: Path) -> Path:
    """Reshape to [-1, 4]: the runtime fails on a row whose size is not a multiple of 4."""
    shape = numpy_helper.from_array(np.array([-1, 4], dtype=np.int64), "shape")
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["y"])]
    graph = helper.make_graph(
        nodes, "picky", [_io("x", ["N", "M"])], [_io("y", ["K", 4])], initializer=[shape]
    )
    return _save(graph, path)


def counter(path: Path) -> Path:
    """INT64 input (for dtype mismatches): n = x + 1, INT64 [N, 4]."""
    one = numpy_helper.from_array(np.array(1, dtype=np.int64), "one")
    nodes = [helper.make_node("Add", ["x", "one"], ["n"])]
    graph = helper.make_graph(
        nodes,
        "counter",
        [_io("x", ["N", 4], TensorProto.INT64)],
        [_io("n", ["N", 4], TensorProto.INT64)],
        initializer=[one],
    )
    return _save(graph, path)


def write_all(out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    return {
        "double": affine(out / "double.onnx", "x", "y", 2.0, 0.0),
        "addone": affine(out / "addone.onnx", "y", "z", 1.0, 1.0),
        "top": top(out / "top.onnx"),
        "picky": picky(out / "picky.onnx"),
        "counter": counter(out / "counter.onnx"),
    }
