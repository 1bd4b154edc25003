"""Tensor datatypes and signatures shared by every backend and protocol.

KServe v2 names datatypes (FP32, INT64, BYTES, ...); backends speak numpy. This module is the one
place that maps between them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: KServe v2 datatype -> numpy dtype. BYTES tensors are numpy object arrays of `bytes`.
DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}

_BY_DTYPE: dict[np.dtype[Any], str] = {v: k for k, v in DATATYPES.items()}

FLOAT_TYPES = frozenset({"FP16", "FP32", "FP64"})
INT_TYPES = frozenset({"UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64"})


#: Up to this many elements, a check over a tensor's values runs in Python on its list: a numpy
#: reduction costs about a microsecond whatever the size, a list of a few floats a fifth of it.
SMALL = 32


def all_finite(array: np.ndarray[Any, Any]) -> bool:
    """Whether a float tensor holds no NaN or infinity (cheap for the small tensors of the
    typical edge request: this runs on every input and output of the hot path)."""
    if array.size <= SMALL:
        return all(map(math.isfinite, array.ravel().tolist()))
    return bool(np.isfinite(array).all())


def max_abs(array: np.ndarray[Any, Any]) -> float:
    """The largest magnitude in a non-empty float tensor without NaN."""
    if array.size <= SMALL:
        return float(max(map(abs, array.ravel().tolist())))
    return float(np.abs(array).max())


def datatype_of(array: np.ndarray[Any, Any]) -> str:
    """KServe datatype of a numpy array (unicode arrays count as BYTES)."""
    dt = array.dtype
    if dt.kind in "OSU":
        return "BYTES"
    try:
        return _BY_DTYPE[dt.newbyteorder("=") if dt.byteorder not in "=|" else dt]
    except KeyError:
        raise TypeError(f"numpy dtype {dt} has no KServe v2 datatype") from None


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output: name, KServe datatype and shape (-1 for a dynamic dimension)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> TensorSpec:
        return cls(str(obj["name"]), str(obj["datatype"]), tuple(int(d) for d in obj["shape"]))


@dataclass(frozen=True)
class Signature:
    """A model's inputs and outputs, in the model's own order."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    input_by_name: dict[str, TensorSpec] = field(init=False, compare=False, repr=False)
    output_by_name: dict[str, TensorSpec] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_by_name", {t.name: t for t in self.inputs})
        object.__setattr__(self, "output_by_name", {t.name: t for t in self.outputs})
