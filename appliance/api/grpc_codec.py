"""KServe v2 tensors in protobuf (the gRPC front's codec): ModelInferRequest -> InferRequest and
InferResponse -> ModelInferResponse, with the same checks and messages as the JSON codec.

Inputs come as `raw_input_contents` (what tritonclient sends: one bytes entry per input, in
order; BYTES elements each behind a 4-byte little-endian length) or as typed `contents`; a
request mixing the two is refused. Outputs always go back as `raw_output_contents`, as Triton
answers (tritonclient reads nothing else for non-BYTES outputs).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..codec import (
    InferRequest,
    InferResponse,
    bytes_from_binary,
    bytes_to_binary,
    check_shape,
    request_options,
)
from ..errors import InvalidInput
from ..tensors import DATATYPES, datatype_of
from .oip import grpc_service_pb2 as pb

#: The typed `contents` field each datatype's elements go in (FP16 has none: raw only).
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
_LE = {name: dtype.newbyteorder("<") for name, dtype in DATATYPES.items() if name != "BYTES"}


def parameters_of(params: Mapping[str, pb.InferParameter], what: str) -> dict[str, Any]:
    """A protobuf parameter map as the plain values the JSON codec would have read."""
    out: dict[str, Any] = {}
    for key, param in params.items():
        which = param.WhichOneof("parameter_choice")
        if which is None:
            raise InvalidInput(f"{what}parameters[{key!r}] holds no value")
        out[key] = getattr(param, which)
    return out


def set_parameters(target: Any, values: Mapping[str, Any]) -> None:
    """Fill a protobuf parameter map (InferParameter values) from plain values."""
    for key, value in values.items():
        param = target[key]
        if isinstance(value, bool):
            param.bool_param = value
        elif isinstance(value, int):
            if value >= 1 << 63:
                param.uint64_param = value
            else:
                param.int64_param = value
        elif isinstance(value, float):
            param.double_param = value
        else:
            param.string_param = value if isinstance(value, str) else str(value)


def _from_raw(raw: bytes, datatype: str, shape: tuple[int, ...], what: str) -> np.ndarray[Any, Any]:
    n = math.prod(shape)
    if datatype == "BYTES":
        return bytes_from_binary(raw, n, what).reshape(shape)
    dtype = _LE[datatype]
    if len(raw) != n * dtype.itemsize:
        raise InvalidInput(
            f"{what}: raw_input_contents holds {len(raw)} bytes but shape {list(shape)} of "
            f"{datatype} needs {n * dtype.itemsize}"
        )
    array = np.frombuffer(raw, dtype=dtype).reshape(shape)
    if datatype == "BOOL" and array.size and array.view(np.uint8).max() > 1:
        raise InvalidInput(f"{what}: BOOL raw data must be bytes 0 or 1")
    return array


def _from_contents(
    tensor: pb.ModelInferRequest.InferInputTensor, datatype: str, shape: tuple[int, ...], what: str
) -> np.ndarray[Any, Any]:
    n = math.prod(shape)
    field = CONTENTS_FIELD.get(datatype)
    present = [f.name for f, _ in tensor.contents.ListFields()]
    stray = [name for name in present if name != field]
    if stray:
        where = f"contents.{field}" if field else "raw_input_contents (it has no typed field)"
        raise InvalidInput(f"{what}: {datatype} data goes in {where}, got contents.{stray[0]}")
    if field is None:
        if n:
            raise InvalidInput(f"{what}: {datatype} data must come in raw_input_contents")
        return np.empty(shape, dtype=DATATYPES[datatype])
    values = getattr(tensor.contents, field)
    if len(values) != n:
        raise InvalidInput(
            f"{what}: contents.{field} has {len(values)} elements but shape {list(shape)} needs {n}"
        )
    target = DATATYPES[datatype]
    if datatype == "BYTES":
        out = np.empty(n, dtype=object)
        for i, item in enumerate(values):
            out[i] = bytes(item)
        return out.reshape(shape)
    if datatype in ("INT8", "INT16", "UINT8", "UINT16") and n:
        # int_contents and uint_contents are 32-bit: a narrower type's range is checked here
        wide = np.fromiter(values, dtype=np.int64, count=n)
        info = np.iinfo(target)
        if wide.min() < info.min or wide.max() > info.max:
            raise InvalidInput(
                f"{what}: value out of range for {datatype} ({info.min}..{info.max})"
            )
        return wide.astype(target).reshape(shape)
    return np.fromiter(values, dtype=target, count=n).reshape(shape)


def decode_infer(msg: pb.ModelInferRequest) -> InferRequest:
    """A ModelInferRequest as the protocol-neutral request (InvalidInput names the field)."""
    if not msg.inputs:
        raise InvalidInput("request needs at least one input in 'inputs'")
    raw = msg.raw_input_contents
    if raw and len(raw) != len(msg.inputs):
        raise InvalidInput(
            f"raw_input_contents has {len(raw)} entries but the request has {len(msg.inputs)} "
            "inputs: give one per input, in order, or none"
        )
    inputs: dict[str, np.ndarray[Any, Any]] = {}
    datatypes: dict[str, str] = {}
    for index, tensor in enumerate(msg.inputs):
        name = tensor.name
        if not name:
            raise InvalidInput(f"inputs[{index}] needs a 'name'")
        what = f"input '{name}'"
        if name in inputs:
            raise InvalidInput(f"{what} appears more than once")
        datatype = tensor.datatype
        if datatype not in DATATYPES:
            raise InvalidInput(
                f"{what}: unknown datatype {datatype[:40]!r} (one of {', '.join(DATATYPES)})"
            )
        shape = check_shape(list(tensor.shape), what)
        if raw:
            if tensor.HasField("contents"):
                raise InvalidInput(
                    f"{what}: has typed contents but the request also has raw_input_contents: "
                    "use one or the other for every input"
                )
            array = _from_raw(raw[index], datatype, shape, what)
        else:
            array = _from_contents(tensor, datatype, shape, what)
        inputs[name] = array
        datatypes[name] = datatype
    params = parameters_of(msg.parameters, "")
    outputs: dict[str, bool] | None = None
    if msg.outputs:
        outputs = {}
        for index, out in enumerate(msg.outputs):
            if not out.name:
                raise InvalidInput(f"outputs[{index}] needs a 'name'")
            out_params = parameters_of(out.parameters, f"output '{out.name}': ")
            if out_params.get("classification"):
                raise InvalidInput(
                    f"output '{out.name}': the classification extension is not supported"
                )
            outputs[out.name] = True
    timeout_s, priority = request_options(params)
    return InferRequest(
        inputs=inputs,
        outputs=outputs,
        id=msg.id or None,
        binary_output=True,
        timeout_s=timeout_s,
        priority=priority,
        parameters=params,
        datatypes=datatypes,
    )


def encode_infer(result: InferResponse) -> pb.ModelInferResponse:
    """An answer as a ModelInferResponse, every output in raw_output_contents."""
    msg = pb.ModelInferResponse(
        model_name=result.model_name, model_version=result.model_version, id=result.id or ""
    )
    for name, array in result.outputs.items():
        datatype = datatype_of(array)
        msg.outputs.add(name=name, datatype=datatype, shape=array.shape)
        if datatype == "BYTES":
            msg.raw_output_contents.append(bytes_to_binary(array))
        else:
            msg.raw_output_contents.append(
                np.ascontiguousarray(array, dtype=_LE[datatype]).tobytes()
            )
    if result.parameters:
        set_parameters(msg.parameters, result.parameters)
    return msg
