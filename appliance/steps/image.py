"""The "image" step: encoded JPEG/PNG images (a BYTES tensor) decoded into an image tensor.

The decoding itself (limits, EXIF, resize, normalisation) is appliance/preprocess/image.py;
this module binds it to the step interface in its two places:

- around a model (a manifest's `preprocess` or `steps.input`): the declaration names a model
  input (`input`, or the model's only one) and whatever it leaves out (size, layout, color,
  dtype) comes from that input's spec, as before steps existed. A tensor sent for that input
  instead of images passes through untouched, so clients may also send the model's own tensor.
- standalone (a pipeline node): no model to ask, so `size`, `layout`, `color` and `dtype` are
  required; it reads the tensor named by `input` (default "image") and writes one named
  `output` (default: like its input), always with a batch dimension first ([N, ...]).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from typing import Any, ClassVar

from ..config import ImageConfig
from ..errors import InvalidInput, ModelError
from ..preprocess.image import ImageSpec, to_tensor
from ..tensors import Signature, TensorSpec, datatype_of
from .base import Array, Arrays, Step, StepCall, StepContext
from .where import model_where

#: What a standalone declaration must say (nothing can be read from a model).
STANDALONE_REQUIRED = ("size", "layout", "color", "dtype")


class ImageStep(Step):
    type = "image"
    blocking: ClassVar[bool] = True

    def __init__(self, spec: ImageSpec, output: str, standalone: bool) -> None:
        self.spec = spec
        self.output = output
        self.standalone = standalone
        self.reads = (spec.input,)
        self.writes = (output,)

    @classmethod
    def parse(cls, config: Mapping[str, Any], ctx: StepContext) -> ImageStep:
        obj = dict(config)
        if ctx.config is not None:  # around a model: ctx.available are its inputs
            what, section = model_where(ctx)
            signature = Signature(tuple(ctx.available.values()), ())
            spec = ImageSpec.parse(obj, signature, ctx.config.image, what, section)
            output, standalone = spec.input, False
        else:
            spec, output = _standalone(obj, ctx, ctx.where, "step")
            standalone = True
        if importlib.util.find_spec("PIL") is None:
            raise ModelError(
                f"{ctx.where}: declares image decoding, but Pillow is not installed: "
                "pip install 'appliance[image]'"
            )
        return cls(spec, output, standalone)

    def specs(self, given: Mapping[str, TensorSpec]) -> dict[str, TensorSpec]:
        s = self.spec
        dims = (
            (s.channels, s.height, s.width)
            if s.layout == "NCHW"
            else (s.height, s.width, s.channels)
        )
        shape = (-1, *dims) if s.batch else dims
        return {self.output: TensorSpec(self.output, s.datatype, shape)}

    def skips(self, tensors: Mapping[str, Array]) -> bool:
        """Around a model, a tensor sent for the image input is the model's own: nothing to
        decode (the chain then skips the step, and its thread hop)."""
        return not self.standalone and datatype_of(tensors[self.spec.input]) != "BYTES"

    def run(self, tensors: Mapping[str, Array], call: StepCall) -> Arrays:
        items = tensors[self.spec.input]
        if datatype_of(items) != "BYTES":
            if self.standalone:
                raise InvalidInput(
                    f"input {self.spec.input!r}: images are BYTES (encoded JPEG or PNG), "
                    f"got {datatype_of(items)}"
                )
            return {self.output: items}  # the model's own tensor, sent as is
        return {self.output: to_tensor(items, self.spec)}

    def describe(self) -> dict[str, Any]:
        out = self.spec.to_json()
        if self.standalone:
            out["output"] = self.output
        return out


def _standalone(
    obj: dict[str, Any], ctx: StepContext, what: str, section: str
) -> tuple[ImageSpec, str]:
    """Parse a pipeline's image node: the model input spec is made up from what it says."""
    for key in STANDALONE_REQUIRED:
        if key not in obj:
            raise ctx.bad(key, "required in a pipeline (there is no model input to take it from)")
    name = obj.get("input", "image")
    output = obj.pop("output", name)
    for key, value in (("input", name), ("output", output)):
        if not isinstance(value, str) or not value:
            raise ctx.bad(key, f"must be a tensor name, got {value!r}")
    given = ctx.available.get(name)
    if given is not None and given.datatype != "BYTES":
        raise ctx.bad("input", f"{name!r} is {given.datatype}; images come as BYTES")
    size, layout, color = obj["size"], obj["layout"], obj["color"]
    channels = 1 if color == "GRAY" else 3
    ok = isinstance(size, list) and len(size) == 2 and all(isinstance(d, int) for d in size)
    h, w = (size[0], size[1]) if ok else (-1, -1)
    dims = (channels, h, w) if layout == "NCHW" else (h, w, channels)
    model_input = TensorSpec(name, str(obj["dtype"]), (-1, *dims))
    obj["input"] = name
    spec = ImageSpec.parse(obj, Signature((model_input,), ()), ImageConfig(), what, section)
    return spec, output
