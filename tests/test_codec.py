"""The KServe v2 codec both ways: what a client encodes the server decodes, and back.

`encode_request`/`decode_request` and `encode_response`/`decode_response` are each other's
inverse: checked as a property over many random requests and responses (every datatype, JSON
and binary, empty and scalar shapes, extreme values), from a fixed seed so a failure repeats.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import orjson
import pytest

from appliance.codec import (
    InferRequest,
    InferResponse,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
)
from appliance.errors import InvalidInput
from appliance.tensors import DATATYPES, INT_TYPES, datatype_of

CASES = 300
Array = np.ndarray[Any, Any]


def random_tensor(rng: np.random.Generator, datatype: str, utf8: bool) -> Array:
    shape = tuple(int(d) for d in rng.integers(0, 4, size=int(rng.integers(0, 4))))
    n = math.prod(shape)
    if datatype == "BYTES":
        out = np.empty(n, dtype=object)
        for i in range(n):
            if utf8:
                out[i] = "".join(chr(c) for c in rng.integers(32, 0x3000, size=rng.integers(0, 6)))
                out[i] = out[i].encode("utf-8")
            else:
                out[i] = (
                    rng.integers(0, 256, size=int(rng.integers(0, 6))).astype(np.uint8).tobytes()
                )
        return out.reshape(shape)
    dtype = DATATYPES[datatype]
    if datatype == "BOOL":
        return rng.random(shape) < 0.5
    if datatype in INT_TYPES:
        info = np.iinfo(dtype)
        picks = np.array([info.min, info.max, 0, 1], dtype=dtype)
        values = rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
        return np.where(rng.random(shape) < 0.2, rng.choice(picks, size=shape), values)
    finfo = np.finfo(dtype)
    values = (rng.standard_normal(shape) * 10.0 ** rng.integers(-3, 4)).astype(dtype)
    extremes = np.array([finfo.max, finfo.min, finfo.tiny, -0.0], dtype=dtype)
    return np.where(rng.random(shape) < 0.1, rng.choice(extremes, size=shape), values)


def random_tensors(rng: np.random.Generator, utf8: bool, prefix: str) -> dict[str, Array]:
    names = [f"{prefix}{i}" for i in range(int(rng.integers(1, 5)))]
    kinds = list(DATATYPES)
    return {n: random_tensor(rng, kinds[int(rng.integers(len(kinds)))], utf8) for n in names}


def assert_same(got: dict[str, Array], want: dict[str, Array]) -> None:
    assert list(got) == list(want)
    for name, a in want.items():
        b = got[name]
        assert b.shape == a.shape, name
        assert b.dtype == a.dtype, (name, b.dtype, a.dtype)
        if a.dtype.kind == "f":
            np.testing.assert_array_equal(b, a, err_msg=name)  # NaN equals NaN here
        else:
            assert b.tolist() == a.tolist(), name


@pytest.mark.parametrize("binary", [False, True])
def test_decode_request_inverts_encode_request(binary: bool) -> None:
    rng = np.random.default_rng(1)
    for _ in range(CASES):
        inputs = random_tensors(rng, utf8=not binary, prefix="in")
        request = InferRequest(
            inputs=inputs,
            datatypes={} if rng.random() < 0.5 else {n: datatype_of(a) for n, a in inputs.items()},
            outputs=None if rng.random() < 0.5 else {"a": bool(rng.random() < 0.5), "b": False},
            id=None if rng.random() < 0.5 else f"req-{int(rng.integers(1000))}",
            binary_output=bool(rng.random() < 0.5),
            timeout_s=None if rng.random() < 0.5 else int(rng.integers(1, 10**7)) / 1e6,
            parameters={} if rng.random() < 0.5 else {"priority": int(rng.integers(1, 3))},
        )
        if not request.parameters and rng.random() < 0.5:
            request.priority = int(rng.integers(1, 3))
        body, header_length = encode_request(request, binary_inputs=binary)
        assert (header_length is not None) == binary
        got = decode_request(body, header_length)
        assert_same(got.inputs, inputs)
        assert got.datatypes == {n: datatype_of(a) for n, a in inputs.items()}
        assert got.outputs == request.outputs
        assert got.id == request.id
        assert got.binary_output == request.binary_output
        assert got.timeout_s == request.timeout_s
        assert got.priority == (request.priority or request.parameters.get("priority"))
        for key, value in request.parameters.items():
            assert got.parameters[key] == value
        # and what was decoded encodes to the very same body
        assert encode_request(got, binary_inputs=binary) == (body, header_length)


@pytest.mark.parametrize("binary", [False, True])
def test_decode_response_inverts_encode_response(binary: bool) -> None:
    rng = np.random.default_rng(2)
    for _ in range(CASES):
        outputs = random_tensors(rng, utf8=not binary, prefix="out")
        for array in outputs.values():  # a NaN survives JSON as null, and binary as itself
            if array.dtype.kind == "f" and array.size:
                array.reshape(-1)[0] = np.nan
        response = InferResponse(
            model_name="m",
            model_version=str(int(rng.integers(1, 9))),
            outputs=outputs,
            id=None if rng.random() < 0.5 else "r-1",
            parameters=None if rng.random() < 0.5 else {"task": "t", "cached": False},
        )
        request = InferRequest(inputs={}, binary_output=binary)
        body, header_length = encode_response(response, request)
        got = decode_response(body, header_length)
        assert_same(got.outputs, outputs)
        assert (got.model_name, got.model_version, got.id, got.parameters) == (
            response.model_name,
            response.model_version,
            response.id,
            response.parameters,
        )


def test_mixed_binary_and_json_outputs_decode() -> None:
    out = {"p": np.array([[0.5, 0.25]], dtype=np.float32), "s": np.array([b"\xff", b"ok"], object)}
    request = InferRequest(inputs={}, outputs={"p": False, "s": True})
    body, header_length = encode_response(InferResponse("m", "1", out), request)
    assert header_length is not None
    assert_same(decode_response(body, header_length).outputs, out)


def test_request_bytes_that_are_not_utf8_need_binary() -> None:
    request = InferRequest(inputs={"s": np.array([b"\xff"], dtype=object)})
    with pytest.raises(InvalidInput, match="input 's' holds bytes that are not UTF-8"):
        encode_request(request)
    body, header_length = encode_request(request, binary_inputs=True)
    assert decode_request(body, header_length).inputs["s"].tolist() == [b"\xff"]


def test_declared_datatype_wins_over_the_array_dtype() -> None:
    x = np.array([1.5, 2.0], dtype=np.float64)
    for binary in (False, True):
        body, header_length = encode_request(
            InferRequest(inputs={"x": x}, datatypes={"x": "FP16"}), binary_inputs=binary
        )
        got = decode_request(body, header_length)
        assert got.datatypes == {"x": "FP16"} and got.inputs["x"].dtype == np.float16
        assert got.inputs["x"].tolist() == [1.5, 2.0]


@pytest.mark.parametrize(
    ("body", "header_length", "message"),
    [
        (b"[1]", None, "response body must be a JSON object"),
        (b"{", None, "malformed JSON in response"),
        (b'{"outputs": 3}', None, "'outputs' list"),
        (b'{"model_name": 1, "outputs": []}', None, "'model_name' must be a string"),
        (b'{"outputs": [], "parameters": []}', None, "'parameters' must be a JSON object"),
        (b'{"outputs": [{"datatype": "FP32"}]}', None, r"outputs\[0\] needs a 'name'"),
        (
            b'{"outputs": [{"name": "y", "datatype": "FP32", "shape": [2], "data": [1, "a"]}]}',
            None,
            "output 'y': FP32 data must be numbers",
        ),
        (
            b'{"outputs": [{"name": "y", "datatype": "FP32", "shape": [1],'
            b' "parameters": {"binary_data_size": 8}}]}xxxx',
            None,
            "runs past the end",
        ),
        (b'{"outputs": []}', 99, "Inference-Header-Content-Length is 99"),
    ],
)
def test_malformed_responses_are_refused_naming_the_field(
    body: bytes, header_length: int | None, message: str
) -> None:
    if header_length is None and b"}xxxx" in body:
        header_length = body.index(b"}xxxx") + 1
    with pytest.raises(InvalidInput, match=message):
        decode_response(body, header_length)


def test_nulls_are_nan_in_float_responses_only() -> None:
    body = b'{"outputs": [{"name": "y", "datatype": "FP32", "shape": [2], "data": [null, 1]}]}'
    y = decode_response(body).outputs["y"]
    assert y.dtype == np.float32 and math.isnan(y[0]) and y[1] == 1.0
    request = b'{"inputs": [{"name": "y", "datatype": "FP32", "shape": [2], "data": [null, 1]}]}'
    with pytest.raises(InvalidInput, match="FP32 data must be numbers"):
        decode_request(request)


@pytest.mark.parametrize(
    ("datatype", "value", "ok"),
    [
        ("FP32", 3.4028235e38, True),  # FP32's largest, as a short JSON number: rounds to it
        ("FP32", -3.4028235e38, True),
        ("FP32", 3.5e38, False),
        ("FP32", 1e300, False),
        ("FP16", 65519.0, True),  # rounds down to 65504
        ("FP16", 65520.0, False),  # rounds to infinity
        ("FP64", 1e300, True),
    ],
)
def test_float_data_past_its_type_is_refused_by_name(datatype: str, value: float, ok: bool):
    body = orjson.dumps(
        {"inputs": [{"name": "x", "datatype": datatype, "shape": [2], "data": [1.0, value]}]}
    )
    if ok:
        assert np.isfinite(decode_request(body).inputs["x"]).all()
    else:
        with pytest.raises(InvalidInput, match=f"input 'x': value out of range for {datatype}"):
            decode_request(body)


def test_a_bytes_shape_larger_than_its_binary_data_is_refused_before_allocating() -> None:
    """The gRPC fuzzer's find: a BYTES shape of 2**40 elements over 18 bytes of data was
    allocated (24 TiB of object slots: a 500) before the data was read."""
    head = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "t",
                    "datatype": "BYTES",
                    "shape": [2**40],
                    "parameters": {"binary_data_size": 18},
                }
            ]
        }
    )
    with pytest.raises(InvalidInput, match="18 bytes cannot hold 1099511627776 elements"):
        decode_request(head + b"\x00" * 18, len(head))
