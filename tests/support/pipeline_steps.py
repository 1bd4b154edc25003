"""Small steps for the pipeline tests, registered by monkeypatching appliance.steps._STEPS
(`register(monkeypatch)`): the built-in step modules are written elsewhere."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest

from appliance import steps
from appliance.errors import InvalidInput
from appliance.steps.base import Array, Arrays, Step, StepCall, StepContext, unknown_keys
from appliance.tensors import TensorSpec

TYPES = {
    "t_identity": "tests.support.pipeline_steps:Identity",
    "t_fail": "tests.support.pipeline_steps:Fail",
    "t_scale": "tests.support.pipeline_steps:Scale",
    "t_embed": "tests.support.pipeline_steps:Embed",
    "t_size": "tests.support.pipeline_steps:Size",
}


def register(monkeypatch: pytest.MonkeyPatch) -> None:
    for type_, target in TYPES.items():
        monkeypatch.setitem(steps._STEPS, type_, target)


def _names(config: Mapping[str, Any], ctx: StepContext) -> tuple[str, ...]:
    names = config.get("names", ["x"])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ctx.bad("names", "must be a list of tensor names")
    return tuple(names)


class Identity(Step):
    """Writes what it reads (a fan-out point, or a pass-through)."""

    type = "t_identity"

    def __init__(self, names: tuple[str, ...]) -> None:
        self.reads = self.writes = names

    @classmethod
    def parse(cls, config: Mapping[str, Any], ctx: StepContext) -> Step:
        unknown_keys(config, frozenset({"names"}), ctx)
        return cls(_names(config, ctx))

    def specs(self, given: Mapping[str, TensorSpec]) -> dict[str, TensorSpec]:
        return dict(given)

    def run(self, tensors: Mapping[str, Array], call: StepCall) -> Arrays:
        return {n: tensors[n] for n in self.reads}


class Scale(Step):
    """y = x * factor (FP32), blocking: run in a thread like a real heavy step."""

    type = "t_scale"
    blocking = True
    reads = ("x",)
    writes = ("y",)

    def __init__(self, factor: float) -> None:
        self.factor = factor

    @classmethod
    def parse(cls, config: Mapping[str, Any], ctx: StepContext) -> Step:
        unknown_keys(config, frozenset({"factor"}), ctx)
        factor = config.get("factor", 1.0)
        if not isinstance(factor, (int, float)):
            raise ctx.bad("factor", "must be a number")
        given = ctx.available.get("x")
        if given is not None and given.datatype != "FP32":
            raise ctx.bad("x", f"reads FP32, got {given.datatype}")
        return cls(float(factor))

    def specs(self, given: Mapping[str, TensorSpec]) -> dict[str, TensorSpec]:
        x = given.get("x")
        return {"y": TensorSpec("y", "FP32", x.shape if x else (-1, -1))}

    def run(self, tensors: Mapping[str, Array], call: StepCall) -> Arrays:
        return {"y": (tensors["x"] * self.factor).astype(np.float32)}


class Fail(Step):
    """Fails: as a bug ("crash", a 500) or as the client's mistake ("invalid", a 400)."""

    type = "t_fail"
    reads = ("x",)
    writes = ("never",)

    def __init__(self, how: str) -> None:
        self.how = how

    @classmethod
    def parse(cls, config: Mapping[str, Any], ctx: StepContext) -> Step:
        unknown_keys(config, frozenset({"how"}), ctx)
        return cls(str(config.get("how", "crash")))

    def specs(self, given: Mapping[str, TensorSpec]) -> dict[str, TensorSpec]:
        return {"never": TensorSpec("never", "FP32", (-1,))}

    def run(self, tensors: Mapping[str, Array], call: StepCall) -> Arrays:
        if self.how == "invalid":
            raise InvalidInput("this step refuses its input")
        raise RuntimeError("boom")


class Embed(Step):
    """Texts (BYTES [N]) -> FP32 [N, 4]: length, vowels, spaces, digits (a toy embedding)."""

    type = "t_embed"
    reads = ("text",)
    writes = ("vec",)

    @classmethod
    def parse(cls, config: Mapping[str, Any], ctx: StepContext) -> Step:
        unknown_keys(config, frozenset(), ctx)
        return cls()

    def specs(self, given: Mapping[str, TensorSpec]) -> dict[str, TensorSpec]:
        return {"vec": TensorSpec("vec", "FP32", (-1, 4))}

    def run(self, tensors: Mapping[str, Array], call: StepCall) -> Arrays:
        rows = []
        for item in tensors["text"].reshape(-1):
            t = item.decode() if isinstance(item, bytes) else str(item)
            rows.append([len(t), sum(c in "aeiou" for c in t), t.count(" "),
                         sum(c.isdigit() for c in t)])  # fmt: skip
        return {"vec": np.array(rows, dtype=np.float32).reshape(-1, 4)}


def toy_embedding(text: str) -> list[float]:
    return [len(text), sum(c in "aeiou" for c in text), text.count(" "),
            sum(c.isdigit() for c in text)]  # fmt: skip


class Size(Step):
    """Encoded items (BYTES [N]) -> their sizes in bytes, INT64 [N] (a picture's stand-in)."""

    type = "t_size"
    reads = ("data",)
    writes = ("size",)

    @classmethod
    def parse(cls, config: Mapping[str, Any], ctx: StepContext) -> Step:
        unknown_keys(config, frozenset(), ctx)
        return cls()

    def specs(self, given: Mapping[str, TensorSpec]) -> dict[str, TensorSpec]:
        return {"size": TensorSpec("size", "INT64", (-1,))}

    def run(self, tensors: Mapping[str, Array], call: StepCall) -> Arrays:
        data = tensors["data"].reshape(-1)
        return {"size": np.array([len(item) for item in data], dtype=np.int64)}
