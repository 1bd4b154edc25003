"""The tensors of a run: deterministic inputs that fit the model, the infer request that carries
them (encoded by the appliance's own codec, as the server decodes it), and the check that the
server answers what the runtime answers."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..errors import InvalidInput, ModelError
from .client import HttpConnection, error_text, header
from .errors import BenchError

if TYPE_CHECKING:
    import numpy as np

    from ..tensors import TensorSpec

    Array = np.ndarray[Any, Any]

#: The seed of every generated input and of the chat requests: runs are repeatable.
SEED = 0


def make_inputs(specs: Sequence[TensorSpec], batch: int, seed: int = SEED) -> dict[str, Array]:
    """Deterministic random data that fits the signature (every -1 dimension becomes `batch`).

    BYTES tensors are object arrays of `str`, which is what onnxruntime takes for strings.
    """
    import numpy as np

    from ..tensors import DATATYPES, FLOAT_TYPES, INT_TYPES

    rng = np.random.default_rng(seed)
    out: dict[str, Array] = {}
    for spec in specs:
        shape = tuple(batch if d < 0 else d for d in spec.shape)
        dtype = DATATYPES.get(spec.datatype)
        if dtype is None:
            raise ModelError(f"input {spec.name!r} has datatype {spec.datatype}, unknown to bench")
        array: Array
        if spec.datatype in FLOAT_TYPES:
            array = rng.standard_normal(shape).astype(dtype)
        elif spec.datatype in INT_TYPES:
            array = rng.integers(0, 10, size=shape).astype(dtype)
        elif spec.datatype == "BOOL":
            array = rng.random(shape) < 0.5
        else:  # BYTES
            letters = "abcdefghijklmnopqrstuvwxyz"
            flat = [
                "".join(letters[int(i)] for i in rng.integers(0, 26, size=int(rng.integers(1, 9))))
                for _ in range(math.prod(shape))
            ]
            array = np.empty(len(flat), dtype=object)
            array[:] = flat
            array = array.reshape(shape)
        out[spec.name] = array
    return out


def infer_body(
    inputs: dict[str, Array],
    datatypes: dict[str, str],
    binary: bool,
    parameters: dict[str, Any] | None = None,
) -> tuple[bytes, int | None]:
    """A KServe v2 infer body; with `binary`, the binary tensor data extension both ways;
    `parameters` are the request's own (`{"priority": 1}`).

    Returns the body and, for binary, the JSON header length (Inference-Header-Content-Length).
    """
    from ..codec import InferRequest, encode_request

    request = InferRequest(
        inputs=inputs, datatypes=datatypes, binary_output=binary, parameters=parameters or {}
    )
    return encode_request(request, binary_inputs=binary)


def infer_request(
    inputs: dict[str, Array],
    datatypes: dict[str, str],
    binary: bool,
    token: str,
    parameters: dict[str, Any] | None = None,
) -> tuple[bytes, dict[str, str]]:
    """The KServe v2 infer body the load generators send, and its headers."""
    body, header_length = infer_body(inputs, datatypes, binary, parameters)
    headers = {"Content-Type": "application/octet-stream" if binary else "application/json"}
    if header_length is not None:
        headers["Inference-Header-Content-Length"] = str(header_length)
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return body, headers


def read_outputs(body: bytes, header_length: int | None) -> dict[str, Array]:
    """The outputs of the server's infer response, JSON or binary, as numpy arrays."""
    from ..codec import decode_response

    try:
        return decode_response(body, header_length).outputs
    except InvalidInput as exc:
        raise BenchError(f"the server's infer response is not KServe v2: {exc.message}") from None


def check_outputs(expected: dict[str, Array], got: dict[str, Array]) -> None:
    """The server must answer what the runtime answers for the same input, else the figures
    would compare different work."""
    import numpy as np

    from ..tensors import datatype_of

    if list(got) != list(expected):
        raise BenchError(
            f"the server returned outputs {list(got)} but the runtime gives {list(expected)}"
        )
    for name, want in expected.items():
        have = got[name]
        what = f"output {name!r}"
        if have.shape != want.shape:
            raise BenchError(
                f"{what}: the server returned shape {list(have.shape)}, the runtime "
                f"{list(want.shape)}"
            )
        kind = datatype_of(want)
        if kind == "BYTES":
            same = [_text(x) for x in have.reshape(-1)] == [_text(x) for x in want.reshape(-1)]
        elif want.dtype.kind == "f":
            rtol = 1e-3 if want.dtype == np.float16 else 1e-5
            same = bool(np.allclose(have, want, rtol=rtol, atol=1e-6, equal_nan=True))
        else:
            same = bool(np.array_equal(have, want))
        if not same:
            raise BenchError(
                f"{what}: the server's values differ from the runtime's for the same input "
                f"(server {_preview(have)}, runtime {_preview(want)})"
            )


def _text(item: Any) -> str:
    return item.decode("utf-8", "replace") if isinstance(item, bytes) else str(item)


def _preview(array: Array) -> str:
    flat = array.reshape(-1)[:6].tolist()
    return f"{flat}{'...' if array.size > 6 else ''}"


def check_answer(
    conn: HttpConnection, request: bytes, expected: dict[str, Array], who: str = "the server"
) -> bool:
    """Send `request` once and check the answer against the runtime's own outputs (before any
    timing: a server that answers wrongly is not worth measuring). True when it came binary."""
    status, head, reply = conn.exchange(request)
    if status != 200:
        raise BenchError(f"{who} answered {status}: {error_text(reply)}")
    length = header(head, b"Inference-Header-Content-Length")
    check_outputs(expected, read_outputs(reply, int(length) if length else None))
    return length is not None
