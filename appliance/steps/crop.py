"""`crop`: the regions of an image that boxes name, each resized to one size.

    {"type": "crop", "size": [32, 32], "layout": "NCHW", "box_format": "xyxy",
     "normalized": false, "fill": 0, "max_crops": 1024}

Reads `image` ([C, H, W] / [H, W, C] or with a batch dimension of 1; any numeric type, kept)
and `boxes` ([N, 4] or [1, N, 4]); writes `crops`: [N, C, h, w] for NCHW, [N, h, w, C] for
NHWC, in the image's datatype, one crop per box in the boxes' order. N = 0 gives [0, C, h, w].

Boxes are `xyxy` (x1, y1, x2, y2), `xywh` (x1, y1, width, height) or `cxcywh` (centre, width,
height), in pixels, or in 0..1 of the image's width and height with `"normalized": true`.
Each box is clipped to the image, then its region is sampled bilinearly on an h x w grid of
points at the centres of equal cells (like torchvision's `roi_align(aligned=True,
sampling_ratio=1)`): a box exactly on pixel edges, as big as `size`, copies those pixels. A box
with no area left after clipping (outside the image, zero width or height, or x2 < x1) gives a
crop filled with `fill`, so crops stay aligned with boxes. More than `max_crops` boxes is an
InvalidInput (400).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from ..errors import InvalidInput
from ..tensors import TensorSpec
from .base import Array, Arrays, Step, StepCall, StepContext, unknown_keys
from .imaging import (
    bilinear,
    centres,
    channels_of,
    check_image,
    images,
    layout_of,
    paste,
    shape_of,
    size_of,
    value_as,
)
from .options import (
    NAME_KEYS,
    NUMERIC_TYPES,
    Names,
    boolean,
    check_spec,
    choice,
    integer,
    names,
    number,
    numeric,
    size,
    tensor,
)

BOX_FORMATS = ("xyxy", "xywh", "cxcywh")


def to_xyxy(boxes: Array, box_format: str) -> Array:
    """[N, 4] boxes in `box_format` as float64 x1, y1, x2, y2."""
    b = boxes.astype(np.float64, copy=True)
    if box_format == "xywh":
        b[:, 2:] += b[:, :2]
    elif box_format == "cxcywh":
        half = b[:, 2:] / 2
        b[:, 2:] = b[:, :2] + half
        b[:, :2] -= half
    return b


def box_rows(boxes: Array, name: str, finite: bool = True) -> Array:
    """Boxes [N, 4] from [N, 4] or [1, N, 4]; InvalidInput naming the tensor otherwise (and
    for a box that is not finite, unless `finite` is false: the caller checks later)."""
    numeric(boxes, name)
    if boxes.ndim == 3 and boxes.shape[0] == 1:
        boxes = boxes[0]
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise InvalidInput(
            f"tensor {name!r} must be boxes [N, 4] or [1, N, 4], got {list(boxes.shape)}"
        )
    if finite and not np.isfinite(boxes).all():
        row = int(np.flatnonzero(~np.isfinite(boxes).all(axis=1))[0])
        raise InvalidInput(f"tensor {name!r}: box {row} is not finite: {boxes[row].tolist()}")
    return boxes


class CropStep(Step):
    """Boxes -> image regions of one size (the fan-out source of detect-then-classify)."""

    type: ClassVar[str] = "crop"
    _keys: ClassVar[frozenset[str]] = NAME_KEYS | {
        "size", "layout", "box_format", "normalized", "fill", "max_crops"
    }  # fmt: skip

    def __init__(
        self,
        names_: Names,
        height: int,
        width: int,
        layout: str,
        box_format: str,
        normalized: bool,
        fill: float,
        max_crops: int,
    ) -> None:
        self.names = names_
        self.height, self.width, self.layout = height, width, layout
        self.box_format, self.normalized = box_format, normalized
        self.fill, self.max_crops = fill, max_crops
        self.reads, self.writes = names_.reads, names_.writes
        self.optional = names_.optional

    @classmethod
    def parse(cls, config: Mapping[str, Any], ctx: StepContext) -> Step:
        unknown_keys(config, cls._keys, ctx)
        height, width = size(config, "size", ctx)
        layout = layout_of(config, ctx)
        box_format = choice(config, "box_format", ctx, "xyxy", BOX_FORMATS)
        normalized = boolean(config, "normalized", ctx, False)
        fill = number(config, "fill", ctx, 0.0)
        max_crops = integer(config, "max_crops", ctx, 1024, 1, 1 << 20)
        n = names(config, ctx, ("image", "boxes"), ("crops",))
        spec = check_image(ctx, "inputs.image", n.inputs["image"])
        if spec is not None and len(spec.shape) == 4 and spec.shape[0] not in (-1, 1):
            raise ctx.bad(
                "inputs.image", f"crops one image; {spec.name!r} has a batch of {spec.shape[0]}"
            )
        check_spec(
            ctx, "inputs.boxes", n.inputs["boxes"], datatypes=NUMERIC_TYPES, ranks=(2, 3), last=4
        )
        return cls(n, height, width, layout, box_format, normalized, fill, max_crops)

    def specs(self, given: Mapping[str, TensorSpec]) -> dict[str, TensorSpec]:
        spec = given.get(self.names.inputs["image"])
        if spec is None:
            return {}
        name = self.names.outputs["crops"]
        c = channels_of(spec, self.layout)
        h, w = self.height, self.width
        shape = (-1, c, h, w) if self.layout == "NCHW" else (-1, h, w, c)
        return {name: TensorSpec(name, spec.datatype, shape)}

    def run(self, tensors: Mapping[str, Array], call: StepCall) -> Arrays:
        image_name, boxes_name = self.names.inputs["image"], self.names.inputs["boxes"]
        array = tensor(tensors, image_name, "image")
        boxes = box_rows(tensor(tensors, boxes_name, "boxes"), boxes_name)
        pictures, _ = images(array, image_name, self.layout)
        if len(pictures) != 1:
            raise InvalidInput(f"tensor {image_name!r}: crop takes one image, got {len(pictures)}")
        if len(boxes) > self.max_crops:
            raise InvalidInput(
                f"tensor {boxes_name!r}: {len(boxes)} boxes, more than the limit of "
                f"{self.max_crops} (crop step max_crops)"
            )
        image = pictures[0]
        height, width, channels = size_of(image, self.layout)
        xyxy = to_xyxy(boxes, self.box_format)
        if self.normalized:
            xyxy *= np.array([width, height, width, height], np.float64)
        xyxy[:, 0::2] = np.clip(xyxy[:, 0::2], 0, width)
        xyxy[:, 1::2] = np.clip(xyxy[:, 1::2], 0, height)
        h, w = self.height, self.width
        crops = np.empty((len(xyxy), *shape_of(h, w, channels, self.layout)), array.dtype)
        for i, (x1, y1, x2, y2) in enumerate(xyxy):
            if x2 <= x1 or y2 <= y1:
                crops[i] = value_as(self.fill, array)
                continue
            ys = centres(h, y1, (y2 - y1) / h)
            xs = centres(w, x1, (x2 - x1) / w)
            paste(crops[i], bilinear(image, ys, xs, self.layout), 0, 0, self.layout)
        return {self.names.outputs["crops"]: crops}

    def describe(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "size": [self.height, self.width],
            "layout": self.layout,
            "box_format": self.box_format,
            "normalized": self.normalized,
            "fill": self.fill,
            "max_crops": self.max_crops,
            **self.names.describe(),
        }
