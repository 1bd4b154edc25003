"""Images in, tensors out: the `"type": "image"` pre-processing a manifest can declare.

    "preprocess": {"type": "image", "input": "image", "size": [224, 224],
                   "resize": "shorter_side", "resize_to": 256, "method": "bilinear",
                   "color": "RGB", "layout": "NCHW", "scale": 0.00392156862745098,
                   "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "dtype": "FP32"}

The steps, in this order (a client can repeat them by hand with Pillow and numpy):
1. decode the JPEG or PNG (EXIF orientation applied), convert to RGB (or L for GRAY);
2. resize with `method`: "stretch" straight to `size`, or "shorter_side": the shorter side to
   `resize_to` keeping the aspect ratio (the other side rounded down), then a center crop to
   `size` (offsets rounded down);
3. to float32 pixels 0..255 in height, width, channel order; BGR reverses the channels;
4. `* scale`, then `- mean`, then `/ std` (one value, or one per channel);
5. NCHW moves channels first; a batch dimension is added when the model input has one;
6. cast to `dtype` (integer types are rounded and clamped).

Decoding is bounded: the size in the header is checked against `image.max_pixels` before a
single pixel is decoded, Pillow's decompression-bomb guard stays on, only JPEG and PNG decoders
are used, and a truncated or corrupt file is an InvalidInput (400). Pillow is imported on first
use, so a device serving no image model never loads it.
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass
from typing import Any, Literal, cast

import numpy as np

from ..config import ImageConfig
from ..errors import InvalidInput, ModelError, UnsupportedMediaType
from ..tensors import DATATYPES, FLOAT_TYPES, INT_TYPES, Signature
from . import declared_tensor

#: Content-Type -> Pillow format
CONTENT_TYPES = {"image/jpeg": "JPEG", "image/jpg": "JPEG", "image/png": "PNG"}
_MAGIC = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"))
METHODS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
_KEYS = frozenset(
    {"type", "input", "size", "resize", "resize_to", "method", "color", "layout", "scale",
     "mean", "std", "dtype"}
)  # fmt: skip


@dataclass(frozen=True)
class ImageSpec:
    """A validated `"type": "image"` declaration, bound to one model input."""

    input: str
    height: int
    width: int
    resize: Literal["stretch", "shorter_side"]
    resize_to: int
    method: str
    color: Literal["RGB", "BGR", "GRAY"]
    layout: Literal["NHWC", "NCHW"]
    batch: bool
    scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    datatype: str
    max_pixels: int
    max_images: int

    @property
    def channels(self) -> int:
        return 1 if self.color == "GRAY" else 3

    @classmethod
    def parse(
        cls,
        obj: dict[str, Any],
        signature: Signature,
        limits: ImageConfig,
        what: str,
        section: str = "preprocess",
    ) -> ImageSpec:
        """Check a declaration against the model's input; ModelError names the bad key
        (`section`: where the declaration is in the manifest)."""

        def bad(key: str, why: str) -> ModelError:
            return ModelError(f"{what}: {section}.{key} = {obj.get(key)!r}: {why}")

        spec = declared_tensor(obj, section, _KEYS, "input", signature.inputs, what)
        name = spec.name
        rank = len(spec.shape)
        if rank not in (3, 4):
            raise ModelError(
                f"{what}: input {name!r} has shape {list(spec.shape)}; an image input needs "
                "3 dimensions (HWC or CHW) or 4 (with a batch dimension first)"
            )
        dims = spec.shape[-3:]
        layout = obj.get("layout")
        if layout is None:
            layout = "NCHW" if dims[0] in (1, 3) and dims[2] not in (1, 3) else "NHWC"
        if layout not in ("NHWC", "NCHW"):
            raise bad("layout", "must be NHWC or NCHW")
        h_dim, w_dim, c_dim = (dims[1], dims[2], dims[0]) if layout == "NCHW" else dims
        color = obj.get("color", "GRAY" if c_dim == 1 else "RGB")
        if color not in ("RGB", "BGR", "GRAY"):
            raise bad("color", "must be RGB, BGR or GRAY")
        channels = 1 if color == "GRAY" else 3
        if c_dim not in (-1, channels):
            raise bad("color", f"gives {channels} channels but input {name!r} has {c_dim}")
        size = obj.get("size", [h_dim, w_dim])
        if (
            not isinstance(size, list)
            or len(size) != 2
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in size)
        ):
            raise bad("size", "must be [height, width] (the model input does not fix them)")
        height, width = size
        if (h_dim not in (-1, height)) or (w_dim not in (-1, width)):
            raise bad("size", f"does not match input {name!r} {list(spec.shape)}")
        resize = obj.get("resize", "stretch")
        if resize not in ("stretch", "shorter_side"):
            raise bad("resize", "must be stretch or shorter_side")
        resize_to = obj.get("resize_to", max(height, width))
        if not isinstance(resize_to, int) or isinstance(resize_to, bool):
            raise bad("resize_to", "must be an integer")
        if resize_to < max(height, width):
            raise bad("resize_to", f"must be at least the crop size {max(height, width)}")
        method = obj.get("method", "bilinear")
        if method not in METHODS:
            raise bad("method", f"must be one of {', '.join(METHODS)}")
        scale = obj.get("scale", 1.0)
        if not _is_number(scale) or scale == 0:
            raise bad("scale", "must be a non-zero number")
        mean, std = (
            _per_channel(obj, k, d, channels, bad) for k, d in (("mean", 0.0), ("std", 1.0))
        )
        if any(s == 0 for s in std):
            raise bad("std", "must not be 0")
        datatype = obj.get("dtype", spec.datatype)
        if datatype not in FLOAT_TYPES | INT_TYPES:
            raise bad("dtype", "must be a numeric KServe datatype (FP32, UINT8, ...)")
        if datatype != spec.datatype:
            raise bad("dtype", f"input {name!r} takes {spec.datatype}")
        return cls(
            input=name,
            height=height,
            width=width,
            resize=resize,
            resize_to=resize_to,
            method=method,
            color=color,
            layout=cast(Literal["NHWC", "NCHW"], layout),
            batch=rank == 4,
            scale=float(scale),
            mean=mean,
            std=std,
            datatype=datatype,
            max_pixels=limits.max_pixels,
            max_images=limits.max_images,
        )

    def to_json(self) -> dict[str, Any]:
        """The declaration with every default filled in (model metadata shows it)."""
        return {
            "type": "image", "input": self.input, "size": [self.height, self.width],
            "resize": self.resize, "resize_to": self.resize_to, "method": self.method,
            "color": self.color, "layout": self.layout, "scale": self.scale,
            "mean": list(self.mean), "std": list(self.std), "dtype": self.datatype,
            "content_types": sorted(CONTENT_TYPES),
        }  # fmt: skip


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _per_channel(
    obj: dict[str, Any], key: str, default: float, channels: int, bad: Any
) -> tuple[float, ...]:
    value = obj.get(key, default)
    values = value if isinstance(value, list) else [value]
    if not values or not all(_is_number(v) for v in values) or len(values) not in (1, channels):
        raise bad(key, f"must be a number or a list of {channels}")
    return tuple(float(v) for v in values) * (channels if len(values) == 1 else 1)


def sniff(data: bytes) -> str | None:
    """The image format from the first bytes: JPEG, PNG, or None."""
    for magic, fmt in _MAGIC:
        if data.startswith(magic):
            return fmt
    return None


def check_content_type(data: bytes, content_type: str) -> None:
    """415 for a type we do not decode, or one the bytes contradict (a PNG sent as JPEG)."""
    fmt = CONTENT_TYPES.get(content_type.lower())
    if fmt is None:
        raise UnsupportedMediaType(
            f"Content-Type {content_type} is not an image type this model takes "
            f"({', '.join(sorted(CONTENT_TYPES))})"
        )
    found = sniff(data)
    if found is not None and found != fmt:
        raise UnsupportedMediaType(
            f"Content-Type says {content_type} but the data is a {found} image"
        )


def encoded(item: Any, what: str) -> bytes:
    """The image bytes of one BYTES element: raw JPEG/PNG, base64 of one, or a data: URL."""
    data = bytes(item) if not isinstance(item, str) else item.encode()
    if sniff(data) is not None:
        return data
    text = data.strip()
    if text.startswith(b"data:"):
        head, sep, text = text.partition(b",")
        if not sep or not head.endswith(b";base64"):
            raise InvalidInput(f"{what}: a data: URL must be base64 (data:image/png;base64,...)")
    try:
        decoded = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        decoded = b""
    if sniff(decoded) is None:
        start = data[:8].hex(" ")
        raise InvalidInput(
            f"{what}: not a JPEG or PNG image, nor base64 of one (it starts with {start})"
        )
    return decoded


def decode(data: bytes, spec: ImageSpec, what: str) -> Any:
    """Decode and convert one image (a Pillow image in RGB or L mode), within the limits."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    fmt = sniff(data)
    if fmt is None:
        raise InvalidInput(f"{what}: not a JPEG or PNG image (it starts with {data[:8].hex(' ')})")
    try:
        with Image.open(io.BytesIO(data), formats=[fmt]) as img:
            width, height = img.size
            if width * height > spec.max_pixels:
                raise InvalidInput(
                    f"{what}: the image is {width}x{height} = {width * height} pixels, more "
                    f"than the limit of {spec.max_pixels} (image.max_pixels)"
                )
            img.load()
            oriented = ImageOps.exif_transpose(img)
            return oriented.convert("L" if spec.color == "GRAY" else "RGB")
    except Image.DecompressionBombError as exc:
        raise InvalidInput(f"{what}: refused as a decompression bomb: {exc}") from None
    except UnidentifiedImageError:
        raise InvalidInput(f"{what}: corrupt {fmt} image (Pillow cannot identify it)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidInput(f"{what}: corrupt or truncated {fmt} image: {exc}") from None


def resample(method: str) -> Any:
    from PIL import Image

    return getattr(Image.Resampling, method.upper())


def transform(img: Any, spec: ImageSpec) -> np.ndarray[Any, Any]:
    """Steps 2-6 of the module docstring for one decoded image, without the batch dimension."""
    if spec.resize == "stretch":
        img = img.resize((spec.width, spec.height), resample(spec.method))
    else:
        w, h = img.size
        s = spec.resize_to
        size = (s, max(s, h * s // w)) if w <= h else (max(s, w * s // h), s)
        img = img.resize(size, resample(spec.method))
        left, top = (size[0] - spec.width) // 2, (size[1] - spec.height) // 2
        img = img.crop((left, top, left + spec.width, top + spec.height))
    pixels = np.asarray(img, dtype=np.float32)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if spec.color == "BGR":
        pixels = pixels[:, :, ::-1]
    pixels = pixels * np.float32(spec.scale)
    pixels = (pixels - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    if spec.layout == "NCHW":
        pixels = pixels.transpose(2, 0, 1)
    dtype = DATATYPES[spec.datatype]
    if spec.datatype in INT_TYPES:
        info = np.iinfo(dtype)
        pixels = np.clip(np.rint(pixels), info.min, info.max)
    return cast("np.ndarray[Any, Any]", np.ascontiguousarray(pixels, dtype=dtype))


def to_tensor(items: np.ndarray[Any, Any], spec: ImageSpec) -> np.ndarray[Any, Any]:
    """A BYTES tensor of encoded images ([N], [N, 1], or [1] / [] without a batch) -> the
    model input tensor."""
    what = f"input {spec.input!r}"
    flat = items.reshape(-1)
    if flat.size == 0:
        raise InvalidInput(f"{what}: no image given")
    if flat.size > spec.max_images:
        raise InvalidInput(
            f"{what}: {flat.size} images in one request, more than the limit of "
            f"{spec.max_images} (image.max_images)"
        )
    if not spec.batch and flat.size != 1:
        raise InvalidInput(f"{what}: the model takes one image per request, got {flat.size}")
    tensors = [
        transform(decode(encoded(item, f"{what} image {i}"), spec, f"{what} image {i}"), spec)
        for i, item in enumerate(flat)
    ]
    return np.stack(tensors) if spec.batch else tensors[0]
