"""Changing a tensor's type or shape: `cast` and `reshape`.

    {"type": "cast", "datatype": "FP32", "inputs": {"input": "logits"}}
    {"type": "reshape", "shape": [-1, 4], "inputs": {"input": "boxes"}}

Both read `input` and write `output`, by default under the name they read (so around a model
they change the tensor in place). cast converts to a numeric KServe datatype like the image
step's `dtype`: to an integer type values are rounded (half to even) and clamped to its range,
NaN is refused; to BOOL non-zero is true; to the same datatype it hands the array on
untouched. reshape takes a shape with at most one -1 (the rest inferred); an element count
that does not fit is an InvalidInput naming the tensor.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from ..errors import InvalidInput
from ..tensors import TensorSpec, datatype_of
from .base import Array, Arrays, Step, StepCall, StepContext, unknown_keys
from .options import NAME_KEYS, NUMERIC_TYPES, Names, cast_to, check_spec, datatype, is_int, names
from .options import tensor as tensor_named

_SAME = {"output": "input"}


class CastStep(Step):
    """A tensor in another numeric datatype."""

    type: ClassVar[str] = "cast"
    _keys: ClassVar[frozenset[str]] = NAME_KEYS | {"datatype"}

    def __init__(self, names_: Names, datatype_: str) -> None:
        self.names, self.datatype = names_, datatype_
        self._in, self._out = names_.inputs["input"], names_.outputs["output"]
        self.reads, self.writes = names_.reads, names_.writes
        self.optional = names_.optional

    @classmethod
    def parse(cls, config: Mapping[str, Any], ctx: StepContext) -> Step:
        unknown_keys(config, cls._keys, ctx)
        target = datatype(config, "datatype", ctx, None)
        n = names(config, ctx, ("input",), ("output",), same_as=_SAME)
        check_spec(ctx, "inputs.input", n.inputs["input"], datatypes=NUMERIC_TYPES)
        return cls(n, target)

    def specs(self, given: Mapping[str, TensorSpec]) -> dict[str, TensorSpec]:
        spec = given.get(self._in)
        if spec is None:
            return {}
        return {self._out: TensorSpec(self._out, self.datatype, spec.shape)}

    def run(self, tensors: Mapping[str, Array], call: StepCall) -> Arrays:
        try:
            array = tensors[self._in]
        except KeyError:
            raise InvalidInput(f"no tensor {self._in!r} (input) was given") from None
        return {self._out: cast_to(array, self.datatype, self._in)}

    def describe(self) -> dict[str, Any]:
        return {"type": self.type, "datatype": self.datatype, **self.names.describe()}


class ReshapeStep(Step):
    """A tensor with the same elements in another shape."""

    type: ClassVar[str] = "reshape"
    _keys: ClassVar[frozenset[str]] = NAME_KEYS | {"shape"}

    def __init__(self, names_: Names, shape: tuple[int, ...]) -> None:
        self.names, self.shape = names_, shape
        self.reads, self.writes = names_.reads, names_.writes
        self.optional = names_.optional

    @classmethod
    def parse(cls, config: Mapping[str, Any], ctx: StepContext) -> Step:
        unknown_keys(config, cls._keys, ctx)
        shape = config.get("shape")
        if not (
            isinstance(shape, list)
            and len(shape) <= 32
            and all(is_int(d) and d >= -1 for d in shape)
            and shape.count(-1) <= 1
        ):
            raise ctx.bad(
                "shape", f"must be a list of sizes (0 or more) with at most one -1, got {shape!r}"
            )
        n = names(config, ctx, ("input",), ("output",), same_as=_SAME)
        step = cls(n, tuple(shape))
        spec = ctx.available.get(n.inputs["input"])
        if spec is not None and step._fixed(spec.shape) is None:
            raise ctx.bad("shape", f"cannot hold the elements of {spec.name!r} {list(spec.shape)}")
        return step

    def _fixed(self, given: tuple[int, ...]) -> tuple[int, ...] | None:
        """The output shape for an input of shape `given` (-1 where unknown), or None when
        they cannot fit."""
        target = list(self.shape)
        if -1 in given:  # the element count is not known before a request
            return tuple(target)
        count = math.prod(given)
        known = math.prod(d for d in target if d != -1)
        if -1 not in target:
            return tuple(target) if known == count else None
        if known == 0 or count % known:
            return None
        target[target.index(-1)] = count // known
        return tuple(target)

    def specs(self, given: Mapping[str, TensorSpec]) -> dict[str, TensorSpec]:
        spec = given.get(self.names.inputs["input"])
        if spec is None:
            return {}
        shape = self._fixed(spec.shape)
        name = self.names.outputs["output"]
        return {name: TensorSpec(name, spec.datatype, shape if shape is not None else self.shape)}

    def run(self, tensors: Mapping[str, Array], call: StepCall) -> Arrays:
        name = self.names.inputs["input"]
        array = tensor_named(tensors, name, "input")
        try:
            out = np.reshape(array, self.shape)
        except ValueError:
            raise InvalidInput(
                f"tensor {name!r} {datatype_of(array)} {list(array.shape)} ({array.size} "
                f"elements) cannot be reshaped to {list(self.shape)}"
            ) from None
        return {self.names.outputs["output"]: out}

    def describe(self) -> dict[str, Any]:
        return {"type": self.type, "shape": list(self.shape), **self.names.describe()}
