"""crop: exact copies on pixel edges, PyTorch's grid_sample as the reference elsewhere."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.errors import InvalidInput, ModelError
from appliance.tensors import TensorSpec
from tests.steps.helpers import parse, run

HAVE_TORCH = importlib.util.find_spec("torch") is not None


def test_a_box_on_pixel_edges_copies_the_pixels() -> None:
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (1, 3, 20, 30), dtype=np.uint8)
    boxes = np.array([[[5, 2, 13, 10], [0, 0, 8, 8], [22, 12, 30, 20]]], np.float32)
    out = run(parse({"type": "crop", "size": [8, 8]}), image=image, boxes=boxes)["crops"]
    assert out.shape == (3, 3, 8, 8) and out.dtype == np.uint8
    for crop, (x1, y1, x2, y2) in zip(out, boxes[0].astype(int), strict=True):
        assert np.array_equal(crop, image[0, :, y1:y2, x1:x2])
    nhwc = run(
        parse({"type": "crop", "size": [8, 8], "layout": "NHWC"}),
        image=image[0].transpose(1, 2, 0),
        boxes=boxes[0],
    )["crops"]
    assert np.array_equal(nhwc, out.transpose(0, 2, 3, 1))


def test_box_formats_and_normalized_coordinates_agree() -> None:
    rng = np.random.default_rng(2)
    image = rng.random((3, 40, 50), dtype=np.float32)
    xyxy = np.array([[3.5, 4.25, 21.0, 30.5], [10, 10, 49, 39]], np.float32)
    want = run(parse({"type": "crop", "size": [6, 7]}), image=image, boxes=xyxy)["crops"]
    w, h = xyxy[:, 2] - xyxy[:, 0], xyxy[:, 3] - xyxy[:, 1]
    forms = {
        "xywh": np.stack([xyxy[:, 0], xyxy[:, 1], w, h], axis=1),
        "cxcywh": np.stack([xyxy[:, 0] + w / 2, xyxy[:, 1] + h / 2, w, h], axis=1),
    }
    for fmt, boxes in forms.items():
        got = run(
            parse({"type": "crop", "size": [6, 7], "box_format": fmt}), image=image, boxes=boxes
        )
        np.testing.assert_allclose(got["crops"], want, atol=1e-5)
    normalized = xyxy / np.array([50, 40, 50, 40], np.float32)
    got = run(
        parse({"type": "crop", "size": [6, 7], "normalized": True}), image=image, boxes=normalized
    )
    np.testing.assert_allclose(got["crops"], want, atol=1e-5)


@pytest.mark.skipif(not HAVE_TORCH, reason="torch is not installed")
@settings(max_examples=40, deadline=None)
@given(st.data())
def test_matches_torch_grid_sample(data: st.DataObject) -> None:
    import torch

    height, width = data.draw(st.integers(4, 40)), data.draw(st.integers(4, 40))
    out_h, out_w = data.draw(st.integers(1, 12)), data.draw(st.integers(1, 12))
    x1 = data.draw(st.floats(0, width - 1))
    y1 = data.draw(st.floats(0, height - 1))
    x2 = data.draw(st.floats(x1 + 0.5, width))
    y2 = data.draw(st.floats(y1 + 0.5, height))
    image = np.random.default_rng(3).random((1, 2, height, width)).astype(np.float32)
    step = parse({"type": "crop", "size": [out_h, out_w]})
    got = run(step, image=image, boxes=np.array([[x1, y1, x2, y2]], np.float64))["crops"]
    # the same sampling points, written as grid_sample's normalized coordinates
    px = x1 + (np.arange(out_w) + 0.5) * (x2 - x1) / out_w - 0.5
    py = y1 + (np.arange(out_h) + 0.5) * (y2 - y1) / out_h - 0.5
    gx, gy = np.meshgrid((2 * px + 1) / width - 1, (2 * py + 1) / height - 1)
    grid = torch.from_numpy(np.stack([gx, gy], axis=-1)[None].astype(np.float32))
    want = torch.nn.functional.grid_sample(
        torch.from_numpy(image), grid, mode="bilinear", padding_mode="border", align_corners=False
    ).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_clipping_zero_area_and_no_boxes() -> None:
    image = np.arange(2 * 10 * 10, dtype=np.float32).reshape(2, 10, 10)
    step = parse({"type": "crop", "size": [4, 4], "fill": -1})
    inside = run(step, image=image, boxes=np.array([[5, 5, 10, 10]], np.float32))["crops"]
    beyond = run(step, image=image, boxes=np.array([[5, 5, 30, 30]], np.float32))["crops"]
    assert np.array_equal(inside, beyond)  # clipped to the picture first
    degenerate = np.array([[3, 3, 3, 8], [20, 20, 30, 30], [6, 6, 2, 2]], np.float32)
    out = run(step, image=image, boxes=degenerate)["crops"]
    assert out.shape == (3, 2, 4, 4) and (out == -1).all()
    empty = run(step, image=image[None], boxes=np.zeros((1, 0, 4), np.float32))["crops"]
    assert empty.shape == (0, 2, 4, 4) and empty.dtype == np.float32
    empty_nhwc = run(
        parse({"type": "crop", "size": [4, 5], "layout": "NHWC"}),
        image=np.zeros((10, 10, 3), np.uint8),
        boxes=np.zeros((0, 4), np.float32),
    )["crops"]
    assert empty_nhwc.shape == (0, 4, 5, 3) and empty_nhwc.dtype == np.uint8


@settings(max_examples=50, deadline=None)
@given(
    st.integers(0, 6),
    st.integers(1, 9),
    st.integers(1, 9),
    st.sampled_from(["NCHW", "NHWC"]),
    st.sampled_from([np.uint8, np.float32, np.int16]),
    st.integers(1, 4),
)
def test_crop_shapes(
    n: int, out_h: int, out_w: int, layout: str, dtype: type, channels: int
) -> None:
    rng = np.random.default_rng(n)
    boxes = rng.uniform(-5, 25, (n, 4)).astype(np.float32)
    chw: np.ndarray = np.ones((channels, 12, 16), dtype)
    image = chw if layout == "NCHW" else chw.transpose(1, 2, 0)
    step = parse({"type": "crop", "size": [out_h, out_w], "layout": layout})
    out = run(step, image=image, boxes=boxes)["crops"]
    shape = (n, channels, out_h, out_w) if layout == "NCHW" else (n, out_h, out_w, channels)
    assert out.shape == shape and out.dtype == dtype
    spec = step.specs({"image": TensorSpec("image", "UINT8", image.shape)})["crops"]
    assert spec.shape == (-1, *shape[1:])


def test_limits_and_bad_inputs() -> None:
    step = parse({"type": "crop", "size": 4, "max_crops": 2})
    image = np.zeros((1, 3, 8, 8), np.float32)
    with pytest.raises(
        InvalidInput, match=r"3 boxes, more than the limit of 2 \(crop step max_crops\)"
    ):
        run(step, image=image, boxes=np.zeros((3, 4), np.float32))
    with pytest.raises(InvalidInput, match="crop takes one image, got 2"):
        run(step, image=np.zeros((2, 3, 8, 8), np.float32), boxes=np.zeros((1, 4), np.float32))
    with pytest.raises(InvalidInput, match=r"tensor 'boxes': box 0 is not finite"):
        run(step, image=image, boxes=np.array([[0, 0, np.inf, 1]], np.float32))
    with pytest.raises(InvalidInput, match=r"tensor 'boxes' must be boxes \[N, 4\]"):
        run(step, image=image, boxes=np.zeros((2, 5), np.float32))
    available = {"image": ("FP32", (4, 3, 8, 8)), "boxes": ("FP32", (-1, 4))}
    with pytest.raises(
        ModelError, match=r"inputs\.image: crops one image; 'image' has a batch of 4"
    ):
        parse({"type": "crop", "size": 4}, **available)
    with pytest.raises(ModelError, match=r"max_crops: must be from 1 to"):
        parse({"type": "crop", "size": 4, "max_crops": 0})
    with pytest.raises(ModelError, match=r"box_format: must be one of xyxy, xywh, cxcywh"):
        parse({"type": "crop", "size": 4, "box_format": "yolo"})
