"""Build the sample TFLite models offline, with no TensorFlow (nothing is downloaded).

    python build/make_tflite_models.py --out build/tflite

The flatbuffers are written with the schema bindings that ship inside ai-edge-litert
(`ai_edge_litert.schema_py_generated`) and the `flatbuffers` package. Writes:
  tfl_float.tflite       a float MLP with a dynamic batch and a signature "serving_default":
                         features FP32[-1,4] -> logits FP32[-1,3], scores FP32[-1,3]
                         (tensors x, logits, probabilities under the signature's names)
  tfl_int8.tflite        a fully int8 layer, no signature: x INT8[-1,4] (scale 0.05, zero
                         point -3) -> y INT8[-1,3] (scale 0.1, zero point 5)
  tfl_uint8.tflite       uint8 both ways: u UINT8[-1,4] (0.5, 128) -> real FP32[-1,4] and
                         f FP32[-1,4] -> q UINT8[-1,4] (0.25, 100)
  tfl_classifier.tflite  a tiny image classifier: image FP32[-1,32,32,3] -> 8x8 average pool
                         -> 48 features -> logits FP32[-1,10]; labels in classifier_labels.txt
  tfl_classifier_u8.tflite  the same classifier taking uint8 pixels (scale 1/255, zero point 0)
Each file is rewritten only when its bytes change, so a cached folder is stable.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as s

LABELS = ("apple", "bee", "cat", "dog", "eel", "fox", "gnu", "hen", "ibis", "jay")
_TYPES = {
    np.dtype(np.float32): s.TensorType.FLOAT32,
    np.dtype(np.int32): s.TensorType.INT32,
    np.dtype(np.int8): s.TensorType.INT8,
    np.dtype(np.uint8): s.TensorType.UINT8,
}


@dataclass
class Graph:
    """One subgraph being assembled: tensors, buffers (buffer 0 is the empty sentinel), ops."""

    tensors: list[Any] = field(default_factory=list)
    buffers: list[Any] = field(default_factory=lambda: [s.BufferT()])
    ops: list[Any] = field(default_factory=list)
    codes: list[int] = field(default_factory=list)

    def tensor(
        self,
        name: str,
        dtype: Any,
        shape: list[int],
        data: np.ndarray[Any, Any] | None = None,
        quant: tuple[float, int] | None = None,
        dynamic_batch: bool = False,
    ) -> int:
        t = s.TensorT()
        t.name = name
        t.type = _TYPES[np.dtype(dtype)]
        t.shape = list(shape)
        if dynamic_batch:
            t.shapeSignature = [-1, *shape[1:]]
        t.buffer = 0
        if data is not None:
            buf = s.BufferT()
            buf.data = np.ascontiguousarray(data, dtype=dtype).tobytes()
            self.buffers.append(buf)
            t.buffer = len(self.buffers) - 1
        if quant is not None:
            q = s.QuantizationParametersT()
            q.scale, q.zeroPoint = [float(quant[0])], [int(quant[1])]
            t.quantization = q
        self.tensors.append(t)
        return len(self.tensors) - 1

    def op(
        self,
        code: int,
        inputs: list[int],
        outputs: list[int],
        options_type: int = s.BuiltinOptions.NONE,
        options: Any = None,
    ) -> None:
        if code not in self.codes:
            self.codes.append(code)
        o = s.OperatorT()
        o.opcodeIndex = self.codes.index(code)
        o.inputs, o.outputs = inputs, outputs
        o.builtinOptionsType, o.builtinOptions = options_type, options
        self.ops.append(o)

    def model(
        self,
        inputs: list[int],
        outputs: list[int],
        description: str,
        signature: tuple[dict[str, int], dict[str, int]] | None = None,
    ) -> bytes:
        sg = s.SubGraphT()
        sg.tensors, sg.inputs, sg.outputs, sg.operators = self.tensors, inputs, outputs, self.ops
        sg.name = "main"
        m = s.ModelT()
        m.version = 3
        m.description = description
        m.subgraphs = [sg]
        m.buffers = self.buffers
        m.operatorCodes = []
        for code in self.codes:
            oc = s.OperatorCodeT()
            oc.builtinCode = code
            oc.deprecatedBuiltinCode = min(code, 127)
            oc.version = 1
            m.operatorCodes.append(oc)
        if signature is not None:
            sig = s.SignatureDefT()
            sig.signatureKey = "serving_default"
            sig.subgraphIndex = 0
            sig.inputs, sig.outputs = [
                [_tensor_map(k, v) for k, v in side.items()] for side in signature
            ]
            m.signatureDefs = [sig]
        builder = flatbuffers.Builder(1024)
        builder.Finish(m.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output())


def _tensor_map(name: str, index: int) -> Any:
    t = s.TensorMapT()
    t.name, t.tensorIndex = name, index
    return t


def _fc_options(relu: bool = False) -> Any:
    o = s.FullyConnectedOptionsT()
    o.fusedActivationFunction = (
        s.ActivationFunctionType.RELU if relu else s.ActivationFunctionType.NONE
    )
    return o


def tfl_float() -> bytes:
    rng = np.random.default_rng(11)
    g = Graph()
    x = g.tensor("x", np.float32, [1, 4], dynamic_batch=True)
    w1 = g.tensor("w1", np.float32, [8, 4], rng.normal(0, 0.6, (8, 4)))
    b1 = g.tensor("b1", np.float32, [8], rng.normal(0, 0.1, 8))
    h = g.tensor("h", np.float32, [1, 8], dynamic_batch=True)
    w2 = g.tensor("w2", np.float32, [3, 8], rng.normal(0, 0.6, (3, 8)))
    b2 = g.tensor("b2", np.float32, [3], rng.normal(0, 0.1, 3))
    logits = g.tensor("logits", np.float32, [1, 3], dynamic_batch=True)
    probs = g.tensor("probabilities", np.float32, [1, 3], dynamic_batch=True)
    fc = s.BuiltinOptions.FullyConnectedOptions
    g.op(s.BuiltinOperator.FULLY_CONNECTED, [x, w1, b1], [h], fc, _fc_options(relu=True))
    g.op(s.BuiltinOperator.FULLY_CONNECTED, [h, w2, b2], [logits], fc, _fc_options())
    softmax = s.SoftmaxOptionsT()
    softmax.beta = 1.0
    g.op(s.BuiltinOperator.SOFTMAX, [logits], [probs], s.BuiltinOptions.SoftmaxOptions, softmax)
    return g.model(
        [x],
        [logits, probs],
        "appliance sample: float MLP, dynamic batch",
        signature=({"features": x}, {"logits": logits, "scores": probs}),
    )


def tfl_int8() -> bytes:
    rng = np.random.default_rng(12)
    g = Graph()
    in_q, w_scale, out_q = (0.05, -3), 0.02, (0.1, 5)
    x = g.tensor("x", np.int8, [1, 4], quant=in_q, dynamic_batch=True)
    w = g.tensor("w", np.int8, [3, 4], rng.integers(-100, 100, (3, 4)), quant=(w_scale, 0))
    bias_scale = in_q[0] * w_scale
    b = g.tensor("b", np.int32, [3], rng.integers(-500, 500, 3), quant=(bias_scale, 0))
    y = g.tensor("y", np.int8, [1, 3], quant=out_q, dynamic_batch=True)
    g.op(
        s.BuiltinOperator.FULLY_CONNECTED,
        [x, w, b],
        [y],
        s.BuiltinOptions.FullyConnectedOptions,
        _fc_options(),
    )
    return g.model([x], [y], "appliance sample: int8 fully connected layer")


def tfl_uint8() -> bytes:
    g = Graph()
    u = g.tensor("u", np.uint8, [1, 4], quant=(0.5, 128), dynamic_batch=True)
    real = g.tensor("real", np.float32, [1, 4], dynamic_batch=True)
    f = g.tensor("f", np.float32, [1, 4], dynamic_batch=True)
    q = g.tensor("q", np.uint8, [1, 4], quant=(0.25, 100), dynamic_batch=True)
    g.op(s.BuiltinOperator.DEQUANTIZE, [u], [real])
    g.op(s.BuiltinOperator.QUANTIZE, [f], [q])
    return g.model([u, f], [real, q], "appliance sample: uint8 in and out")


def tfl_classifier(quantized: bool = False) -> bytes:
    rng = np.random.default_rng(13)
    g = Graph()
    if quantized:
        pixels = g.tensor(
            "pixels", np.uint8, [1, 32, 32, 3], quant=(1 / 255, 0), dynamic_batch=True
        )
        image = g.tensor("image", np.float32, [1, 32, 32, 3], dynamic_batch=True)
        g.op(s.BuiltinOperator.DEQUANTIZE, [pixels], [image])
    else:
        image = g.tensor("image", np.float32, [1, 32, 32, 3], dynamic_batch=True)
    pooled = g.tensor("pooled", np.float32, [1, 4, 4, 3], dynamic_batch=True)
    shape = g.tensor("flat_shape", np.int32, [2], np.array([-1, 48]))
    flat = g.tensor("flat", np.float32, [1, 48], dynamic_batch=True)
    w = g.tensor("w", np.float32, [10, 48], rng.normal(0, 1.0, (10, 48)))
    b = g.tensor("b", np.float32, [10], rng.normal(0, 0.1, 10))
    logits = g.tensor("logits", np.float32, [1, 10], dynamic_batch=True)
    pool = s.Pool2DOptionsT()
    pool.padding = s.Padding.VALID
    pool.strideW = pool.strideH = pool.filterWidth = pool.filterHeight = 8
    g.op(s.BuiltinOperator.AVERAGE_POOL_2D, [image], [pooled], s.BuiltinOptions.Pool2DOptions, pool)
    reshape = s.ReshapeOptionsT()
    reshape.newShape = [-1, 48]
    g.op(
        s.BuiltinOperator.RESHAPE,
        [pooled, shape],
        [flat],
        s.BuiltinOptions.ReshapeOptions,
        reshape,
    )
    g.op(
        s.BuiltinOperator.FULLY_CONNECTED,
        [flat, w, b],
        [logits],
        s.BuiltinOptions.FullyConnectedOptions,
        _fc_options(),
    )
    if quantized:
        return g.model(
            [pixels], [logits], "appliance sample: 32x32 RGB image classifier, uint8 input"
        )
    return g.model([image], [logits], "appliance sample: 32x32 RGB image classifier")


def tfl_classifier_u8() -> bytes:
    return tfl_classifier(quantized=True)


MODELS = {
    "tfl_float": tfl_float,
    "tfl_int8": tfl_int8,
    "tfl_uint8": tfl_uint8,
    "tfl_classifier": tfl_classifier,
    "tfl_classifier_u8": tfl_classifier_u8,
}


def _write(path: Path, data: bytes) -> None:
    if path.exists() and path.read_bytes() == data:
        return
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default="build/tflite", help="output folder")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, make in MODELS.items():
        _write(out / f"{name}.tflite", make())
    _write(out / "classifier_labels.txt", ("\n".join(LABELS) + "\n").encode())
    print(f"wrote {len(MODELS)} TFLite models to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
