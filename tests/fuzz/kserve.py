"""KServe v2 infer requests for Hypothesis: valid ones for a model's signature (JSON or binary
tensor data), and the checks every answer must pass."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
from hypothesis import strategies as st

from . import schemas

#: The sample models' signatures (build/make_sample_models.py), as GET /v2/models/{name} gives.
Signature = list[dict[str, Any]]

_INT_RANGES = {
    "UINT8": (0, 2**8 - 1), "UINT16": (0, 2**16 - 1), "UINT32": (0, 2**32 - 1),
    "UINT64": (0, 2**64 - 1), "INT8": (-(2**7), 2**7 - 1), "INT16": (-(2**15), 2**15 - 1),
    "INT32": (-(2**31), 2**31 - 1), "INT64": (-(2**63), 2**63 - 1),
}  # fmt: skip
_NUMPY = {
    "BOOL": "?", "UINT8": "<u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8",
    "INT8": "<i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8",
    "FP16": "<f2", "FP32": "<f4", "FP64": "<f8",
}  # fmt: skip


def values(datatype: str) -> st.SearchStrategy[Any]:
    """Elements of a tensor of this datatype, as JSON gives them."""
    if datatype == "BOOL":
        return st.booleans()
    if datatype in _INT_RANGES:
        lo, hi = _INT_RANGES[datatype]
        return st.integers(lo, hi)
    if datatype == "BYTES":
        return st.text(max_size=16)
    width = {"FP16": 16, "FP32": 32, "FP64": 64}[datatype]
    return st.floats(width=width, allow_nan=False, allow_infinity=False)  # type: ignore[arg-type]


def nest(flat: list[Any], shape: list[int]) -> Any:
    """A flat row-major list as nested lists of `shape`."""
    if len(shape) <= 1:
        return flat
    step = len(flat) // shape[0] if shape[0] else 0
    return [nest(flat[i * step : (i + 1) * step], shape[1:]) for i in range(shape[0])]


def binary_of(datatype: str, flat: list[Any]) -> bytes:
    if datatype == "BYTES":
        return b"".join(struct.pack("<I", len(b)) + b for b in (s.encode() for s in flat))
    return np.array(flat, dtype=_NUMPY[datatype]).tobytes()


@dataclass
class Request:
    """A request body and its HTTP framing."""

    body: dict[str, Any]
    #: Binary tensor data after the JSON (then Inference-Header-Content-Length is sent).
    binary: bytes = b""
    binary_inputs: list[str] = field(default_factory=list)

    def wire(self) -> tuple[bytes, dict[str, str]]:
        head = orjson.dumps(self.body)
        if not self.binary_inputs:
            return head, {"Content-Type": "application/json"}
        return head + self.binary, {
            "Content-Type": "application/octet-stream",
            "Inference-Header-Content-Length": str(len(head)),
        }


@st.composite
def valid_requests(
    draw: st.DrawFn,
    signature: dict[str, Any],
    binary_inputs: bool | None = None,
    binary_outputs: bool = True,
) -> Request:
    """A request the model must answer with 200: every input with the model's datatype and a
    shape it takes (dynamic dimensions all 1, 2 or 3), data flat or nested, or binary
    (`binary_inputs` True: all, False: none, None: some); some outputs asked for, some of them
    binary; optional id and parameters."""
    body: dict[str, Any] = {"inputs": []}
    binary = b""
    sent_binary = []
    size = draw(st.integers(1, 3))  # every dynamic dimension: models may name them alike
    for spec in signature["inputs"]:
        shape = [d if d >= 0 else size for d in spec["shape"]]
        n = int(np.prod(shape))
        flat = draw(st.lists(values(spec["datatype"]), min_size=n, max_size=n))
        item: dict[str, Any] = {"name": spec["name"], "datatype": spec["datatype"], "shape": shape}
        if binary_inputs or (binary_inputs is None and draw(st.booleans())):
            blob = binary_of(spec["datatype"], flat)
            item["parameters"] = {"binary_data_size": len(blob)}
            binary += blob
            sent_binary.append(spec["name"])
        else:
            item["data"] = nest(flat, shape) if draw(st.booleans()) else flat
        body["inputs"].append(item)
    outputs = [o["name"] for o in signature["outputs"]]
    if draw(st.booleans()):
        chosen = draw(st.lists(st.sampled_from(outputs), min_size=1, unique=True))
        body["outputs"] = []
        for name in chosen:
            out: dict[str, Any] = {"name": name}
            if binary_outputs and draw(st.booleans()):
                out["parameters"] = {"binary_data": draw(st.booleans())}
            body["outputs"].append(out)
    if draw(st.booleans()):
        body["id"] = draw(st.text(max_size=20))
    params: dict[str, Any] = {}
    if binary_outputs and draw(st.booleans()):
        params["binary_data_output"] = draw(st.booleans())
    if draw(st.booleans()):
        params["timeout"] = draw(st.integers(60_000_000, 2**63 - 1))  # microseconds
    if params:
        body["parameters"] = params
    elif draw(st.booleans()):
        body["parameters"] = {}
    return Request(body, binary, sent_binary)


def split(payload: bytes, header_length: str | None) -> tuple[Any, bytes]:
    """A response body: its JSON and its binary section."""
    if header_length is None:
        return orjson.loads(payload), b""
    n = int(header_length)
    return orjson.loads(payload[:n]), payload[n:]


def check_response(signature: dict[str, Any], request: Request, head: Any, binary: bytes) -> None:
    """A 200 answer: the published response schema, the outputs asked for, the datatypes the
    model declares, element counts matching shapes, binary sections adding up."""
    errors = response_errors(head)
    assert not errors, f"response does not match the OIP schema: {errors}\n{head}"
    declared = {o["name"]: o for o in signature["outputs"]}
    asked = [o["name"] for o in request.body.get("outputs", [])] or list(declared)
    got = [o["name"] for o in head["outputs"]]
    assert sorted(got) == sorted(asked), (got, asked)
    assert head["model_name"] == signature["name"]
    if "id" in request.body:
        assert head.get("id") == request.body["id"]
    offset = 0
    for out in head["outputs"]:
        assert out["datatype"] == declared[out["name"]]["datatype"], out
        n = int(np.prod(out["shape"]))
        size = (out.get("parameters") or {}).get("binary_data_size")
        if size is None:
            assert len(np.array(out["data"], dtype=object).reshape(-1)) == n, out
        else:
            offset += size
    assert offset == len(binary), f"binary section {len(binary)} bytes, outputs declare {offset}"


def response_errors(head: Any) -> list[str]:
    """What the OIP schema finds wrong with a response's JSON. It requires `data` on every
    output; a binary output (the binary tensor data extension) carries its size instead."""
    outputs = [
        {**o, "data": []} if "binary_data_size" in (o.get("parameters") or {}) else o
        for o in head.get("outputs", [])
    ]
    return schemas.oip().errors("inference_response", {**head, "outputs": outputs})
