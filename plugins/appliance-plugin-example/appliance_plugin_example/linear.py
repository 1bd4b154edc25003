"""The `linear` backend: one dense layer, y = x W + b, read from a small JSON file.

    {"weights": [[...], ...],   # n_in rows of n_out numbers
     "bias": [...],             # n_out numbers (optional: zeros)
     "input": "x", "output": "y"}   # tensor names (optional: these)

A real computation in pure numpy, small enough to read: it shows the Backend interface
(inspect, load, describe, run) without any runtime to install. Rows are independent, so the
appliance's dynamic batcher may merge requests (`batchable`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from appliance.backends.base import Backend, LoadContext
from appliance.device import Placement
from appliance.errors import ModelError
from appliance.manifest import Manifest
from appliance.tensors import Signature, TensorSpec

#: Largest file read (a linear layer this big belongs in an ONNX file).
MAX_BYTES = 16 * 1024 * 1024


class LinearBackend(Backend):
    name = "linear"
    platform = "example_linear"
    batchable = True

    @classmethod
    def inspect(cls, path: Path) -> tuple[Signature, dict[str, Any]]:
        signature, _, _ = _read(path)
        return signature, {}

    def __init__(self, manifest: Manifest, path: Path, context: LoadContext) -> None:
        self.signature, self.weights, self.bias = _read(path)
        self._input = self.signature.inputs[0].name
        self._output = self.signature.outputs[0].name
        n_in, n_out = self.weights.shape
        self.placement = Placement("cpu", f"numpy {np.__version__}, {n_in}x{n_out} layer")

    def run(
        self, inputs: dict[str, np.ndarray[Any, Any]], outputs: list[str] | None
    ) -> dict[str, np.ndarray[Any, Any]]:
        y = inputs[self._input] @ self.weights + self.bias
        return {self._output: y.astype(np.float32, copy=False)}


def _read(path: Path) -> tuple[Signature, np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise ModelError(f"{path}: {size} bytes; a linear layer file may have {MAX_BYTES}")
        doc = json.loads(path.read_bytes())
    except OSError as exc:
        raise ModelError(f"{path}: cannot read: {exc.strerror}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: not a linear layer: not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise ModelError(f"{path}: not a linear layer: expected a JSON object")
    unknown = sorted(set(doc) - {"weights", "bias", "input", "output"})
    if unknown:
        raise ModelError(f"{path}: {unknown[0]}: unknown key")
    weights = _matrix(doc.get("weights"), path)
    n_out = weights.shape[1]
    bias = np.zeros(n_out, np.float32)
    if doc.get("bias") is not None:
        bias = _numbers(doc["bias"], path, "bias")
        if bias.shape != (n_out,):
            raise ModelError(f"{path}: bias: {bias.size} numbers for {n_out} outputs")
    names = []
    for key, default in (("input", "x"), ("output", "y")):
        value = doc.get(key, default)
        if not isinstance(value, str) or not value:
            raise ModelError(f"{path}: {key}: must be a tensor name")
        names.append(value)
    if names[0] == names[1]:
        raise ModelError(f"{path}: input and output have the same name {names[0]!r}")
    signature = Signature(
        (TensorSpec(names[0], "FP32", (-1, weights.shape[0])),),
        (TensorSpec(names[1], "FP32", (-1, n_out)),),
    )
    return signature, weights, bias


def _matrix(value: Any, path: Path) -> np.ndarray[Any, Any]:
    if not isinstance(value, list) or not value or not all(isinstance(r, list) for r in value):
        raise ModelError(f"{path}: weights: must be a non-empty list of rows")
    width = len(value[0])
    if width == 0 or any(len(r) != width for r in value):
        raise ModelError(f"{path}: weights: every row needs the same, non-zero, length")
    return np.stack([_numbers(r, path, f"weights[{i}]") for i, r in enumerate(value)])


def _numbers(value: Any, path: Path, key: str) -> np.ndarray[Any, Any]:
    if not isinstance(value, list) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value
    ):
        raise ModelError(f"{path}: {key}: must be a list of finite numbers")
    return np.asarray(value, np.float32)
