"""KServe v2 tensor codec: JSON tensors and the binary tensor data extension.

Protocol-neutral: HTTP and MQTT both decode a body into an `InferRequest` here and encode an
`InferResponse` here, so they accept and refuse exactly the same things.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

from .errors import InvalidInput
from .tensors import DATATYPES, FLOAT_TYPES, INT_TYPES, all_finite, datatype_of, max_abs

if TYPE_CHECKING:
    from .formats.templates import Templates

_ORJSON_OPTS = orjson.OPT_SERIALIZE_NUMPY


@dataclass
class InferRequest:
    """One decoded inference request, independent of the protocol it arrived on."""

    inputs: dict[str, np.ndarray[Any, Any]]
    #: Requested outputs (None = all), each mapped to whether it should come back as binary.
    outputs: dict[str, bool] | None = None
    id: str | None = None
    #: All outputs binary unless an output says otherwise (tritonclient's default).
    binary_output: bool = False
    #: Client deadline in seconds (from Triton's `timeout` parameter, in microseconds).
    timeout_s: float | None = None
    #: Triton's `priority` parameter: 1 is the highest level; 0 or None the model's default
    #: (the runner maps it, see engine/priority.py).
    priority: int | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    #: The datatype each input was declared with on the wire.
    datatypes: dict[str, str] = field(default_factory=dict)


@dataclass
class InferResponse:
    model_name: str
    model_version: str
    outputs: dict[str, np.ndarray[Any, Any]]
    id: str | None = None
    #: Response parameters: which task answered, whether from the cache (routing/router.py).
    parameters: dict[str, Any] | None = None
    #: The report templates of the model (or pipeline) that answered, for the fronts to
    #: render with when the client asked for one of their formats (appliance/formats).
    templates: Templates | None = field(default=None, repr=False, compare=False)


#: numpy's portable limit on dimensions (NPY_MAXDIMS is 32 before numpy 2).
MAX_DIMS = 32
#: More elements than any body could carry; numpy cannot even describe some shapes past it
#: (a zero dimension beside huge ones).
MAX_ELEMENTS = 2**48


def _show(value: Any, limit: int = 60) -> str:
    """A client's value in an error message, cut short."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_shape(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise InvalidInput(f"{what}: 'shape' must be a list of integers, got {_show(value)}")
    if len(value) > MAX_DIMS:
        raise InvalidInput(f"{what}: 'shape' has {len(value)} dimensions, at most {MAX_DIMS}")
    size = 1  # the elements it describes, counting a 0 as a 1 (one pass: the hot path)
    for d in value:
        if type(d) is not int or d < 0:  # JSON's integers are ints; a bool is not one here
            raise InvalidInput(
                f"{what}: 'shape' must hold non-negative integers, got {_show(value)}"
            )
        if d > 1:
            size *= d
    if size > MAX_ELEMENTS:
        raise InvalidInput(f"{what}: 'shape' {_show(value)} describes too many elements")
    return tuple(value)


def _parameters(container: dict[str, Any], what: str) -> dict[str, Any]:
    """The `parameters` object of a request, an input or an output ({} when absent or null)."""
    params = container.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise InvalidInput(f"{what}'parameters' must be a JSON object, got {_show(params)}")
    return params


def _flag(params: dict[str, Any], key: str, default: bool, what: str) -> bool:
    value = params.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidInput(f"{what}parameters.{key} must be true or false, got {_show(value)}")
    return value


def _count(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def _from_json_data(
    data: Any, datatype: str, shape: tuple[int, ...], what: str, non_finite: bool = False
) -> np.ndarray[Any, Any]:
    if not isinstance(data, list):
        raise InvalidInput(f"{what}: 'data' must be a JSON array (flat or nested)")
    n = _count(shape)
    if datatype == "BYTES":
        try:
            flat = np.array(data, dtype=object).reshape(-1) if data else np.empty(0, dtype=object)
        except (ValueError, TypeError) as exc:
            raise InvalidInput(f"{what}: 'data' is not a regular array: {exc}") from None
        if flat.size != n:
            raise InvalidInput(
                f"{what}: 'data' has {flat.size} elements but shape {list(shape)} needs {n}"
            )
        out = np.empty(n, dtype=object)
        for i, item in enumerate(flat):
            if not isinstance(item, str):
                raise InvalidInput(
                    f"{what}: BYTES data must be strings, element {i} is {_show(item)}"
                )
            out[i] = item.encode("utf-8")
        return out.reshape(shape)
    try:
        arr = np.array(data)
    except (ValueError, TypeError) as exc:
        raise InvalidInput(f"{what}: 'data' is not a regular array: {exc}") from None
    if arr.size != n:
        raise InvalidInput(
            f"{what}: 'data' has {arr.size} elements but shape {list(shape)} needs {n}"
        )
    target = DATATYPES[datatype]
    kind = arr.dtype.kind
    if arr.size == 0:
        return np.empty(shape, dtype=target)
    if datatype == "BOOL":
        if kind != "b":
            raise InvalidInput(f"{what}: BOOL data must be true or false")
    elif datatype in INT_TYPES:
        info = np.iinfo(target)
        if kind == "f":  # numpy reads [1, 2**64 - 1] as float64: check the JSON integers
            flat = np.array(data, dtype=object).reshape(-1)
            if flat.size != arr.size or not all(type(x) is int for x in flat):
                raise InvalidInput(f"{what}: {datatype} data must be integers")
            if min(flat) < info.min or max(flat) > info.max:
                raise InvalidInput(
                    f"{what}: value out of range for {datatype} ({info.min}..{info.max})"
                )
            return np.array(flat.tolist(), dtype=target).reshape(shape)
        if kind not in "iub":
            raise InvalidInput(f"{what}: {datatype} data must be integers")
        lo, hi = arr.min(), arr.max()
        if lo < info.min or hi > info.max:
            raise InvalidInput(
                f"{what}: value out of range for {datatype} ({info.min}..{info.max})"
            )
    elif datatype in FLOAT_TYPES:
        if kind not in "iuf":
            # numpy made strings of everything if one item was one ("NaN"): look at the items
            flat = np.array(data, dtype=object).reshape(-1) if kind == "U" else arr.reshape(-1)
            if not non_finite or kind not in "OU" or not all(_float_item(x) for x in flat):
                raise InvalidInput(f"{what}: {datatype} data must be numbers")
            arr = np.array([_FROM_TEXT.get(x, x) for x in flat.tolist()], dtype=np.float64)
        # JSON numbers that would round to infinity (3.4028235e38, FP32's largest written
        # short, still rounds down to it)
        elif (
            kind == "f"
            and target.itemsize < arr.dtype.itemsize
            and max_abs(arr) >= _OVERFLOW[datatype]
        ):
            top = float(np.finfo(target).max)
            raise InvalidInput(f"{what}: value out of range for {datatype} (-{top:g}..{top:g})")
    return arr.astype(target, copy=False).reshape(shape)


#: The least magnitude that rounds to infinity in each narrower float type: its largest value
#: plus half a step.
_OVERFLOW = {
    name: float(info.max) + 2.0 ** (info.maxexp - info.nmant - 2)
    for name, info in (("FP16", np.finfo(np.float16)), ("FP32", np.finfo(np.float32)))
}
#: NaN and infinity in a JSON response: the strings encode_response writes (the schema allows
#: strings; JSON has no such numbers), and null, which earlier versions wrote.
_FROM_TEXT: dict[Any, float] = {
    "NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf, None: math.nan,
}  # fmt: skip


def _float_item(item: Any) -> bool:
    if isinstance(item, str) or item is None:
        return item in _FROM_TEXT
    return isinstance(item, (int, float)) and not isinstance(item, bool)


def bytes_from_binary(raw: bytes | memoryview, n: int, what: str) -> np.ndarray[Any, Any]:
    if n > len(raw) // 4:  # before allocating n slots: the shape is the client's word
        raise InvalidInput(
            f"{what}: binary BYTES data of {len(raw)} bytes cannot hold {n} elements (each "
            "takes at least its 4-byte length)"
        )
    out = np.empty(n, dtype=object)
    view = memoryview(raw)
    pos = 0
    for i in range(n):
        if pos + 4 > len(view):
            raise InvalidInput(f"{what}: binary BYTES data ends after {i} of {n} elements")
        (length,) = struct.unpack_from("<I", view, pos)
        pos += 4
        if pos + length > len(view):
            raise InvalidInput(f"{what}: binary BYTES element {i} runs past the end of its data")
        out[i] = bytes(view[pos : pos + length])
        pos += length
    if pos != len(view):
        raise InvalidInput(f"{what}: binary BYTES data has {len(view) - pos} bytes left over")
    return out


def _decode_tensors(
    items: list[Any], binary: memoryview, kind: str
) -> tuple[dict[str, np.ndarray[Any, Any]], dict[str, str]]:
    """The tensors of a request's `inputs` or a response's `outputs` (`kind`), JSON or binary,
    and the datatype each was declared with; the binary section must be used up exactly."""
    arrays: dict[str, np.ndarray[Any, Any]] = {}
    datatypes: dict[str, str] = {}
    offset = 0
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise InvalidInput(f"{kind}s[{index}] must be a JSON object")
        name = item.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidInput(f"{kind}s[{index}] needs a 'name' string")
        what = f"{kind} '{name}'"
        if name in arrays:
            raise InvalidInput(f"{what} appears more than once")
        datatype = item.get("datatype")
        if not isinstance(datatype, str) or datatype not in DATATYPES:
            raise InvalidInput(
                f"{what}: unknown datatype {_show(datatype)} (one of {', '.join(DATATYPES)})"
            )
        shape = check_shape(item.get("shape"), what)
        params = _parameters(item, f"{what}: ")
        size = params.get("binary_data_size")
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise InvalidInput(f"{what}: binary_data_size must be a non-negative integer")
            if "data" in item:
                raise InvalidInput(f"{what}: has both 'data' and binary_data_size")
            if offset + size > len(binary):
                raise InvalidInput(
                    f"{what}: binary_data_size {size} runs past the end of the binary section "
                    f"({len(binary) - offset} bytes left)"
                )
            chunk = binary[offset : offset + size]
            offset += size
            n = _count(shape)
            if datatype == "BYTES":
                array = bytes_from_binary(chunk, n, what).reshape(shape)
            else:
                dtype = DATATYPES[datatype]
                if size != n * dtype.itemsize:
                    raise InvalidInput(
                        f"{what}: binary_data_size is {size} bytes but shape {list(shape)} of "
                        f"{datatype} needs {n * dtype.itemsize}"
                    )
                array = np.frombuffer(chunk, dtype=dtype.newbyteorder("<")).reshape(shape)
                if datatype == "BOOL" and array.size and array.view(np.uint8).max() > 1:
                    raise InvalidInput(f"{what}: BOOL binary data must be bytes 0 or 1")
        else:
            if "data" not in item:
                raise InvalidInput(f"{what}: needs 'data' or parameters.binary_data_size")
            # A response's JSON has null where a float was NaN or infinite (JSON has neither).
            array = _from_json_data(item["data"], datatype, shape, what, kind == "output")
        arrays[name] = array
        datatypes[name] = datatype
    if offset != len(binary):
        raise InvalidInput(
            f"binary section has {len(binary)} bytes but the {kind}s declare {offset}"
        )
    return arrays, datatypes


def _split_body(body: bytes, header_length: int | None) -> tuple[bytes, memoryview]:
    """The JSON header and the binary section of a body (Inference-Header-Content-Length)."""
    if header_length is None:
        return body, memoryview(b"")
    if header_length < 0 or header_length > len(body):
        raise InvalidInput(
            f"Inference-Header-Content-Length is {header_length} but the body has {len(body)} bytes"
        )
    view = memoryview(body)
    return bytes(view[:header_length]), view[header_length:]


def request_options(params: dict[str, Any]) -> tuple[float | None, int | None]:
    """Triton's `timeout` (microseconds, as seconds) and `priority` request parameters, checked
    (every protocol's codec reads them here)."""
    timeout_s = None
    timeout = params.get("timeout")
    if timeout is not None:
        if isinstance(timeout, bool) or not isinstance(timeout, int) or timeout < 0:
            raise InvalidInput("parameters.timeout must be a non-negative integer (microseconds)")
        if timeout > 0:
            timeout_s = timeout / 1e6
    priority = params.get("priority")
    if priority is not None and (
        isinstance(priority, bool) or not isinstance(priority, int) or priority < 0
    ):
        raise InvalidInput(
            "parameters.priority must be a non-negative integer (1 is the highest level, 0 the "
            f"model's default), got {_show(priority)}"
        )
    return timeout_s, priority


def json_object(raw: bytes) -> dict[str, Any]:
    """A request body that must be a JSON object (the KServe, generate and OpenAI routes):
    malformed JSON or another JSON value is a 400 saying which."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"malformed JSON in request: {exc}") from None
    if not isinstance(obj, dict):
        raise InvalidInput("request body must be a JSON object")
    return obj


def decode_request(body: bytes, header_length: int | None = None) -> InferRequest:
    """Decode a KServe v2 infer body; `header_length` is Inference-Header-Content-Length."""
    header, binary = _split_body(body, header_length)
    obj = json_object(header)
    raw_inputs = obj.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidInput("request needs a non-empty 'inputs' list")

    params = _parameters(obj, "")
    request_id = obj.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInput(f"'id' must be a string, got {_show(request_id)}")

    inputs, datatypes = _decode_tensors(raw_inputs, binary, "input")

    outputs: dict[str, bool] | None = None
    binary_default = _flag(params, "binary_data_output", False, "")
    raw_outputs = obj.get("outputs")
    if raw_outputs is not None:
        if not isinstance(raw_outputs, list):
            raise InvalidInput(f"'outputs' must be a list, got {_show(raw_outputs)}")
        outputs = {}
        for index, item in enumerate(raw_outputs):
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                raise InvalidInput(f"outputs[{index}] needs a 'name' string")
            what = f"output '{item['name']}': "
            out_params = _parameters(item, what)
            if out_params.get("classification"):
                raise InvalidInput(f"{what}the classification extension is not supported")
            outputs[item["name"]] = _flag(out_params, "binary_data", binary_default, what)
        outputs = outputs or None  # an empty list asks for every output, as no list does

    timeout_s, priority = request_options(params)
    return InferRequest(
        inputs=inputs,
        outputs=outputs,
        id=request_id,
        binary_output=binary_default,
        timeout_s=timeout_s,
        priority=priority,
        parameters=params,
        datatypes=datatypes,
    )


def bytes_to_binary(array: np.ndarray[Any, Any]) -> bytes:
    parts = []
    for item in array.reshape(-1):
        b = item if isinstance(item, bytes) else str(item).encode("utf-8")
        parts.append(struct.pack("<I", len(b)))
        parts.append(b)
    return b"".join(parts)


def _json_data(array: np.ndarray[Any, Any], what: str, fix: str) -> Any:
    if array.dtype.kind in "OSU":
        out = []
        for item in array.reshape(-1):
            if isinstance(item, bytes):
                try:
                    out.append(item.decode("utf-8"))
                except UnicodeDecodeError:
                    raise InvalidInput(f"{what} holds bytes that are not UTF-8: {fix}") from None
            else:
                out.append(str(item))
        return out
    flat = array.reshape(-1)
    if array.dtype.kind == "f" and not all_finite(flat):
        # JSON has no NaN or infinity: the strings Python's float() and numpy read back
        return [_NON_FINITE.get(str(x), x) for x in flat.astype(np.float64).tolist()]
    if array.dtype == np.float16:
        flat = flat.astype(np.float32)
    return flat


_NON_FINITE = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


def _encode_tensors(
    arrays: dict[str, np.ndarray[Any, Any]],
    datatypes: dict[str, str],
    binary: Callable[[str], bool],
    kind: str,
    fix: str,
) -> tuple[list[dict[str, Any]], list[bytes]]:
    """The JSON entries of `inputs` or `outputs` (`kind`), and the binary blobs in their order.

    A tensor goes out with the datatype in `datatypes` (else its numpy dtype's); BYTES elements
    that are not UTF-8 can only go as binary data (`fix` says how to ask for that)."""
    entries: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, array in arrays.items():
        datatype = datatypes.get(name) or datatype_of(array)
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary(name):
            if datatype == "BYTES":
                blob = bytes_to_binary(array)
            else:
                dtype = DATATYPES[datatype].newbyteorder("<")
                blob = np.ascontiguousarray(array, dtype=dtype).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = _json_data(array, f"{kind} '{name}'", fix)
        entries.append(entry)
    return entries, blobs


def _body(head: dict[str, Any], blobs: list[bytes]) -> tuple[bytes, int | None]:
    header = orjson.dumps(head, option=_ORJSON_OPTS)
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)


def encode_response(response: InferResponse, request: InferRequest) -> tuple[bytes, int | None]:
    """Encode a response; returns the body and the JSON header length if any output is binary."""

    def binary(name: str) -> bool:
        return request.binary_output if request.outputs is None else request.outputs[name]

    fix = "ask for it as binary data (parameters.binary_data = true)"
    entries, blobs = _encode_tensors(response.outputs, {}, binary, "output", fix)
    head: dict[str, Any] = {
        "model_name": response.model_name,
        "model_version": response.model_version,
        "outputs": entries,
    }
    if response.id is not None:
        head["id"] = response.id
    if response.parameters:
        head["parameters"] = response.parameters
    return _body(head, blobs)


def encode_request(request: InferRequest, binary_inputs: bool = False) -> tuple[bytes, int | None]:
    """The client side of `decode_request`: a KServe v2 infer body for `request`, its inputs as
    binary tensor data with `binary_inputs`; returns the body and the JSON header length when
    any part is binary (Inference-Header-Content-Length).

    Inputs go with `request.datatypes` where given; `binary_output`, `timeout_s`, `priority`
    and `outputs` are written as the parameters `decode_request` reads them from, over
    `request.parameters`.
    """
    fix = "send it as binary data"
    entries, blobs = _encode_tensors(
        request.inputs, request.datatypes, lambda _: binary_inputs, "input", fix
    )
    head: dict[str, Any] = {}
    if request.id is not None:
        head["id"] = request.id
    head["inputs"] = entries
    if request.outputs is not None:
        head["outputs"] = [
            {"name": name, "parameters": {"binary_data": binary}}
            for name, binary in request.outputs.items()
        ]
    params = dict(request.parameters)
    if request.binary_output:
        params["binary_data_output"] = True
    else:
        params.pop("binary_data_output", None)
    if request.timeout_s is not None:
        params["timeout"] = max(1, round(request.timeout_s * 1e6))
    else:
        params.pop("timeout", None)
    if request.priority:
        params["priority"] = request.priority
    if params:
        head["parameters"] = params
    return _body(head, blobs)


def decode_response(body: bytes, header_length: int | None = None) -> InferResponse:
    """The client side of `encode_response`: a KServe v2 infer response, JSON or binary, with
    BYTES elements as `bytes`, and NaN and infinity in float outputs (the strings
    encode_response writes, or null) as themselves.

    Raises InvalidInput naming the field when the body is not such a response."""
    header, binary = _split_body(body, header_length)
    try:
        obj = orjson.loads(header)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"malformed JSON in response: {exc}") from None
    if not isinstance(obj, dict):
        raise InvalidInput("response body must be a JSON object")
    raw_outputs = obj.get("outputs")
    if not isinstance(raw_outputs, list):
        raise InvalidInput("response needs an 'outputs' list")
    fields = {}
    for key in ("model_name", "model_version", "id"):
        value = obj.get(key)
        if value is not None and not isinstance(value, str):
            raise InvalidInput(f"'{key}' must be a string")
        fields[key] = value
    params = obj.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise InvalidInput("'parameters' must be a JSON object")
    outputs, _ = _decode_tensors(raw_outputs, binary, "output")
    return InferResponse(
        model_name=fields["model_name"] or "",
        model_version=fields["model_version"] or "",
        outputs=outputs,
        id=fields["id"],
        parameters=params,
    )


def timeout_ms(raw: str | None, what: str) -> float | None:
    """Seconds from a client's timeout in milliseconds (HTTP header, MQTT user property)."""
    if raw is None:
        return None
    try:
        ms = float(raw)
    except ValueError:
        ms = float("nan")
    if not 0 < ms < 1e12:  # also NaN and infinity
        raise InvalidInput(f"{what} must be a positive number of milliseconds, got {raw[:40]!r}")
    return ms / 1e3


def shorten_deadline(request: InferRequest, seconds: float | None) -> None:
    """The shortest of the timeouts a client gave counts."""
    if seconds is not None:
        request.timeout_s = (
            seconds if request.timeout_s is None else min(request.timeout_s, seconds)
        )
