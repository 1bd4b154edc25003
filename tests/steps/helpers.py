"""Building and running one step the way the request path and the pipeline executor do."""

from __future__ import annotations

from typing import Any

import numpy as np

from appliance.steps import parse_step
from appliance.steps.base import Step, StepCall, StepContext, run_step
from appliance.tensors import TensorSpec

WHERE = "model 'm' version 1: steps.output[0]"


def parse(decl: dict[str, Any], **available: tuple[str, tuple[int, ...]]) -> Step:
    """A step from its declaration; `available` gives name=(datatype, shape) of what it may read."""
    specs = {n: TensorSpec(n, dt, shape) for n, (dt, shape) in available.items()}
    return parse_step(decl, StepContext(WHERE, specs))


def run(step: Step, params: dict[str, Any] | None = None, **tensors: Any) -> dict[str, Any]:
    arrays = {k: np.asarray(v) for k, v in tensors.items()}
    return run_step(step, arrays, StepCall(params or {}), WHERE)
