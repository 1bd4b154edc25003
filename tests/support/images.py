"""Real pictures for the image tests, and the declared pre-processing done by hand.

`by_hand` follows the steps the README documents with Pillow and numpy directly, not through
appliance.preprocess, so the two are checked against each other.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from ai_edge_litert.interpreter import Interpreter
from PIL import Image

LABELS = ("apple", "bee", "cat", "dog", "eel", "fox", "gnu", "hen", "ibis", "jay")
CLASSIFIER_PRE: dict[str, Any] = {
    "type": "image",
    "resize": "shorter_side",
    "resize_to": 40,
    "method": "bilinear",
    "scale": 1 / 255,
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
}
CLASSIFIER_POST: dict[str, Any] = {
    "type": "classification",
    "softmax": True,
    "labels": list(LABELS),
}


def picture(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    """A deterministic picture: colour gradients plus random blocks (so models disagree)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack(
        [
            x * 255 // max(width - 1, 1),
            y * 255 // max(height - 1, 1),
            (x + y) * 127 // (width + height),
        ],
        axis=-1,
    ).astype(np.int32)
    blocks = rng.integers(-90, 90, (height // 8 + 1, width // 8 + 1, 3))
    base += np.repeat(np.repeat(blocks, 8, axis=0), 8, axis=1)[:height, :width]
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    return img.convert(mode) if mode != "RGB" else img


def encode(img: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def by_hand(data: bytes, pre: dict[str, Any], size: tuple[int, int] = (32, 32)) -> Any:
    """The declared pre-processing of one image, by hand: HWC or CHW, no batch dimension."""
    height, width = size
    color = pre.get("color", "RGB")
    img = Image.open(io.BytesIO(data)).convert("L" if color == "GRAY" else "RGB")
    method = getattr(Image.Resampling, pre.get("method", "bilinear").upper())
    if pre.get("resize", "stretch") == "stretch":
        img = img.resize((width, height), method)
    else:
        s = pre.get("resize_to", max(size))
        w, h = img.size
        new = (s, h * s // w) if w <= h else (w * s // h, s)
        img = img.resize(new, method)
        left, top = (new[0] - width) // 2, (new[1] - height) // 2
        img = img.crop((left, top, left + width, top + height))
    a = np.asarray(img).astype(np.float32)
    if a.ndim == 2:
        a = a[:, :, None]
    if color == "BGR":
        a = a[:, :, ::-1]
    a = a * np.float32(pre.get("scale", 1.0))
    a = (a - np.float32(pre.get("mean", 0.0))) / np.float32(pre.get("std", 1.0))
    a = np.asarray(a, dtype=np.float32)
    if pre.get("layout") == "NCHW":
        a = a.transpose(2, 0, 1)
    return a


def litert(path: Path, feed: list[Any]) -> list[Any]:
    """Run a .tflite model with LiteRT directly (inputs and outputs in model order)."""
    interp = Interpreter(model_path=str(path))
    for detail, value in zip(interp.get_input_details(), feed, strict=True):
        interp.resize_tensor_input(detail["index"], list(value.shape))
    interp.allocate_tensors()
    for detail, value in zip(interp.get_input_details(), feed, strict=True):
        interp.set_tensor(detail["index"], value)
    interp.invoke()
    return [np.array(interp.get_tensor(d["index"])) for d in interp.get_output_details()]


def top_k_by_hand(logits: Any, k: int) -> tuple[list[list[str]], Any]:
    """Labels and softmax scores of the k best classes of each row, by hand."""
    e = np.exp(logits.astype(np.float64) - logits.max(axis=-1, keepdims=True))
    probs = e / e.sum(axis=-1, keepdims=True)
    order = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    labels = [[LABELS[i] for i in row] for row in order]
    return labels, np.take_along_axis(probs, order, axis=-1)
