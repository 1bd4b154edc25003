"""Keeping part of a tensor: `threshold` (rows scoring high enough) and `top_k` (k largest).

    {"type": "threshold", "value": 0.5, "also": ["boxes", "classes"]}
    {"type": "top_k", "k": 5}

threshold reads `scores` ([N], [1, N] or [N, 1]) and keeps the rows whose score is at least
`value` (NaN never is) in it and in each tensor named in `also` (by default `boxes` and
`classes` when there are such tensors), keeping their order; a tensor is aligned when its first
dimension is N, or its second with a first of 1 ([1, N, ...]). Each is written under its own
name (rename with `outputs`). Request parameter `threshold` overrides `value`.

top_k reads `scores` ([..., n]) and writes `values` (same datatype) and `indices` (INT64), each
[..., min(k, n)]: the k largest along the last axis, largest first, ties by the lower index
(NaN counts as the smallest). Fewer than k (e.g. 3 detections, k 5) gives them all. Request
parameter `top_k` overrides `k`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from ..errors import InvalidInput
from ..tensors import TensorSpec
from .base import Array, Arrays, Step, StepCall, StepContext, unknown_keys
from .options import (
    NAME_KEYS,
    NUMERIC_TYPES,
    Names,
    check_spec,
    integer,
    names,
    number,
    numeric,
    param_int,
    param_number,
    tensor,
)

#: What threshold filters besides the scores when the declaration does not say.
DEFAULT_ALSO = ("boxes", "classes")
#: The largest k a declaration or a request may ask for.
MAX_K = 1 << 20


def rows_of(scores: Array, name: str) -> int:
    if scores.ndim == 1 or (scores.ndim == 2 and 1 in scores.shape):
        return int(scores.size)
    raise InvalidInput(
        f"tensor {name!r} must be scores [N], [1, N] or [N, 1], got {list(scores.shape)}"
    )


def keep_rows(array: Array, rows: Array, n: int, name: str, scores: str) -> Array:
    """`array`'s rows `rows` along its row axis (the first, or the second after a 1)."""
    if array.ndim >= 1 and array.shape[0] == n:
        return array[rows]
    if array.ndim >= 2 and array.shape[0] == 1 and array.shape[1] == n:
        return array[:, rows]
    raise InvalidInput(
        f"tensor {name!r} has shape {list(array.shape)}: not aligned with the {n} rows of "
        f"{scores!r} ([{n}, ...] or [1, {n}, ...])"
    )


class ThresholdStep(Step):
    """Keep the rows scoring at least `value`, in several aligned tensors."""

    type: ClassVar[str] = "threshold"
    parameters: ClassVar[Mapping[str, str]] = {
        "threshold": "keep the rows whose score is at least this",
    }
    _keys: ClassVar[frozenset[str]] = NAME_KEYS | {"value", "also"}

    def __init__(self, names_: Names, value: float, also: list[str] | None) -> None:
        self.names, self.value, self.also = names_, value, also
        self.reads, self.writes = names_.reads, names_.writes
        self.optional = names_.optional

    @classmethod
    def parse(cls, config: Mapping[str, Any], ctx: StepContext) -> Step:
        unknown_keys(config, cls._keys, ctx)
        value = number(config, "value", ctx, 0.5)
        also = config.get("also")
        if also is not None and not (
            isinstance(also, list) and all(isinstance(a, str) and a for a in also)
        ):
            raise ctx.bad("also", f"must be a list of tensor names, got {also!r}")
        if also is not None and ("scores" in also or len(set(also)) != len(also)):
            raise ctx.bad("also", f"names a tensor twice or the scores: {also!r}")
        roles = tuple(also) if also is not None else ()
        optional = () if also is not None else DEFAULT_ALSO
        n = names(
            config,
            ctx,
            ("scores", *roles),
            ("scores", *roles, *optional),
            optional=optional,
            same_as={r: r for r in ("scores", *roles, *optional)},
        )
        # an optional role that is not read is not written either
        outputs = {r: o for r, o in n.outputs.items() if r in n.inputs}
        n = Names(n.inputs, outputs, n.maybe)
        for role, name in n.inputs.items():
            ranks = (1, 2) if role == "scores" else None
            check_spec(ctx, f"inputs.{role}", name, ranks=ranks)
        check_spec(ctx, "inputs.scores", n.inputs["scores"], datatypes=NUMERIC_TYPES)
        return cls(n, value, also)

    def specs(self, given: Mapping[str, TensorSpec]) -> dict[str, TensorSpec]:
        out: dict[str, TensorSpec] = {}
        for role, name in self.names.inputs.items():
            spec = given.get(name)
            if spec is None or not spec.shape:
                continue
            shape = list(spec.shape)
            if len(shape) >= 2 and shape[0] == 1:
                shape[1] = -1  # [1, N, ...]: the rows are the second dimension ...
            shape[0] = -1  # ... unless N is 1 too: then they are the first
            target = self.names.outputs[role]
            out[target] = TensorSpec(target, spec.datatype, tuple(shape))
        return out

    def run(self, tensors: Mapping[str, Array], call: StepCall) -> Arrays:
        value = param_number(call.parameters, "threshold", self.value, -math.inf, math.inf)
        scores_name = self.names.inputs["scores"]
        scores = numeric(tensor(tensors, scores_name, "scores"), scores_name)
        n = rows_of(scores, scores_name)
        rows = np.flatnonzero(scores.reshape(-1) >= value)
        out: Arrays = {}
        for role, name in self.names.inputs.items():
            if role in self.names.maybe and name not in tensors:
                continue
            array = tensor(tensors, name, role)
            out[self.names.outputs[role]] = keep_rows(array, rows, n, name, scores_name)
        return out

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type, "value": self.value}
        if self.also is not None:
            out["also"] = list(self.also)
        return {**out, **self.names.describe()}


class TopKStep(Step):
    """The k largest values along the last axis, and where they were."""

    type: ClassVar[str] = "top_k"
    parameters: ClassVar[Mapping[str, str]] = {"top_k": "how many to keep (at least 1)"}
    _keys: ClassVar[frozenset[str]] = NAME_KEYS | {"k"}

    def __init__(self, names_: Names, k: int) -> None:
        self.names, self.k = names_, k
        self.reads, self.writes = names_.reads, names_.writes
        self.optional = names_.optional

    @classmethod
    def parse(cls, config: Mapping[str, Any], ctx: StepContext) -> Step:
        unknown_keys(config, cls._keys, ctx)
        k = integer(config, "k", ctx, 1, 1, MAX_K)
        n = names(config, ctx, ("scores",), ("values", "indices"))
        spec = check_spec(ctx, "inputs.scores", n.inputs["scores"], datatypes=NUMERIC_TYPES)
        if spec is not None and not spec.shape:
            raise ctx.bad("inputs.scores", f"tensor {spec.name!r} is a scalar: nothing to rank")
        return cls(n, k)

    def specs(self, given: Mapping[str, TensorSpec]) -> dict[str, TensorSpec]:
        spec = given.get(self.names.inputs["scores"])
        if spec is None or not spec.shape:
            return {}
        # the request's top_k may change k: the last dimension is not fixed
        shape = (*spec.shape[:-1], -1)
        values, indices = self.names.outputs["values"], self.names.outputs["indices"]
        return {
            values: TensorSpec(values, spec.datatype, shape),
            indices: TensorSpec(indices, "INT64", shape),
        }

    def run(self, tensors: Mapping[str, Array], call: StepCall) -> Arrays:
        k = param_int(call.parameters, "top_k", self.k, 1, MAX_K)
        name = self.names.inputs["scores"]
        x = numeric(tensor(tensors, name, "scores"), name)
        if x.ndim == 0:
            raise InvalidInput(f"tensor {name!r} is a scalar: nothing to rank")
        order = descending(x)[..., :k]
        return {
            self.names.outputs["values"]: np.take_along_axis(x, order, axis=-1),
            self.names.outputs["indices"]: order.astype(np.int64),
        }

    def describe(self) -> dict[str, Any]:
        return {"type": self.type, "k": self.k, **self.names.describe()}


def descending(x: Array) -> Array:
    """Indices sorting the last axis from the largest, ties by the lower index, NaN last."""
    if x.dtype.kind == "f":
        return np.argsort(-x, axis=-1, kind="stable")
    # integers: negating overflows; a stable ascending sort of the reversed axis, reversed,
    # puts equal values in index order
    n = x.shape[-1]
    rev = np.argsort(x[..., ::-1], axis=-1, kind="stable")[..., ::-1]
    out: Array = (n - 1) - rev
    return out
