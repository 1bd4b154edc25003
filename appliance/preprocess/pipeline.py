"""What the engine runs around a tensor model: images decoded into its input, classification
answers added to its outputs, and raw quantized tensors on request.

Built once per loaded model (`build`): None when the model declares nothing and has no
quantized tensors, so plain models pay nothing. Every protocol goes through it, because the
engine does: HTTP, MQTT and KServe v2 BYTES inputs all end up here.

Request parameters it reads:
  top_k (int), softmax (bool)  classification answers (see classify.py)
  raw_quantized (bool)         quantized inputs are sent and outputs returned as the model's raw
                               integers (INT8/UINT8/INT16) instead of real values
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..backends.base import Quantization
from ..codec import InferRequest
from ..config import ModelConfig
from ..errors import InvalidInput, ModelError
from ..manifest import Manifest
from ..tensors import Signature
from .classify import OUTPUTS as CLASSIFY_OUTPUTS
from .classify import ClassifySpec
from .image import ImageSpec, to_tensor

log = logging.getLogger("appliance.preprocess")

Arrays = dict[str, np.ndarray[Any, Any]]


@dataclass(frozen=True)
class Asked:
    """What a request with named outputs wants of the classification."""

    #: Classification outputs the client named (each mapped to binary or not).
    named: dict[str, bool]
    #: A model output run only for the classification, left out of the answer.
    drop: str | None


class Pipeline:
    def __init__(
        self,
        image: ImageSpec | None,
        classify: ClassifySpec | None,
        quantization: dict[str, Quantization],
    ) -> None:
        self.image = image
        self.classify = classify
        self.quantization = quantization

    async def prepare(self, request: InferRequest) -> Asked | None:
        """Turn encoded images and raw quantized inputs into the model's own inputs, in place;
        what it returns goes to `finish`."""
        image = self.image
        if image is not None and request.datatypes.get(image.input) == "BYTES":
            items = request.inputs[image.input]
            request.inputs[image.input] = await asyncio.to_thread(to_tensor, items, image)
            request.datatypes[image.input] = image.datatype
        if self._raw(request):
            for name, q in self.quantization.items():
                value = request.inputs.get(name)
                if value is None:
                    continue  # missing inputs are reported by validation
                given = request.datatypes.get(name)
                if given != q.datatype:
                    raise InvalidInput(
                        f"input {name!r}: with raw_quantized the model takes {q.datatype} "
                        f"(scale {q.scale}, zero point {q.zero_point}), got {given}"
                    )
                request.inputs[name] = q.dequantize(value)
                request.datatypes[name] = "FP32"
        return self._outputs(request)

    def _outputs(self, request: InferRequest) -> Asked | None:
        """Which classification outputs the client named, and the model output they need."""
        cls = self.classify
        if cls is None or request.outputs is None:
            return None
        named = {n: b for n, b in request.outputs.items() if n in CLASSIFY_OUTPUTS}
        k, _ = cls.requested(request.parameters)
        if named and not k:
            raise InvalidInput(
                f"outputs {', '.join(named)} need the parameter top_k (how many classes)"
            )
        if not k:
            return None
        for name in named:
            del request.outputs[name]
        drop = None
        if cls.output not in request.outputs:
            # The classification needs this output even when the client did not ask for it.
            request.outputs[cls.output] = False
            drop = cls.output
        return Asked(named, drop)

    def finish(self, request: InferRequest, outputs: Arrays, asked: Asked | None) -> Arrays:
        """Add classification answers and re-quantize outputs for a raw_quantized request."""
        out = dict(outputs)
        cls = self.classify
        k, softmax = cls.requested(request.parameters) if cls is not None else (0, False)
        if cls is not None and k and cls.output in out:
            extra = cls.answer(out[cls.output], k, softmax)
            if asked is not None and request.outputs is not None:
                if asked.drop is not None:
                    del out[asked.drop]
                    request.outputs.pop(asked.drop, None)
                if asked.named:
                    extra = {n: v for n, v in extra.items() if n in asked.named}
                for name in extra:
                    request.outputs[name] = asked.named.get(name, request.binary_output)
            out.update(extra)
        if self._raw(request):
            for name, q in self.quantization.items():
                if name in out:
                    out[name] = q.quantize(out[name])
        return out

    def _raw(self, request: InferRequest) -> bool:
        raw = request.parameters.get("raw_quantized", False)
        if not isinstance(raw, bool):
            raise InvalidInput(f"parameter raw_quantized must be true or false, got {raw!r}")
        return raw  # a model with no quantized tensors: raw and real are the same

    def describe(self) -> dict[str, Any]:
        """Model metadata parameters: what a client may send and ask for."""
        out: dict[str, Any] = {}
        if self.image is not None:
            out["preprocess"] = self.image.to_json()
        if self.classify is not None:
            out["postprocess"] = self.classify.to_json()
        if self.quantization:
            out["quantization"] = {n: q.to_json() for n, q in self.quantization.items()}
        return out


def build_pipeline(
    manifest: Manifest,
    signature: Signature,
    quantization: dict[str, Quantization],
    config: ModelConfig,
) -> Pipeline | None:
    """The pipeline a model's manifest declares (ModelError if the declaration is wrong)."""
    what = f"model {manifest.name!r} version {manifest.version}"
    image = classify = None
    pre, post = manifest.preprocess, manifest.postprocess
    if pre is not None:
        if pre["type"] == "image":
            image = ImageSpec.parse(pre, signature, config.image, what)
            if importlib.util.find_spec("PIL") is None:
                raise ModelError(
                    f"{what} declares image pre-processing, but Pillow is not installed: "
                    "pip install 'appliance[image]'"
                )
        else:
            log.debug("%s: preprocess type %r is not for tensor requests", what, pre["type"])
    if post is not None:
        if post["type"] == "classification":
            classify = ClassifySpec.parse(post, signature, what)
        else:
            log.debug("%s: postprocess type %r is not for tensor requests", what, post["type"])
    if image is None and classify is None and not quantization:
        return None
    return Pipeline(image, classify, dict(quantization))
