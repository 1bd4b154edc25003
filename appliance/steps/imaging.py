"""Image tensors for the resize, letterbox and crop steps: layouts and bilinear sampling.

An image tensor is [C, H, W] or [H, W, C] (layout NCHW or NHWC), or the same with a batch
dimension first. Sampling is plain numpy, so it works on any numeric type and any number of
channels, and gives the same numbers on every device (no Pillow filter differences).

The coordinate convention is the continuous one: pixel (i, j) covers [j, j+1) x [i, i+1), its
centre is at (j + 0.5, i + 0.5); a box [x1, y1, x2, y2] is in those coordinates. Sampling a
point reads the four nearest pixel centres (edges repeat), which is what PyTorch's
`interpolate(mode="bilinear", align_corners=False)` and OpenCV's INTER_LINEAR do; there is no
anti-aliasing when shrinking, as detectors' own letterbox code has none.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import InvalidInput
from ..tensors import TensorSpec, datatype_of
from .base import Array, StepContext
from .options import NUMERIC_TYPES, cast_to, check_spec


def check_image(ctx: StepContext, key: str, name: str) -> TensorSpec | None:
    """An image input's known spec: numeric, 3 or 4 dimensions."""
    return check_spec(ctx, key, name, datatypes=NUMERIC_TYPES - {"BOOL"}, ranks=(3, 4))


def image_shape(spec: TensorSpec, layout: str, height: int, width: int) -> tuple[int, ...]:
    """The shape of `spec` with its height and width replaced."""
    shape = list(spec.shape)
    if layout == "NCHW":
        shape[-2:] = [height, width]
    else:
        shape[-3:-1] = [height, width]
    return tuple(shape)


def channels_of(spec: TensorSpec, layout: str) -> int:
    return spec.shape[-3] if layout == "NCHW" else spec.shape[-1]


def images(array: Array, name: str, layout: str) -> tuple[list[Array], bool]:
    """The images of an image tensor (views, in their own layout), and whether it had a batch
    dimension; InvalidInput naming the tensor when it is not an image."""
    if array.dtype.kind not in "iuf" or array.ndim not in (3, 4):
        raise InvalidInput(
            f"tensor {name!r} must be a numeric image [C, H, W] / [H, W, C] (or with a batch "
            f"dimension first), got {datatype_of(array)} {list(array.shape)}"
        )
    batch = array.ndim == 4
    if batch and array.shape[0] == 0:
        raise InvalidInput(f"tensor {name!r} holds no image (shape {list(array.shape)})")
    out = list(array) if batch else [array]
    height, width, _ = size_of(out[0], layout)
    if height == 0 or width == 0:
        raise InvalidInput(f"tensor {name!r} is an empty image {list(array.shape)} ({layout})")
    return out, batch


def size_of(image: Array, layout: str) -> tuple[int, int, int]:
    """(height, width, channels) of one image."""
    if layout == "NCHW":
        c, h, w = image.shape
    else:
        h, w, c = image.shape
    return int(h), int(w), int(c)


def shape_of(height: int, width: int, channels: int, layout: str) -> tuple[int, int, int]:
    return (channels, height, width) if layout == "NCHW" else (height, width, channels)


def value_as(value: float, like: Array) -> Array:
    """One number as `like`'s datatype (rounded and clamped for integers)."""
    return cast_to(np.array(value, np.float64), datatype_of(like), "fill")


def paste(canvas: Array, patch: Array, top: int, left: int, layout: str) -> None:
    """Write `patch` (any float or the canvas's type) into `canvas` at (top, left), converted
    like a cast (integers rounded and clamped)."""
    h, w, _ = size_of(patch, layout)
    region: tuple[slice, ...] = (slice(None), slice(top, top + h), slice(left, left + w))
    if layout == "NHWC":
        region = region[1:]
    canvas[region] = cast_to(patch, datatype_of(canvas), "image")


def bilinear(image: Array, ys: Array, xs: Array, layout: str) -> Array:
    """`image` sampled at rows `ys` and columns `xs` (pixel-centre coordinates: pixel i's
    centre is at i; points outside clamped to the edge), in the image's layout: float32 (or
    float64 for a float64 image), or the image itself where the grid is its own pixels."""
    height, width, _ = size_of(image, layout)
    h_axis, w_axis = (1, 2) if layout == "NCHW" else (0, 1)
    out = _along(image, ys, height, h_axis)
    return _along(out, xs, width, w_axis)


def _along(image: Array, at: Array, size: int, axis: int) -> Array:
    """Linear interpolation of `image` along one axis at the points `at`."""
    pos = np.clip(at, 0, size - 1)
    i0 = np.floor(pos).astype(np.intp)
    work = np.float64 if image.dtype == np.float64 else np.float32
    weight = (pos - i0).astype(work)
    if len(i0) == size and not weight.any() and (i0 == np.arange(size)).all():
        return image  # the identity: nothing to sample
    i1 = np.minimum(i0 + 1, size - 1)
    shape = [1] * image.ndim
    shape[axis] = len(i0)
    low: Array = np.take(image, i0, axis=axis).astype(work, copy=False)
    high: Array = np.take(image, i1, axis=axis).astype(work, copy=False)
    high -= low
    high *= weight.reshape(shape)
    high += low
    return high


def centres(count: int, start: float, step: float) -> Array:
    """Source coordinates (pixel-centre convention) of `count` output pixels laid from the
    continuous coordinate `start`, each `step` source pixels wide."""
    return start + (np.arange(count, dtype=np.float64) + 0.5) * step - 0.5


def layout_of(config: Mapping[str, Any], ctx: StepContext) -> str:
    from .options import LAYOUTS, choice

    return choice(config, "layout", ctx, "NCHW", LAYOUTS)
