"""resize and letterbox: PyTorch's bilinear resize as the reference, boxes mapped back."""

from __future__ import annotations

import importlib.util
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.errors import InvalidInput, ModelError
from appliance.tensors import TensorSpec
from tests.steps.helpers import parse, run

HAVE_TORCH = importlib.util.find_spec("torch") is not None


def torch_resize(nchw: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    import torch

    t = torch.from_numpy(np.ascontiguousarray(nchw, np.float32))
    out = torch.nn.functional.interpolate(
        t, size=size, mode="bilinear", align_corners=False, antialias=False
    )
    return np.asarray(out.numpy())


@pytest.mark.skipif(not HAVE_TORCH, reason="torch is not installed")
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize(("src", "dst"), [((13, 17), (7, 5)), ((8, 6), (40, 50)), ((9, 9), (9, 9))])
def test_resize_is_bilinear_like_torch(
    layout: str, src: tuple[int, int], dst: tuple[int, int]
) -> None:
    rng = np.random.default_rng(0)
    nchw = rng.random((2, 3, *src), dtype=np.float32)
    step = parse({"type": "resize", "size": list(dst), "layout": layout})
    given_ = nchw if layout == "NCHW" else nchw.transpose(0, 2, 3, 1)
    out = run(step, image=given_)["image"]
    want = torch_resize(nchw, dst)
    if layout == "NHWC":
        want = want.transpose(0, 2, 3, 1)
    assert out.shape == want.shape and out.dtype == np.float32
    np.testing.assert_allclose(out, want, atol=1e-5)
    # without the batch dimension too
    single = run(step, image=given_[0])["image"]
    np.testing.assert_allclose(single, want[0], atol=1e-5)


def test_resize_keeps_integer_types_rounded_and_an_identity_is_exact() -> None:
    img = (np.arange(3 * 4 * 6, dtype=np.uint8) * 3).reshape(3, 4, 6)
    assert np.array_equal(run(parse({"type": "resize", "size": [4, 6]}), image=img)["image"], img)
    out = run(parse({"type": "resize", "size": [2, 3]}), image=img)["image"]
    assert out.dtype == np.uint8 and out.shape == (3, 2, 3)
    # a 2x shrink samples midway between four pixels: their mean, rounded half to even
    blocks = img.astype(np.float64).reshape(3, 2, 2, 3, 2).mean(axis=(2, 4))
    assert out.tolist() == np.rint(blocks).tolist()


def test_letterbox_geometry_padding_and_transform() -> None:
    img = np.full((1, 3, 50, 100), 200, np.uint8)  # wide picture
    step = parse({"type": "letterbox", "size": [64, 64], "pad_value": 114})
    out = run(step, image=img)
    boxed, transform = out["image"], out["transform"]
    assert boxed.shape == (1, 3, 64, 64) and boxed.dtype == np.uint8
    assert transform.dtype == np.float32 and transform.tolist() == pytest.approx([0.64, 0.0, 16.0])
    assert (boxed[:, :, :16] == 114).all() and (boxed[:, :, 48:] == 114).all()
    assert (boxed[:, :, 16:48] == 200).all()
    top_left = run(parse({"type": "letterbox", "size": [64, 64], "center": False}), image=img)
    assert top_left["transform"].tolist() == pytest.approx([0.64, 0.0, 0.0])
    assert (top_left["image"][:, :, :32] == 200).all() and (top_left["image"][:, :, 32:] == 0).all()
    small = np.zeros((3, 10, 20), np.float32)
    no_up = run(parse({"type": "letterbox", "size": [64, 64], "scale_up": False}), image=small)
    assert no_up["transform"].tolist() == [1.0, 22.0, 27.0]
    assert step.specs({})["transform"].shape == (3,)


def _find_square(image_hw: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(image_hw > 0.5)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


@settings(max_examples=60, deadline=None)
@given(
    st.integers(20, 120),
    st.integers(20, 120),
    st.data(),
    st.sampled_from(["NCHW", "NHWC"]),
)
def test_letterbox_boxes_map_back_through_nms(
    height: int, width: int, data: st.DataObject, layout: str
) -> None:
    """A square drawn on a picture, found on the letterboxed picture and mapped back through
    the transform by the nms step, lands where it was drawn (within a pixel of the scale)."""
    side = data.draw(st.integers(6, min(height, width) // 2))
    x0 = data.draw(st.integers(0, width - side))
    y0 = data.draw(st.integers(0, height - side))
    picture = np.zeros((1, height, width), np.float32)
    picture[0, y0 : y0 + side, x0 : x0 + side] = 1.0
    given_ = picture if layout == "NCHW" else picture.transpose(1, 2, 0)
    out = run(parse({"type": "letterbox", "size": [64, 64], "layout": layout}), image=given_)
    boxed = out["image"][0] if layout == "NCHW" else out["image"][..., 0]
    found = np.array([_find_square(boxed)], np.float32)
    nms = parse({"type": "nms", "score_threshold": 0.0})
    back = run(nms, boxes=found, scores=np.array([1.0], np.float32), transform=out["transform"])
    scale = float(out["transform"][0])
    tolerance = 1.0 / scale + 0.5
    assert back["boxes"][0].tolist() == pytest.approx([x0, y0, x0 + side, y0 + side], abs=tolerance)


def test_bad_declarations_and_tensors() -> None:
    available = {"images": ("FP32", (1, 3, -1, -1)), "scores": ("FP32", (1, 4))}
    ok = parse({"type": "letterbox", "size": 320, "inputs": {"image": "images"}}, **available)
    assert ok.reads == ("images",) and ok.writes == ("images", "transform")
    specs = ok.specs({"images": TensorSpec("images", "FP32", (1, 3, -1, -1))})
    assert specs["images"].shape == (1, 3, 320, 320)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"type": "letterbox"}, r"size: must be \[height, width\]"),
        ({"type": "letterbox", "size": [0, 5]}, r"size: must be \[height, width\]"),
        ({"type": "resize", "size": [5, 5], "layout": "CHW"}, r"layout: must be one of NCHW, NHWC"),
        ({"type": "letterbox", "size": 8, "pad_value": "grey"}, r"pad_value: must be a number"),
        ({"type": "letterbox", "size": 8, "center": 1}, r"center: must be true or false"),
        (
            {"type": "resize", "size": 8, "inputs": {"image": "scores"}},
            r"inputs\.image: tensor 'scores' has shape \[1, 4\], not 3 or 4 dims",
        ),
    ]
    for decl, message in cases:
        with pytest.raises(ModelError, match=message):
            parse(decl, **available)
    step = parse({"type": "resize", "size": 8})
    with pytest.raises(InvalidInput, match=r"tensor 'image' must be a numeric image"):
        run(step, image=np.zeros((4, 4), np.float32))
    with pytest.raises(InvalidInput, match=r"tensor 'image' holds no image"):
        run(step, image=np.zeros((0, 3, 4, 4), np.float32))
    with pytest.raises(InvalidInput, match=r"tensor 'image' is an empty image"):
        run(step, image=np.zeros((3, 0, 4), np.float32))
