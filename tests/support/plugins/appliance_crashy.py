"""Backend plugins for the isolation tests, found through the `appliance.backends` entry points
(see the .dist-info beside this file).

`crashy` crashes its process on marked inputs, y = x * 2 otherwise. The crashes are genuine: a
null pointer read (SIGSEGV), abort() (SIGABRT), SIGKILL as the out-of-memory killer sends it,
or a hang. A model file that starts with b"crash on load" crashes the load.

A run with a NICE value answers the CPU priority (nice) of the thread that ran it.

`ticking` is a language model that streams a token every 10 ms until cancelled (at most 10 s).
"""

from __future__ import annotations

import ctypes
import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np

from appliance.backends.base import Backend, LoadContext
from appliance.device import Placement
from appliance.llm import Cancelled, EmbeddingResult, Emit, Generation, GenerationResult
from appliance.manifest import Manifest
from appliance.tensors import Signature, TensorSpec

SIGNATURE = Signature((TensorSpec("x", "FP32", (-1,)),), (TensorSpec("y", "FP32", (-1,)),))
#: Input values that crash (or stall) the run; UNSENDABLE gives an output no tensor can carry.
SEGFAULT, ABORT, KILLED, HANG, SLOW, UNSENDABLE = 13.0, 6.0, 9.0, 7.0, 5.0, 4.0
#: An input value whose answer is the running thread's nice value (Linux: per thread).
NICE = 17.0
#: How long a run with a SLOW value takes.
SLOW_S = 1.0


def segfault() -> None:
    ctypes.string_at(0)  # reads address 0: SIGSEGV


class CrashyBackend(Backend):
    name = "crashy"
    platform = "test_crashy"

    @classmethod
    def inspect(cls, path: Path) -> tuple[Signature, dict[str, Any]]:
        return SIGNATURE, {}

    def __init__(self, manifest: Manifest, path: Path, context: LoadContext) -> None:
        if path.read_bytes().startswith(b"crash on load"):
            segfault()
        self.signature = SIGNATURE
        self.placement = Placement("cpu", f"crashy in process {os.getpid()}")

    def run(
        self, inputs: dict[str, np.ndarray[Any, Any]], outputs: list[str] | None
    ) -> dict[str, np.ndarray[Any, Any]]:
        x = inputs["x"]
        if (x == SEGFAULT).any():
            segfault()
        if (x == ABORT).any():
            os.abort()
        if (x == KILLED).any():
            os.kill(os.getpid(), signal.SIGKILL)
        if (x == HANG).any():
            time.sleep(3600)
        if (x == SLOW).any():
            time.sleep(SLOW_S)
        if (x == NICE).any():
            return {"y": np.array([os.getpriority(os.PRIO_PROCESS, 0)], np.float32)}
        if (x == UNSENDABLE).any():
            return {"y": np.array([object()], dtype=object)}
        return {"y": x * 2}


class TickingBackend(CrashyBackend):
    name = "ticking"
    platform = "test_ticking"
    mode = "chat"

    def generate(
        self, request: Generation, emit: Emit | None, cancelled: Cancelled
    ) -> GenerationResult:
        tokens, finish = 0, "length"
        while tokens < 1000:
            if cancelled():
                finish = "cancelled"
                break
            tokens += 1
            if emit is not None:
                emit("x")
            time.sleep(0.01)
        return GenerationResult("x" * tokens, finish, 1, tokens)

    def embed(self, texts: list[str]) -> EmbeddingResult:
        raise NotImplementedError
