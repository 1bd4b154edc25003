"""The `clip` step: clamp tensors to a range (scores to [0, 1], a regression to what the
device can act on). NaN stays NaN: a model's fault should not be hidden as a bound.

    {"type": "clip", "tensors": ["y"], "min": 0.0, "max": 1.0}

`min` and `max` are both optional but one is needed; a request may narrow them with the
parameters `clip_min` / `clip_max` (never widen: the declaration is the operator's limit).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from appliance.errors import InvalidInput
from appliance.steps.base import Array, Arrays, Step, StepCall, StepContext, unknown_keys
from appliance.tensors import TensorSpec

_KEYS = frozenset({"tensors", "min", "max"})
_FLOATS = frozenset({"FP16", "FP32", "FP64"})


class ClipStep(Step):
    type = "clip"
    parameters = {
        "clip_min": "raise the lower bound for this request (a number)",
        "clip_max": "lower the upper bound for this request (a number)",
    }

    def __init__(self, tensors: tuple[str, ...], low: float | None, high: float | None) -> None:
        self.reads = self.writes = tensors
        self.low, self.high = low, high

    @classmethod
    def parse(cls, config: Mapping[str, Any], ctx: StepContext) -> ClipStep:
        unknown_keys(config, _KEYS, ctx)
        tensors = config.get("tensors")
        if (
            not isinstance(tensors, list)
            or not tensors
            or not all(isinstance(t, str) and t for t in tensors)
        ):
            raise ctx.bad("tensors", "must be a non-empty list of tensor names")
        if len(set(tensors)) != len(tensors):
            raise ctx.bad("tensors", "names a tensor twice")
        for name in tensors:
            spec = ctx.available.get(name)
            if ctx.available and spec is None:
                known = ", ".join(sorted(ctx.available))
                raise ctx.bad("tensors", f"no tensor {name!r} here (there are: {known})")
            if spec is not None and spec.datatype not in _FLOATS:
                raise ctx.bad("tensors", f"{name!r} is {spec.datatype}: clip takes FP16/32/64")
        low, high = _bound(config, "min", ctx), _bound(config, "max", ctx)
        if low is None and high is None:
            raise ctx.bad("min", "give min, max or both")
        if low is not None and high is not None and low > high:
            raise ctx.bad("max", f"{high:g} is below min {low:g}")
        return cls(tuple(tensors), low, high)

    def specs(self, given: Mapping[str, TensorSpec]) -> dict[str, TensorSpec]:
        return {name: given[name] for name in self.writes if name in given}

    def run(self, tensors: Mapping[str, Array], call: StepCall) -> Arrays:
        low = _narrow(self.low, call.parameters.get("clip_min"), "clip_min", max)
        high = _narrow(self.high, call.parameters.get("clip_max"), "clip_max", min)
        if low is not None and high is not None and low > high:
            raise InvalidInput(f"parameters: clip_min {low} is above clip_max {high}")
        out: Arrays = {}
        for name in self.reads:
            x = tensors[name]
            if x.dtype.kind != "f":
                raise InvalidInput(f"clip: tensor {name!r} is {x.dtype}, not floating point")
            out[name] = np.clip(x, low, high).astype(x.dtype, copy=False)
        return out

    def describe(self) -> dict[str, Any]:
        return {"type": self.type, "tensors": list(self.reads), "min": self.low, "max": self.high}


def _bound(config: Mapping[str, Any], key: str, ctx: StepContext) -> float | None:
    value = config.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ctx.bad(key, f"must be a finite number, got {value!r}")
    return float(value)


def _narrow(declared: float | None, asked: Any, name: str, pick: Any) -> float | None:
    """A request's bound, kept within the declared one."""
    if asked is None:
        return declared
    if isinstance(asked, bool) or not isinstance(asked, (int, float)) or not math.isfinite(asked):
        raise InvalidInput(f"parameters.{name}: must be a finite number, got {asked!r}")
    return float(asked) if declared is None else float(pick(declared, asked))
