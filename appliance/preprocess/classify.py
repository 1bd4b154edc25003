"""Classification answers: the `"type": "classification"` post-processing a manifest can declare.

    "postprocess": {"type": "classification", "output": "logits", "softmax": true,
                    "labels": ["apple", "bee", ...], "top_k": 5}

On request (parameter `top_k`, or by default when the manifest gives `top_k`), the response
keeps every output and adds three: `top_k_indices` (INT64), `top_k_scores` (FP32: softmax
probabilities when `softmax`, else the output's own values) and, with labels, `top_k_labels`
(BYTES), each [batch, k] (or [k] for an output with no batch dimension), best first; ties keep
the lower class index first. A request may also send `softmax` (true/false) to override the
manifest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InvalidInput, ModelError
from ..tensors import FLOAT_TYPES, INT_TYPES, Signature
from . import declared_tensor

OUTPUTS = ("top_k_indices", "top_k_scores", "top_k_labels")
_KEYS = frozenset({"type", "output", "softmax", "labels", "top_k"})


@dataclass(frozen=True)
class ClassifySpec:
    output: str
    softmax: bool
    labels: tuple[str, ...] | None
    #: k applied to every request unless it asks otherwise; None: only on request.
    top_k: int | None

    @classmethod
    def parse(
        cls, obj: dict[str, Any], signature: Signature, what: str, section: str = "postprocess"
    ) -> ClassifySpec:
        def bad(key: str, why: str) -> ModelError:
            return ModelError(f"{what}: {section}.{key} = {obj.get(key)!r}: {why}")

        spec = declared_tensor(obj, section, _KEYS, "output", signature.outputs, what)
        name = spec.name
        if spec.datatype not in FLOAT_TYPES | INT_TYPES or len(spec.shape) not in (1, 2):
            raise bad("output", f"must be numeric [classes] or [batch, classes], not {spec}")
        if any(n in signature.output_by_name for n in OUTPUTS):
            raise ModelError(f"{what}: a model output is already named like {OUTPUTS}")
        softmax = obj.get("softmax", False)
        if not isinstance(softmax, bool):
            raise bad("softmax", "must be true or false")
        labels = obj.get("labels")
        classes = spec.shape[-1]
        if labels is not None:
            if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
                raise bad("labels", "must be a list of strings")
            if classes >= 0 and len(labels) != classes:
                raise bad("labels", f"has {len(labels)} labels for {classes} classes")
        top_k = obj.get("top_k")
        if top_k is not None and (
            not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1
        ):
            raise bad("top_k", "must be a positive integer")
        return cls(name, softmax, tuple(labels) if labels is not None else None, top_k)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "classification", "output": self.output}
        out["softmax"] = self.softmax
        if self.labels is not None:
            out["labels"] = list(self.labels)
        if self.top_k is not None:
            out["top_k"] = self.top_k
        return out

    def requested(self, parameters: dict[str, Any]) -> tuple[int, bool]:
        """(k, softmax) for one request; k 0 means no classification answer."""
        k = parameters.get("top_k", self.top_k or 0)
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise InvalidInput(f"parameter top_k must be a non-negative integer, got {k!r}")
        softmax = parameters.get("softmax", self.softmax)
        if not isinstance(softmax, bool):
            raise InvalidInput(f"parameter softmax must be true or false, got {softmax!r}")
        return k, softmax

    def answer(
        self, values: np.ndarray[Any, Any], k: int, softmax: bool
    ) -> dict[str, np.ndarray[Any, Any]]:
        """The top-k outputs for the classification output's `values`."""
        scores = values.astype(np.float32)
        classes = scores.shape[-1]
        if k > classes:
            raise InvalidInput(f"top_k {k} is more than the model's {classes} classes")
        if softmax:
            scores = softmax_(scores)
        order = np.argsort(-scores, axis=-1, kind="stable")[..., :k]
        out: dict[str, np.ndarray[Any, Any]] = {
            "top_k_indices": order.astype(np.int64),
            "top_k_scores": np.take_along_axis(scores, order, axis=-1),
        }
        if self.labels is not None:
            labels = np.array([x.encode() for x in self.labels], dtype=object)
            out["top_k_labels"] = labels[order]
        return out


def softmax_(x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """Softmax over the last axis, in float32, shifted by the maximum for stability."""
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    out: np.ndarray[Any, Any] = (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)
    return out
