"""`argmax_label`: a classifier's scores -> the best class's label.

    {"type": "argmax_label", "labels": ["red", "green", "blue", "white"], "softmax": true}

Reads `logits` ([..., C], logits or probabilities) and writes, each shaped like `logits`
without its last dimension: `label` (BYTES, UTF-8 of the best class's label), `index` (INT64)
and `score` (FP32: the best value, or its softmax probability with `"softmax": true`). A tie
goes to the lower class index. `labels` is the list of C labels, inline (a manifest or
pipeline that keeps them in a file reads it and passes the list).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from ..errors import InvalidInput
from ..tensors import FLOAT_TYPES, INT_TYPES, TensorSpec
from .base import Array, Arrays, Step, StepCall, StepContext, unknown_keys
from .options import NAME_KEYS, Names, boolean, check_spec, names, numeric, strings, tensor


class ArgmaxLabelStep(Step):
    """The best class of each row, as its label, index and score."""

    type: ClassVar[str] = "argmax_label"
    _keys: ClassVar[frozenset[str]] = NAME_KEYS | {"labels", "softmax"}

    def __init__(self, names_: Names, labels: tuple[str, ...], softmax: bool) -> None:
        self.names, self.labels, self.softmax = names_, labels, softmax
        self._encoded = np.array([s.encode() for s in labels], dtype=object)
        self.reads, self.writes = names_.reads, names_.writes
        self.optional = names_.optional

    @classmethod
    def parse(cls, config: Mapping[str, Any], ctx: StepContext) -> Step:
        unknown_keys(config, cls._keys, ctx)
        labels = strings(config, "labels", ctx)
        softmax = boolean(config, "softmax", ctx, False)
        n = names(config, ctx, ("logits",), ("label", "index", "score"))
        spec = check_spec(
            ctx, "inputs.logits", n.inputs["logits"], datatypes=FLOAT_TYPES | INT_TYPES
        )
        if spec is not None:
            if not spec.shape:
                raise ctx.bad("inputs.logits", f"tensor {spec.name!r} is a scalar, not [..., C]")
            if spec.shape[-1] not in (-1, len(labels)):
                raise ctx.bad(
                    "labels",
                    f"{len(labels)} labels, but {spec.name!r} {list(spec.shape)} has "
                    f"{spec.shape[-1]} classes",
                )
        return cls(n, labels, softmax)

    def specs(self, given: Mapping[str, TensorSpec]) -> dict[str, TensorSpec]:
        spec = given.get(self.names.inputs["logits"])
        if spec is None or not spec.shape:
            return {}
        shape = spec.shape[:-1]
        out = self.names.outputs
        return {
            out["label"]: TensorSpec(out["label"], "BYTES", shape),
            out["index"]: TensorSpec(out["index"], "INT64", shape),
            out["score"]: TensorSpec(out["score"], "FP32", shape),
        }

    def run(self, tensors: Mapping[str, Array], call: StepCall) -> Arrays:
        name = self.names.inputs["logits"]
        x = numeric(tensor(tensors, name, "logits"), name)
        if x.ndim == 0 or x.shape[-1] != len(self.labels):
            raise InvalidInput(
                f"tensor {name!r} has shape {list(x.shape)}: the step has {len(self.labels)} "
                f"labels, so it takes [..., {len(self.labels)}]"
            )
        best = np.argmax(x, axis=-1)
        top = x.max(axis=-1, keepdims=True)  # the value at `best` (NaN where argmax found one)
        values = top[..., 0]
        if self.softmax:
            wide = x.astype(np.float64)
            values = 1.0 / np.exp(wide - top).sum(axis=-1)  # the best one's exp(0) over the sum
        out = self.names.outputs
        return {
            out["label"]: np.asarray(self._encoded[best], dtype=object),
            out["index"]: np.asarray(best, dtype=np.int64),
            out["score"]: np.asarray(values, dtype=np.float32),
        }

    def describe(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "labels": list(self.labels),
            "softmax": self.softmax,
            **self.names.describe(),
        }
