"""Test steps: "gate" holds a request inside its chain until the test lets it go (a version
switch can then happen while a request is being prepared); "boom" fails like a buggy plugin.
Registered for a test by the `test_steps` fixture (tests/steps/conftest.py)."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any, ClassVar

from appliance.steps.base import Array, Arrays, Step, StepCall, StepContext, unknown_keys


class GateStep(Step):
    """Passes `tensor` through, once the test sets `release`."""

    type = "gate"
    blocking: ClassVar[bool] = True
    entered: ClassVar[threading.Event] = threading.Event()
    release: ClassVar[threading.Event] = threading.Event()

    def __init__(self, tensor: str) -> None:
        self.reads = self.writes = (tensor,)

    @classmethod
    def parse(cls, config: Mapping[str, Any], ctx: StepContext) -> GateStep:
        unknown_keys(config, frozenset({"tensor"}), ctx)
        return cls(str(config.get("tensor", "features")))

    def run(self, tensors: Mapping[str, Array], call: StepCall) -> Arrays:
        self.entered.set()
        self.release.wait(30)
        return {self.reads[0]: tensors[self.reads[0]]}


class BoomStep(Step):
    """A step with a bug: it raises on every request (what a broken plugin does)."""

    type = "boom"

    def __init__(self, tensor: str) -> None:
        self.reads = (tensor,)
        self.writes = ("boom",)

    @classmethod
    def parse(cls, config: Mapping[str, Any], ctx: StepContext) -> BoomStep:
        unknown_keys(config, frozenset({"tensor"}), ctx)
        return cls(str(config.get("tensor", "scores")))

    def run(self, tensors: Mapping[str, Array], call: StepCall) -> Arrays:
        raise ZeroDivisionError("the step's own bug")
