"""appliance/codec.py on its own, at many examples a second: whatever the bytes, decode_request
returns a request or raises InvalidInput (the error every front turns into a 400)."""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import orjson
from hypothesis import given
from hypothesis import strategies as st

from appliance.codec import InferRequest, InferResponse, decode_request, encode_response
from appliance.errors import InvalidInput

from . import schemas
from .kserve import Request, valid_requests
from .mutate import dumps, mutations
from .oracle import judge

DATATYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
             "FP16", "FP32", "FP64", "BYTES"]  # fmt: skip


@st.composite
def signatures(draw: st.DrawFn) -> dict[str, Any]:
    """A made-up model: 1-3 inputs of any datatype, shapes with fixed and dynamic dimensions."""
    names = draw(st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=3, unique=True))
    shape = st.lists(st.sampled_from([-1, 1, 2, 3]), min_size=0, max_size=3)
    inputs = [
        {"name": n, "datatype": draw(st.sampled_from(DATATYPES)), "shape": draw(shape)}
        for n in names
    ]
    return {"name": "m", "inputs": inputs, "outputs": [{"name": "out", "datatype": "FP32"}]}


def decode(body: bytes, header_length: int | None = None) -> tuple[int, str]:
    """(200, "") when the codec takes it, (400, message) when it refuses it."""
    try:
        decode_request(body, header_length)
    except InvalidInput as exc:
        return 400, exc.message
    return 200, ""


@given(signatures().flatmap(valid_requests))
def test_valid_requests_decode(request: Request) -> None:
    body, headers = request.wire()
    length = headers.get("Inference-Header-Content-Length")
    decoded = decode_request(body, None if length is None else int(length))
    assert sorted(decoded.inputs) == sorted(i["name"] for i in request.body["inputs"])


@given(
    signatures()
    .flatmap(lambda s: valid_requests(s, binary_inputs=False))
    .flatmap(lambda r: mutations(r.body))
)
def test_mutated_requests_are_refused_by_name(mutation: Any) -> None:
    status, message = decode(mutation.wire())
    judge(mutation, status, message, schemas.oip(), "inference_request", allowed=(400,))


@given(schemas.oip().valid_values("inference_request"))
def test_schema_valid_requests_never_crash(body: Any) -> None:
    decode(dumps(body))


@given(st.binary(max_size=300))
def test_any_bytes(body: bytes) -> None:
    decode(body)


@given(
    signatures().flatmap(lambda s: valid_requests(s, binary_inputs=True)),
    st.data(),
)
def test_binary_framing(request: Request, data: st.DataObject) -> None:
    """Inference-Header-Content-Length and binary_data_size that do not add up."""
    body, _ = request.wire()
    length = len(body) - len(request.binary)
    choice = data.draw(st.sampled_from(["length", "truncate", "extend", "size", "bytes-count"]))
    if choice == "length":
        length = data.draw(st.integers(-3, len(body) + 3))
    elif choice == "truncate":
        body = body[: data.draw(st.integers(0, len(body)))]
    elif choice == "extend":
        body += data.draw(st.binary(min_size=1, max_size=9))
    elif choice == "size":
        items = [i for i in request.body["inputs"] if "parameters" in i]
        if not items:
            return
        item = data.draw(st.sampled_from(items))
        item["parameters"]["binary_data_size"] = data.draw(st.integers(0, 2**64 - 1))
        head = orjson.dumps(request.body)
        body, length = head + request.binary, len(head)
    else:  # a BYTES element whose 4-byte length prefix lies
        if not request.binary:
            return
        at = data.draw(st.integers(0, max(0, len(request.binary) - 4)))
        lie = struct.pack("<I", data.draw(st.integers(0, 2**32 - 1)))
        blob = request.binary[:at] + lie + request.binary[at + 4 :]
        body = body[:length] + blob[: len(request.binary)]
    decode(body, length)


def test_non_finite_outputs_travel_as_strings_json_allows() -> None:
    """JSON has no NaN: a model's NaN or infinity comes back as the strings numpy reads back
    (the schema's tensor data allows strings), not as null."""
    outputs = {"y": np.array([[1.5, np.nan], [np.inf, -np.inf]], dtype=np.float32)}
    body, _ = encode_response(InferResponse("m", "1", outputs), InferRequest({}))
    head = orjson.loads(body)
    assert head["outputs"][0]["data"] == [1.5, "NaN", "Infinity", "-Infinity"]
    assert not schemas.oip().errors("inference_response", head)
    back = np.array(head["outputs"][0]["data"], dtype=np.float32).reshape(2, 2)
    np.testing.assert_array_equal(back, outputs["y"])
