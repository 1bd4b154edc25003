"""Pictures sent as they are, for models whose manifest declares image pre-processing.

HTTP: `POST .../infer` with `Content-Type: image/jpeg` or `image/png` (the body is the image),
or `multipart/form-data` (each file part an image, in order: a batch; text fields `top_k`,
`softmax`, `raw_quantized`, or `parameters` as a JSON object). MQTT: a raw payload (see
api/mqtt.py). Both become one KServe request whose image input is a BYTES tensor of encoded
images; the model's chain decodes them (appliance/preprocess/image.py), so a v2 BYTES
input gets exactly the same treatment.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

from ..codec import InferRequest
from ..engine import LoadedModel
from ..errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType

if TYPE_CHECKING:  # aiohttp only where a body is read: the fast path needs none of it
    from aiohttp import web

    from ..preprocess.image import ImageSpec

#: Request parameters a URL query, a multipart field or an MQTT user property may carry.
PARAMETERS: dict[str, type] = {
    "top_k": int, "softmax": bool, "raw_quantized": bool,
    # the answer's format (appliance/formats): json, xml, csv, or a report template's
    "format": str,
}  # fmt: skip
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def parse_parameter(key: str, value: str, kind: type) -> Any:
    """A text value (query string, form field, MQTT user property) as the parameter's type."""
    text = value.strip().lower()
    if kind is str:
        return value.strip()
    if kind is bool:
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise InvalidInput(f"parameter {key} must be true or false, got {value!r}")
    try:
        return int(text)
    except ValueError:
        raise InvalidInput(f"parameter {key} must be an integer, got {value!r}") from None


def text_parameters(pairs: Any) -> dict[str, Any]:
    """Known parameters from (key, text) pairs; unknown keys are refused by name."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        kind = PARAMETERS.get(key)
        if kind is None:
            raise InvalidInput(f"unknown parameter {key!r} (known: {', '.join(PARAMETERS)})")
        out[key] = parse_parameter(key, value, kind)
    return out


def image_input(model: LoadedModel) -> str:
    """The input an image body goes to: a model's declared image input, or a pipeline's one
    BYTES input (its steps decode the pictures)."""
    if model.platform == "pipeline":
        inputs = model.signature.inputs
        if len(inputs) == 1 and inputs[0].datatype == "BYTES":
            return inputs[0].name
        raise UnsupportedMediaType(
            f"pipeline {model.name!r} takes no images (that needs one BYTES input): send a "
            "KServe v2 request (application/json)"
        )
    return image_spec(model).input


def image_spec(model: LoadedModel) -> ImageSpec:
    chain = model.chain
    if chain is None or chain.image is None:
        raise UnsupportedMediaType(
            f"model {model.name!r} declares no image pre-processing, so it takes no images: "
            "send a KServe v2 request (application/json)"
        )
    return chain.image


def images_request(
    input_name: str, images: list[bytes], parameters: dict[str, Any] | None = None
) -> InferRequest:
    """A request whose image input is the BYTES tensor of these encoded images."""
    items = np.empty(len(images), dtype=object)
    for i, data in enumerate(images):
        items[i] = data
    return InferRequest(
        {input_name: items}, datatypes={input_name: "BYTES"}, parameters=parameters or {}
    )


async def image_request(
    request: web.Request, model: LoadedModel, ctype: str, limit: int
) -> InferRequest:
    """An HTTP image or multipart body -> an InferRequest for `model`."""
    from aiohttp import BodyPartReader

    from ..multipart import malformed_is_400
    from ..preprocess.image import check_content_type

    target = image_input(model)
    if ctype.startswith("image/"):
        body = await request.read()
        check_content_type(body, ctype)
        return images_request(target, [body])
    images: list[bytes] = []
    params: dict[str, Any] = {}
    total = 0
    with malformed_is_400():  # a 400 for a body aiohttp cannot split into parts
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise InvalidInput("nested multipart bodies are not supported")
            data = bytearray()
            while chunk := await part.read_chunk(1 << 16):
                total += len(chunk)
                if total > limit:
                    raise PayloadTooLarge(
                        f"multipart body is larger than the limit of {limit} bytes"
                    )
                data.extend(chunk)
            ptype = (part.headers.get("Content-Type") or "").partition(";")[0].strip().lower()
            if part.filename is not None or ptype.startswith("image/"):
                if ptype.startswith("image/"):
                    check_content_type(bytes(data), ptype)
                images.append(bytes(data))
                continue
            name = part.name or ""
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidInput(f"multipart field {name!r} is not UTF-8 text") from None
            if name == "parameters":
                try:
                    obj = orjson.loads(text)
                except orjson.JSONDecodeError as exc:
                    raise InvalidInput(f"multipart field 'parameters': not JSON: {exc}") from None
                if not isinstance(obj, dict):
                    raise InvalidInput("multipart field 'parameters' must be a JSON object")
                params.update(obj)
            elif name in PARAMETERS:
                params.update(text_parameters([(name, text)]))
            else:
                raise InvalidInput(
                    f"multipart field {name!r} is neither an image (a file part) nor a parameter "
                    f"({', '.join([*PARAMETERS, 'parameters'])})"
                )
    if not images:
        raise InvalidInput("the multipart body holds no image (send the picture as a file part)")
    return images_request(target, images, params)
