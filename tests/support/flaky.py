"""A backend that fails when a test says so: for fallbacks, circuit breakers and retries.

y = x * 2, like the gated backend, so answers are checkable; the class-level switches below say
which models fail and how. Failures are real exceptions raised inside `run`, on the worker
thread, so they take the same path to the client as a crashing runtime.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from appliance.backends.base import Backend, LoadContext
from appliance.device import Placement
from appliance.manifest import Manifest
from appliance.tensors import Signature, TensorSpec

SIGNATURE = Signature(
    (TensorSpec("x", "FP32", (-1,)),),
    (TensorSpec("y", "FP32", (-1,)),),
)


class FlakyBackend(Backend):
    name = "flaky"
    platform = "test_flaky"
    #: Models that raise on every run.
    broken: ClassVar[set[str]] = set()
    #: Model -> how many of its next runs raise (a transient fault).
    fail_next: ClassVar[dict[str, int]] = {}
    #: Model -> runs that reached the runtime.
    calls: ClassVar[dict[str, int]] = {}
    lock = threading.Lock()

    @classmethod
    def reset(cls) -> None:
        cls.broken = set()
        cls.fail_next = {}
        cls.calls = {}

    @classmethod
    def inspect(cls, path: Path) -> tuple[Signature, dict[str, Any]]:
        return SIGNATURE, {}

    def __init__(self, manifest: Manifest, path: Path, context: LoadContext) -> None:
        self.model = manifest.name
        self.signature = SIGNATURE
        self.placement = Placement("cpu", "flaky")

    def run(
        self, inputs: dict[str, np.ndarray[Any, Any]], outputs: list[str] | None
    ) -> dict[str, Any]:
        cls = type(self)
        with cls.lock:
            cls.calls[self.model] = cls.calls.get(self.model, 0) + 1
            transient = cls.fail_next.get(self.model, 0)
            if transient:
                cls.fail_next[self.model] = transient - 1
        if transient:
            raise RuntimeError(f"{self.model}: transient fault")
        if self.model in cls.broken:
            raise RuntimeError(f"{self.model}: broken")
        x = inputs["x"]
        if x.size and float(x.min()) < 0:  # "chosen inputs": negative values crash it
            raise RuntimeError(f"{self.model}: cannot take negative input")
        return {"y": x * 2}
