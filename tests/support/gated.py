"""A backend whose runs wait on a gate the test opens: makes queueing tests deterministic.

It exercises the engine's own scheduling; real-runtime behaviour is tested with onnxruntime.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from appliance.backends.base import Backend, LoadContext
from appliance.device import Placement
from appliance.manifest import Manifest
from appliance.tensors import Signature, TensorSpec

SIGNATURE = Signature(
    (TensorSpec("x", "FP32", (-1,)),),
    (TensorSpec("y", "FP32", (-1,)),),
)


class GatedBackend(Backend):
    name = "gated"
    platform = "test_gated"
    #: Tests set this gate; runs block until it opens.
    gate = threading.Event()
    started = threading.Semaphore(0)
    runs = 0
    #: Extra seconds each run takes once the gate is open.
    delay = 0.0

    @classmethod
    def inspect(cls, path: Path) -> tuple[Signature, dict[str, Any]]:
        return SIGNATURE, {}

    def __init__(self, manifest: Manifest, path: Path, context: LoadContext) -> None:
        self.signature = SIGNATURE
        self.placement = Placement("cpu", "gated")

    def run(
        self, inputs: dict[str, np.ndarray[Any, Any]], outputs: list[str] | None
    ) -> dict[str, Any]:
        type(self).runs += 1
        type(self).started.release()
        if not type(self).gate.wait(30):
            raise RuntimeError("gate never opened")
        if type(self).delay:
            time.sleep(type(self).delay)
        return {"y": inputs["x"] * 2}


class TickingTextBackend(GatedBackend):
    """A language model that streams one token every 10 ms until told to stop (at most 10 s):
    makes tests of a client leaving mid-stream independent of how fast a real model is."""

    name = "ticking"
    platform = "test_ticking"
    mode = "chat"
    finished: list[str] = []

    def generate(self, request: Any, emit: Any, cancelled: Any) -> Any:
        from appliance.llm import GenerationResult

        tokens = 0
        finish = "length"
        while tokens < 1000:
            if cancelled():
                finish = "cancelled"
                break
            tokens += 1
            if emit is not None:
                emit("x")
            time.sleep(0.01)
        type(self).finished.append(finish)
        return GenerationResult("x" * tokens, finish, 1, tokens)

    def embed(self, texts: list[str]) -> Any:
        raise NotImplementedError


class BatchingGatedBackend(GatedBackend):
    """The gated backend, batchable, with a 2-D input: records the rows of every run and
    rejects any run holding the value 13 (a member the runtime refuses, for isolation tests)."""

    name = "gated_batch"
    platform = "test_gated_batch"
    batchable = True
    signature_2d = Signature(
        (TensorSpec("x", "FP32", (-1, -1)),),
        (TensorSpec("y", "FP32", (-1, -1)),),
    )
    #: Rows of each run, in order.
    calls: list[int] = []

    def __init__(self, manifest: Manifest, path: Path, context: LoadContext) -> None:
        super().__init__(manifest, path, context)
        self.signature = self.signature_2d

    def run(
        self, inputs: dict[str, np.ndarray[Any, Any]], outputs: list[str] | None
    ) -> dict[str, Any]:
        result = super().run(inputs, outputs)
        type(self).calls.append(int(inputs["x"].shape[0]))
        if (inputs["x"] == 13).any():
            from appliance.errors import InvalidInput

            raise InvalidInput("13 is unlucky")
        return result
