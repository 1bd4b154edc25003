"""Checks a decoded request against the model's signature before it reaches the runtime."""

from __future__ import annotations

from typing import Any

from ..codec import InferRequest
from ..errors import InvalidInput
from ..tensors import FLOAT_TYPES, Signature, TensorSpec, all_finite, datatype_of


def _names(specs: Any) -> str:
    return ", ".join(repr(t.name) for t in specs)


def validate(
    signature: Signature, request: InferRequest, allow_non_finite: bool
) -> list[str] | None:
    """Raise InvalidInput naming the exact problem; return the output names to compute."""
    by_name = signature.input_by_name
    for name in request.inputs:
        if name not in by_name:
            raise InvalidInput(
                f"unknown input {name!r}; the model's inputs are {_names(signature.inputs)}"
            )
    for spec in signature.inputs:
        array = request.inputs.get(spec.name)
        if array is None:
            raise InvalidInput(
                f"missing input {spec.name!r} ({spec.datatype} {list(spec.shape)}); the model's "
                f"inputs are {_names(signature.inputs)}"
            )
        declared = request.datatypes.get(spec.name) or datatype_of(array)
        if declared != spec.datatype:
            raise InvalidInput(
                f"input {spec.name!r}: the model expects datatype {spec.datatype}, got {declared}"
            )
        shape, wanted = array.shape, spec.shape
        if len(shape) != len(wanted):
            raise _shape_error(spec, shape)
        for want, got in zip(wanted, shape, strict=True):  # (a loop: no generator per input)
            if want >= 0 and want != got:
                raise _shape_error(spec, shape)
        if (
            not allow_non_finite
            and spec.datatype in FLOAT_TYPES
            and array.size
            and not all_finite(array)
        ):
            raise InvalidInput(
                f"input {spec.name!r} contains NaN or infinity, which this model does not accept"
            )
    if request.outputs is None:
        return None
    outs = signature.output_by_name
    for name in request.outputs:
        if name not in outs:
            raise InvalidInput(
                f"unknown output {name!r}; the model's outputs are {_names(signature.outputs)}"
            )
    return list(request.outputs)


def _shape_error(spec: TensorSpec, shape: tuple[int, ...]) -> InvalidInput:
    return InvalidInput(
        f"input {spec.name!r}: shape {list(shape)} does not match the model's "
        f"{list(spec.shape)} (-1 means any size)"
    )
