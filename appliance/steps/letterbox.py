"""Resizing image tensors: `letterbox` (keep the aspect ratio, pad) and `resize` (stretch).

    {"type": "letterbox", "size": [640, 640], "layout": "NCHW", "pad_value": 114,
     "center": true, "scale_up": true}
    {"type": "resize", "size": [224, 224], "layout": "NHWC"}

Both read `image` ([C, H, W] / [H, W, C], or with a batch dimension first; any numeric type,
kept) and write `image` (the tensor they read, by default). Letterbox scales by
r = min(height / H, width / W) (never above 1 with `"scale_up": false`), places the
round(H r) x round(W r) picture centred (or top-left with `"center": false`) on a canvas of
`pad_value`, and writes `transform` = [r, pad_x, pad_y] (FP32): a point (x, y) of the input is
at (x r + pad_x, y r + pad_y) in the output, so the nms step (or a client) maps boxes back with
((x - pad_x) / r, (y - pad_y) / r). Sampling is bilinear (see imaging.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from ..tensors import TensorSpec
from .base import Array, Arrays, Step, StepCall, StepContext, unknown_keys
from .imaging import (
    bilinear,
    centres,
    check_image,
    image_shape,
    images,
    layout_of,
    paste,
    shape_of,
    size_of,
    value_as,
)
from .options import NAME_KEYS, Names, boolean, names, number, size, tensor


class ResizeStep(Step):
    """Stretch an image tensor to `size` (the aspect ratio is not kept)."""

    type: ClassVar[str] = "resize"
    _keys: ClassVar[frozenset[str]] = NAME_KEYS | {"size", "layout"}

    def __init__(self, names_: Names, height: int, width: int, layout: str) -> None:
        self.names = names_
        self.height, self.width, self.layout = height, width, layout
        self.reads, self.writes = names_.reads, names_.writes
        self.optional = names_.optional

    @classmethod
    def parse(cls, config: Mapping[str, Any], ctx: StepContext) -> Step:
        unknown_keys(config, cls._keys, ctx)
        height, width = size(config, "size", ctx)
        layout = layout_of(config, ctx)
        n = names(config, ctx, ("image",), ("image",), same_as={"image": "image"})
        check_image(ctx, "inputs.image", n.inputs["image"])
        return cls(n, height, width, layout)

    def specs(self, given: Mapping[str, TensorSpec]) -> dict[str, TensorSpec]:
        spec = given.get(self.names.inputs["image"])
        if spec is None:
            return {}
        out = self.names.outputs["image"]
        shape = image_shape(spec, self.layout, self.height, self.width)
        return {out: TensorSpec(out, spec.datatype, shape)}

    def run(self, tensors: Mapping[str, Array], call: StepCall) -> Arrays:
        name = self.names.inputs["image"]
        array = tensor(tensors, name, "image")
        pictures, batch = images(array, name, self.layout)
        h, w = self.height, self.width
        src_h, src_w, channels = size_of(pictures[0], self.layout)
        ys, xs = centres(h, 0.0, src_h / h), centres(w, 0.0, src_w / w)
        out = np.empty((len(pictures), *shape_of(h, w, channels, self.layout)), array.dtype)
        for i, picture in enumerate(pictures):
            paste(out[i], bilinear(picture, ys, xs, self.layout), 0, 0, self.layout)
        return {self.names.outputs["image"]: out if batch else out[0]}

    def describe(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "size": [self.height, self.width],
            "layout": self.layout,
            **self.names.describe(),
        }


class LetterboxStep(Step):
    """Resize keeping the aspect ratio, pad to `size`, and say how to map boxes back."""

    type: ClassVar[str] = "letterbox"
    _keys: ClassVar[frozenset[str]] = NAME_KEYS | {
        "size", "layout", "pad_value", "center", "scale_up"
    }  # fmt: skip

    def __init__(
        self,
        names_: Names,
        height: int,
        width: int,
        layout: str,
        pad_value: float,
        center: bool,
        scale_up: bool,
    ) -> None:
        self.names = names_
        self.height, self.width, self.layout = height, width, layout
        self.pad_value, self.center, self.scale_up = pad_value, center, scale_up
        self.reads, self.writes = names_.reads, names_.writes
        self.optional = names_.optional

    @classmethod
    def parse(cls, config: Mapping[str, Any], ctx: StepContext) -> Step:
        unknown_keys(config, cls._keys, ctx)
        height, width = size(config, "size", ctx)
        layout = layout_of(config, ctx)
        pad_value = number(config, "pad_value", ctx, 0.0)
        center = boolean(config, "center", ctx, True)
        scale_up = boolean(config, "scale_up", ctx, True)
        n = names(config, ctx, ("image",), ("image", "transform"), same_as={"image": "image"})
        check_image(ctx, "inputs.image", n.inputs["image"])
        return cls(n, height, width, layout, pad_value, center, scale_up)

    def specs(self, given: Mapping[str, TensorSpec]) -> dict[str, TensorSpec]:
        t = self.names.outputs["transform"]
        out = {t: TensorSpec(t, "FP32", (3,))}
        spec = given.get(self.names.inputs["image"])
        if spec is not None:
            name = self.names.outputs["image"]
            shape = image_shape(spec, self.layout, self.height, self.width)
            out[name] = TensorSpec(name, spec.datatype, shape)
        return out

    def geometry(self, src_h: int, src_w: int) -> tuple[float, int, int, int, int]:
        """(scale, new height, new width, pad_x, pad_y) for a src_h x src_w picture."""
        r = min(self.height / src_h, self.width / src_w)
        if not self.scale_up:
            r = min(r, 1.0)
        new_h = min(self.height, max(1, round(src_h * r)))
        new_w = min(self.width, max(1, round(src_w * r)))
        if not self.center:
            return r, new_h, new_w, 0, 0
        return r, new_h, new_w, (self.width - new_w) // 2, (self.height - new_h) // 2

    def run(self, tensors: Mapping[str, Array], call: StepCall) -> Arrays:
        name = self.names.inputs["image"]
        array = tensor(tensors, name, "image")
        pictures, batch = images(array, name, self.layout)
        src_h, src_w, channels = size_of(pictures[0], self.layout)
        r, new_h, new_w, pad_x, pad_y = self.geometry(src_h, src_w)
        ys = centres(new_h, 0.0, 1 / r)
        xs = centres(new_w, 0.0, 1 / r)
        shape = shape_of(self.height, self.width, channels, self.layout)
        out = np.full((len(pictures), *shape), value_as(self.pad_value, array), array.dtype)
        for i, picture in enumerate(pictures):
            paste(out[i], bilinear(picture, ys, xs, self.layout), pad_y, pad_x, self.layout)
        transform = np.array([r, pad_x, pad_y], np.float32)
        return {
            self.names.outputs["image"]: out if batch else out[0],
            self.names.outputs["transform"]: transform,
        }

    def describe(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "size": [self.height, self.width],
            "layout": self.layout,
            "pad_value": self.pad_value,
            "center": self.center,
            "scale_up": self.scale_up,
            **self.names.describe(),
        }
