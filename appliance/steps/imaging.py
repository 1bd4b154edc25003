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
    """The images of an image tensor as float [H, W, C] arrays, and whether it had a batch
    dimension; InvalidInput naming the tensor when it is not an image."""
    if array.dtype.kind not in "iuf" or array.ndim not in (3, 4):
        raise InvalidInput(
            f"tensor {name!r} must be a numeric image [C, H, W] / [H, W, C] (or with a batch "
            f"dimension first), got {datatype_of(array)} {list(array.shape)}"
        )
    batch = array.ndim == 4
    if batch and array.shape[0] == 0:
        raise InvalidInput(f"tensor {name!r} holds no image (shape {list(array.shape)})")
    items = list(array) if batch else [array]
    work = np.float64 if array.dtype == np.float64 else np.float32
    out = [np.asarray(a.transpose(1, 2, 0) if layout == "NCHW" else a, dtype=work) for a in items]
    if out[0].shape[0] == 0 or out[0].shape[1] == 0:
        raise InvalidInput(f"tensor {name!r} is an empty image {list(array.shape)} ({layout})")
    return out, batch


def tensor_of(hwc: list[Array], like: Array, layout: str, batch: bool, name: str) -> Array:
    """Float [H, W, C] images back into a tensor shaped and typed like the input."""
    items = [a.transpose(2, 0, 1) if layout == "NCHW" else a for a in hwc]
    stacked = np.stack(items) if batch else items[0]
    return cast_to(np.ascontiguousarray(stacked), datatype_of(like), name)


def bilinear(image: Array, ys: Array, xs: Array) -> Array:
    """`image` [H, W, C] sampled at rows `ys` and columns `xs` (pixel-centre coordinates:
    pixel i's centre is at i), points outside clamped to the edge: [len(ys), len(xs), C]."""
    height, width = image.shape[:2]
    y = np.clip(ys, 0, height - 1)
    x = np.clip(xs, 0, width - 1)
    y0 = np.floor(y).astype(np.intp)
    x0 = np.floor(x).astype(np.intp)
    y1 = np.minimum(y0 + 1, height - 1)
    x1 = np.minimum(x0 + 1, width - 1)
    wy = (y - y0).astype(image.dtype)[:, None, None]
    wx = (x - x0).astype(image.dtype)[None, :, None]
    rows = image[y0] * (1 - wy) + image[y1] * wy
    out: Array = rows[:, x0] * (1 - wx) + rows[:, x1] * wx
    return out


def centres(count: int, start: float, step: float) -> Array:
    """Source coordinates (pixel-centre convention) of `count` output pixels laid from the
    continuous coordinate `start`, each `step` source pixels wide."""
    return start + (np.arange(count, dtype=np.float64) + 0.5) * step - 0.5


def layout_of(config: Mapping[str, Any], ctx: StepContext) -> str:
    from .options import LAYOUTS, choice

    return choice(config, "layout", ctx, "NCHW", LAYOUTS)
