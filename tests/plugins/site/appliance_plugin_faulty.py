"""A plugin with bugs: its step and its backend raise on the value 13 (y = x otherwise), and
it cannot read a model file that says "unreadable"."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from appliance.backends.base import Backend, LoadContext
from appliance.device import Placement
from appliance.manifest import Manifest
from appliance.steps.base import Array, Arrays, Step, StepCall, StepContext
from appliance.tensors import Signature, TensorSpec

SIGNATURE = Signature((TensorSpec("x", "FP32", (-1,)),), (TensorSpec("y", "FP32", (-1,)),))
BAD = 13.0


class ExplodeStep(Step):
    type = "explode"
    reads = writes = ("x",)

    @classmethod
    def parse(cls, config: Mapping[str, Any], ctx: StepContext) -> ExplodeStep:
        return cls()

    def run(self, tensors: Mapping[str, Array], call: StepCall) -> Arrays:
        if (tensors["x"] == BAD).any():
            raise RuntimeError("unlucky number")
        return {"x": tensors["x"]}


class FaultyBackend(Backend):
    name = "faulty"
    platform = "test_faulty"

    @classmethod
    def inspect(cls, path: Path) -> tuple[Signature, dict[str, Any]]:
        if path.read_bytes() == b"unreadable":
            raise KeyError("header")
        return SIGNATURE, {}

    def __init__(self, manifest: Manifest, path: Path, context: LoadContext) -> None:
        self.signature = SIGNATURE
        self.placement = Placement("cpu", "faulty")

    def run(
        self, inputs: dict[str, np.ndarray[Any, Any]], outputs: list[str] | None
    ) -> dict[str, np.ndarray[Any, Any]]:
        if (inputs["x"] == BAD).any():
            raise ValueError("unlucky number")
        return {"y": inputs["x"]}
