"""`nms`: non-maximum suppression of a detector's candidates.

    {"type": "nms", "iou_threshold": 0.45, "score_threshold": 0.25, "max_detections": 300,
     "class_agnostic": false, "multi_label": false, "box_format": "xyxy"}

Reads `boxes` ([N, 4] or [1, N, 4]; `box_format` xyxy, xywh or cxcywh), `scores` ([N] or
[1, N], or per class [N, C] / [1, N, C]) and, optionally, `classes` ([N] or [1, N], with
one score per box) and `transform` ([scale, pad_x, pad_y] from the letterbox step). Writes
`boxes` FP32 [M, 4] (xyxy), `scores` FP32 [M] and `classes` INT64 [M], best score first.

With per-class scores a box takes its best class (the lower class index on a tie), or, with
`"multi_label": true`, every class scoring at least the threshold. Without classes every box is
class 0. Candidates scoring below `score_threshold` are dropped; the rest are taken greedily by
descending score (ties: the lower index first), and a candidate is dropped when its IoU with
one taken before is above `iou_threshold` (strictly, as torchvision.ops.nms) within the same
class, or any class with `"class_agnostic": true`; at most `max_detections` are kept. Boxes
are mapped back through `transform` when given ((x - pad_x) / scale, ...), not clipped.

Request parameters `score_threshold`, `iou_threshold` (0..1) and `max_detections` (up to the
declared one) override the declaration for one request.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from ..errors import InvalidInput
from ..tensors import TensorSpec
from .base import Array, Arrays, Step, StepCall, StepContext, unknown_keys
from .crop import BOX_FORMATS, box_rows, to_xyxy
from .options import (
    NAME_KEYS,
    NUMERIC_TYPES,
    Names,
    boolean,
    check_spec,
    choice,
    integer,
    names,
    number,
    numeric,
    param_int,
    param_number,
    tensor,
)

#: Up to this many candidates, all pairwise IoUs are computed at once (a few MB at most):
#: measured faster than one IoU row per kept box below it, slower above (tests/bench/step_cost.py).
MATRIX_MAX = 512


def greedy(
    boxes: Array, scores: Array, classes: Array | None, iou_threshold: float, limit: int
) -> Array:
    """Indices kept by greedy NMS, best first: by descending score, ties by lower index;
    `classes` None suppresses across classes. IoU is intersection / union, 0 for two empty
    boxes (0 / 0 compares false), and a box goes when it is above the threshold."""
    order = np.argsort(-scores, kind="stable")
    b = boxes[order]
    c = None if classes is None else classes[order]
    x1, y1, x2, y2 = (np.ascontiguousarray(b[:, k]) for k in range(4))
    area = np.maximum(x2 - x1, 0) * np.maximum(y2 - y1, 0)
    keep: list[int] = []
    with np.errstate(divide="ignore", invalid="ignore"):
        if len(order) <= MATRIX_MAX:
            w = np.minimum(x2[:, None], x2) - np.maximum(x1[:, None], x1)
            h = np.minimum(y2[:, None], y2) - np.maximum(y1[:, None], y1)
            inter = np.maximum(w, 0) * np.maximum(h, 0)
            over = inter / (area[:, None] + area - inter) > iou_threshold
            if c is not None:
                over &= c[:, None] == c
            removed = np.zeros(len(order), dtype=bool)
            for i in range(len(order)):
                if removed[i]:
                    continue
                keep.append(i)
                if len(keep) == limit:
                    break
                removed |= over[i]
            return order[keep]
        rest = np.arange(len(order))
        while rest.size and len(keep) < limit:
            i, rest = int(rest[0]), rest[1:]
            keep.append(i)
            w = np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest])
            h = np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest])
            inter = np.maximum(w, 0) * np.maximum(h, 0)
            over = inter / (area[i] + area[rest] - inter) > iou_threshold
            if c is not None:
                over &= c[rest] == c[i]
            rest = rest[~over]
    return order[keep]


class NmsStep(Step):
    """A detector's candidates -> its detections."""

    type: ClassVar[str] = "nms"
    parameters: ClassVar[Mapping[str, str]] = {
        "score_threshold": "drop candidates scoring below this (0..1)",
        "iou_threshold": "suppress a box overlapping a better one by more than this IoU (0..1)",
        "max_detections": "keep at most this many (up to the declared max_detections)",
    }
    _keys: ClassVar[frozenset[str]] = NAME_KEYS | {
        "iou_threshold", "score_threshold", "max_detections", "class_agnostic", "multi_label",
        "box_format",
    }  # fmt: skip

    def __init__(
        self,
        names_: Names,
        iou_threshold: float,
        score_threshold: float,
        max_detections: int,
        class_agnostic: bool,
        multi_label: bool,
        box_format: str,
    ) -> None:
        self.names = names_
        self.iou_threshold, self.score_threshold = iou_threshold, score_threshold
        self.max_detections, self.class_agnostic = max_detections, class_agnostic
        self.multi_label, self.box_format = multi_label, box_format
        self.reads, self.writes = names_.reads, names_.writes
        self.optional = names_.optional

    @classmethod
    def parse(cls, config: Mapping[str, Any], ctx: StepContext) -> Step:
        unknown_keys(config, cls._keys, ctx)
        iou_threshold = number(config, "iou_threshold", ctx, 0.45, 0.0, 1.0)
        score_threshold = number(config, "score_threshold", ctx, 0.25)
        max_detections = integer(config, "max_detections", ctx, 300, 1, 100_000)
        class_agnostic = boolean(config, "class_agnostic", ctx, False)
        multi_label = boolean(config, "multi_label", ctx, False)
        box_format = choice(config, "box_format", ctx, "xyxy", BOX_FORMATS)
        n = names(
            config,
            ctx,
            ("boxes", "scores"),
            ("boxes", "scores", "classes"),
            optional=("classes", "transform"),
        )
        inputs = n.inputs
        check_spec(
            ctx, "inputs.boxes", inputs["boxes"], datatypes=NUMERIC_TYPES, ranks=(2, 3), last=4
        )
        scores = check_spec(
            ctx, "inputs.scores", inputs["scores"], datatypes=NUMERIC_TYPES, ranks=(1, 2, 3)
        )
        if "classes" in inputs:
            check_spec(
                ctx, "inputs.classes", inputs["classes"], datatypes=NUMERIC_TYPES, ranks=(1, 2)
            )
            if scores is not None and len(scores.shape) == 3:
                raise ctx.bad("inputs.classes", "per-class scores [1, N, C] already give classes")
        if "transform" in inputs:
            check_spec(
                ctx, "inputs.transform", inputs["transform"], datatypes=NUMERIC_TYPES, last=3
            )
        return cls(
            n,
            iou_threshold,
            score_threshold,
            max_detections,
            class_agnostic,
            multi_label,
            box_format,
        )

    def specs(self, given: Mapping[str, TensorSpec]) -> dict[str, TensorSpec]:
        out = self.names.outputs
        return {
            out["boxes"]: TensorSpec(out["boxes"], "FP32", (-1, 4)),
            out["scores"]: TensorSpec(out["scores"], "FP32", (-1,)),
            out["classes"]: TensorSpec(out["classes"], "INT64", (-1,)),
        }

    def run(self, tensors: Mapping[str, Array], call: StepCall) -> Arrays:
        p = call.parameters
        score_threshold = param_number(p, "score_threshold", self.score_threshold, 0.0, 1.0)
        iou_threshold = param_number(p, "iou_threshold", self.iou_threshold, 0.0, 1.0)
        limit = param_int(p, "max_detections", self.max_detections, 0, self.max_detections)
        inputs = self.names.inputs
        boxes = box_rows(tensor(tensors, inputs["boxes"], "boxes"), inputs["boxes"], finite=False)
        n = len(boxes)
        classes = tensors.get(inputs["classes"]) if "classes" in inputs else None
        rows, scores, labels = self._scored(
            tensor(tensors, inputs["scores"], "scores"), classes, n, score_threshold
        )
        boxes = boxes[rows]
        if not np.isfinite(boxes).all():
            bad = int(rows[np.flatnonzero(~np.isfinite(boxes).all(axis=1))[0]])
            raise InvalidInput(f"tensor {inputs['boxes']!r}: box {bad} is not finite")
        xyxy = to_xyxy(boxes, self.box_format)
        kept = greedy(xyxy, scores, None if self.class_agnostic else labels, iou_threshold, limit)
        xyxy, scores, labels = xyxy[kept], scores[kept], labels[kept]
        if "transform" in inputs and inputs["transform"] in tensors:
            xyxy = _map_back(xyxy, tensors[inputs["transform"]], inputs["transform"])
        out = self.names.outputs
        return {
            out["boxes"]: xyxy.astype(np.float32).reshape(-1, 4),
            out["scores"]: scores.astype(np.float32),
            out["classes"]: labels.astype(np.int64),
        }

    def _scored(
        self, scores: Array, classes: Array | None, n: int, threshold: float
    ) -> tuple[Array, Array, Array]:
        """(rows, scores, classes) of the candidates at or above the threshold."""
        name = self.names.inputs["scores"]
        numeric(scores, name)
        s = scores
        if s.ndim == 3 and s.shape[0] == 1:
            s = s[0]
        if s.ndim == 2 and s.shape == (1, n) and (classes is not None or n != 1):
            s = s[0]
        if s.ndim == 1 and s.shape[0] == n:
            rows = np.flatnonzero(s >= threshold)
            if classes is None:
                labels = np.zeros(len(rows), np.int64)
            else:
                labels = _classes(classes, self.names.inputs["classes"], n)[rows]
            return rows, s[rows].astype(np.float64), labels
        if s.ndim == 2 and s.shape[0] == n:
            if classes is not None:
                raise InvalidInput(
                    f"tensor {name!r} holds per-class scores {list(scores.shape)}: no classes "
                    f"tensor ({self.names.inputs['classes']!r}) goes with them"
                )
            if s.shape[1] == 0:
                raise InvalidInput(f"tensor {name!r} has no class ({list(scores.shape)})")
            if self.multi_label:
                rows, labels = np.nonzero(s >= threshold)
                return rows, s[rows, labels].astype(np.float64), labels.astype(np.int64)
            best = np.argmax(s, axis=1)
            top = s[np.arange(n), best]
            rows = np.flatnonzero(top >= threshold)
            return rows, top[rows].astype(np.float64), best[rows].astype(np.int64)
        raise InvalidInput(
            f"tensor {name!r} has shape {list(scores.shape)}: for {n} boxes the scores are "
            f"[{n}], [1, {n}], [{n}, classes] or [1, {n}, classes]"
        )

    def describe(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "iou_threshold": self.iou_threshold,
            "score_threshold": self.score_threshold,
            "max_detections": self.max_detections,
            "class_agnostic": self.class_agnostic,
            "multi_label": self.multi_label,
            "box_format": self.box_format,
            **self.names.describe(),
        }


def _classes(classes: Array, name: str, n: int) -> Array:
    numeric(classes, name)
    flat = classes.reshape(-1)
    if flat.size != n or classes.ndim > 2:
        raise InvalidInput(
            f"tensor {name!r} has shape {list(classes.shape)}: one class per box "
            f"([{n}] or [1, {n}])"
        )
    if flat.dtype.kind == "f":
        if not np.isfinite(flat).all():
            raise InvalidInput(f"tensor {name!r} holds a class that is not finite")
        flat = np.rint(flat)
    return flat.astype(np.int64)


def _map_back(xyxy: Array, transform: Array, name: str) -> Array:
    numeric(transform, name)
    t = transform.reshape(-1).astype(np.float64)
    if t.size != 3 or not np.isfinite(t).all() or t[0] <= 0:
        raise InvalidInput(
            f"tensor {name!r} must be [scale, pad_x, pad_y] with scale > 0, got {t.tolist()}"
        )
    scale, pad_x, pad_y = t
    out: Array = (xyxy - np.array([pad_x, pad_y, pad_x, pad_y])) / scale
    return out
