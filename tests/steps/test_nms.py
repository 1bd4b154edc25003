"""The nms step against a brute-force reference (and torchvision where it is installed)."""

from __future__ import annotations

import importlib.util
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.errors import InvalidInput, ModelError
from appliance.steps import nms
from tests.steps.helpers import parse, run


def brute_iou(a: list[float], b: list[float]) -> float:
    """IoU written out in plain Python floats, independently of the step's numpy code."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(w, 0.0) * max(h, 0.0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def brute_nms(
    boxes: list[list[float]],
    scores: list[float],
    classes: list[int],
    iou_t: float,
    score_t: float,
    agnostic: bool,
    limit: int,
) -> list[int]:
    """The definition: walk candidates best first (ties: lower index), keep one unless a kept
    one of its class overlaps it by more than the IoU threshold."""
    order = sorted(
        (i for i in range(len(scores)) if scores[i] >= score_t), key=lambda i: (-scores[i], i)
    )
    kept: list[int] = []
    for i in order:
        if len(kept) == limit:
            break
        if all(
            (not agnostic and classes[k] != classes[i]) or brute_iou(boxes[k], boxes[i]) <= iou_t
            for k in kept
        ):
            kept.append(i)
    return kept


coord = st.integers(0, 40).map(float)


@st.composite
def detections(draw: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = draw(st.integers(0, 25))
    boxes = []
    for _ in range(n):
        x, y = draw(coord), draw(coord)
        boxes.append([x, y, x + draw(st.integers(1, 20)), y + draw(st.integers(1, 20))])
    # few distinct scores, so ties happen
    scores = [draw(st.sampled_from([0.1, 0.3, 0.5, 0.5, 0.7, 0.9])) for _ in range(n)]
    classes = [draw(st.integers(0, 2)) for _ in range(n)]
    return (
        np.array(boxes, np.float32).reshape(-1, 4),
        np.array(scores, np.float32),
        np.array(classes, np.int64),
    )


@settings(max_examples=200, deadline=None)
@given(
    detections(),
    st.sampled_from([0.0, 0.3, 0.5, 0.7, 1.0]),
    st.sampled_from([0.0, 0.3, 0.6]),
    st.booleans(),
    st.integers(1, 30),
)
def test_matches_brute_force(
    det: tuple[np.ndarray, np.ndarray, np.ndarray],
    iou_t: float,
    score_t: float,
    agnostic: bool,
    limit: int,
) -> None:
    boxes, scores, classes = det
    step = parse(
        {
            "type": "nms",
            "iou_threshold": iou_t,
            "score_threshold": score_t,
            "class_agnostic": agnostic,
            "max_detections": limit,
        }
    )
    out = run(step, boxes=boxes, scores=scores, classes=classes)
    want = brute_nms(
        boxes.tolist(), scores.tolist(), classes.tolist(), iou_t, score_t, agnostic, limit
    )
    assert out["boxes"].tolist() == boxes[want].tolist()
    assert out["scores"].tolist() == scores[want].tolist()
    assert out["classes"].tolist() == classes[want].tolist()
    assert out["boxes"].dtype == np.float32 and out["classes"].dtype == np.int64
    # the property NMS exists for: what is left overlaps by at most the threshold per class
    kept = out["boxes"].tolist()
    for i in range(len(kept)):
        for j in range(i):
            same = agnostic or out["classes"][i] == out["classes"][j]
            assert not same or brute_iou(kept[i], kept[j]) <= iou_t


@pytest.mark.skipif(
    importlib.util.find_spec("torchvision") is None, reason="torchvision is not installed"
)
@settings(max_examples=100, deadline=None)
@given(detections(), st.sampled_from([0.2, 0.45, 0.7]), st.booleans())
def test_matches_torchvision(
    det: tuple[np.ndarray, np.ndarray, np.ndarray], iou_t: float, agnostic: bool
) -> None:
    import torch
    import torchvision

    boxes, scores, classes = det
    # torchvision breaks score ties its own way: make scores distinct for this comparison
    scores = scores + np.arange(len(scores), dtype=np.float32) * 1e-4
    step = parse(
        {"type": "nms", "iou_threshold": iou_t, "score_threshold": 0.0, "class_agnostic": agnostic}
    )
    out = run(step, boxes=boxes, scores=scores, classes=classes)
    tb, ts = torch.from_numpy(boxes), torch.from_numpy(scores)
    if agnostic:
        keep = torchvision.ops.nms(tb, ts, iou_t)
    else:
        keep = torchvision.ops.batched_nms(tb, ts, torch.from_numpy(classes), iou_t)
    assert out["boxes"].tolist() == boxes[keep.numpy()].tolist()


def test_detector_shapes_per_class_scores_and_multi_label() -> None:
    boxes = np.array([[[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]]], np.float32)
    per_class = np.array([[[0.1, 0.8], [0.7, 0.2], [0.4, 0.35]]], np.float32)  # [1, N, C]
    out = run(
        parse({"type": "nms", "score_threshold": 0.3, "iou_threshold": 0.5}),
        boxes=boxes,
        scores=per_class,
    )
    # box 0 is class 1, box 1 class 0: different classes, both kept; box 2 takes class 0
    assert out["classes"].tolist() == [1, 0, 0]
    assert out["scores"].tolist() == pytest.approx([0.8, 0.7, 0.4])
    multi = parse({"type": "nms", "score_threshold": 0.3, "multi_label": True})
    out = run(multi, boxes=boxes, scores=per_class[0])
    found = sorted(zip(out["scores"].tolist(), out["classes"].tolist(), strict=True))
    assert [c for _, c in found] == [1, 0, 0, 1]
    assert [s for s, _ in found] == pytest.approx([0.35, 0.4, 0.7, 0.8])
    # [1, N] scores with [1, N] classes, as the sample detector writes them
    out = run(
        parse({"type": "nms"}),
        boxes=boxes,
        scores=np.array([[0.9, 0.8, 0.1]], np.float32),
        classes=np.array([[2, 2, 2]], np.int64),
    )
    assert out["boxes"].tolist() == [[0, 0, 10, 10]] and out["classes"].tolist() == [2]


def test_nothing_found_is_an_empty_answer() -> None:
    step = parse({"type": "nms"})
    for boxes, scores in (
        (np.zeros((1, 0, 4), np.float32), np.zeros((1, 0), np.float32)),
        (np.array([[0, 0, 5, 5]], np.float32), np.array([0.01], np.float32)),
    ):
        out = run(step, boxes=boxes, scores=scores)
        assert out["boxes"].shape == (0, 4) and out["scores"].shape == (0,)
        assert out["classes"].shape == (0,) and out["classes"].dtype == np.int64


def test_box_formats_and_transform_map_back() -> None:
    xyxy = np.array([[10, 20, 30, 60]], np.float32)
    cxcywh = np.array([[20, 40, 20, 40]], np.float32)
    xywh = np.array([[10, 20, 20, 40]], np.float32)
    scores = np.array([0.9], np.float32)
    for fmt, b in (("xyxy", xyxy), ("cxcywh", cxcywh), ("xywh", xywh)):
        assert (
            run(parse({"type": "nms", "box_format": fmt}), boxes=b, scores=scores)["boxes"].tolist()
            == xyxy.tolist()
        )
    transform = np.array([2.0, 4.0, 0.0], np.float32)  # scale 2, pad_x 4
    out = run(parse({"type": "nms"}), boxes=xyxy, scores=scores, transform=transform)
    assert out["boxes"].tolist() == [[3, 10, 13, 30]]
    with pytest.raises(InvalidInput, match=r"tensor 'transform' must be \[scale, pad_x, pad_y\]"):
        run(parse({"type": "nms"}), boxes=xyxy, scores=scores, transform=np.array([0.0, 1, 1]))


def test_request_parameters() -> None:
    boxes = np.array([[0, 0, 10, 10], [2, 0, 12, 10], [50, 50, 60, 60]], np.float32)
    scores = np.array([0.9, 0.8, 0.4], np.float32)
    step = parse(
        {"type": "nms", "iou_threshold": 0.5, "score_threshold": 0.5, "max_detections": 10}
    )
    assert len(run(step, boxes=boxes, scores=scores)["boxes"]) == 1
    assert len(run(step, {"score_threshold": 0.3}, boxes=boxes, scores=scores)["boxes"]) == 2
    assert (
        len(
            run(step, {"score_threshold": "0.3", "iou_threshold": 0.9}, boxes=boxes, scores=scores)[
                "boxes"
            ]
        )
        == 3
    )
    assert (
        len(
            run(step, {"score_threshold": 0.3, "max_detections": 1}, boxes=boxes, scores=scores)[
                "boxes"
            ]
        )
        == 1
    )
    for params, name in (
        ({"iou_threshold": 1.5}, "iou_threshold"),
        ({"score_threshold": "high"}, "score_threshold"),
        ({"score_threshold": True}, "score_threshold"),
        ({"max_detections": 11}, "max_detections"),
        ({"max_detections": 2.5}, "max_detections"),
    ):
        with pytest.raises(InvalidInput, match=f"parameter {name} must be"):
            run(step, params, boxes=boxes, scores=scores)


def test_bad_tensors_are_named() -> None:
    step = parse({"type": "nms"})
    boxes = np.array([[0, 0, 10, 10], [0, 0, np.nan, 10]], np.float32)
    scores = np.array([0.9, 0.8], np.float32)
    with pytest.raises(InvalidInput, match="tensor 'boxes': box 1 is not finite"):
        run(step, boxes=boxes, scores=scores)
    # a NaN score never passes the threshold, so its box is not looked at
    out = run(step, boxes=boxes, scores=np.array([0.9, np.nan], np.float32))
    assert len(out["boxes"]) == 1
    with pytest.raises(InvalidInput, match=r"tensor 'boxes' must be boxes \[N, 4\]"):
        run(step, boxes=np.zeros((3, 5), np.float32), scores=np.zeros(3, np.float32))
    with pytest.raises(InvalidInput, match=r"tensor 'scores' has shape \[4\]: for 2 boxes"):
        run(step, boxes=boxes, scores=np.zeros(4, np.float32))
    with pytest.raises(InvalidInput, match=r"tensor 'classes' has shape \[3\]: one class per box"):
        run(step, boxes=boxes, scores=scores, classes=np.zeros(3, np.int64))
    with pytest.raises(InvalidInput, match="per-class scores"):
        run(step, boxes=boxes, scores=np.zeros((2, 3), np.float32), classes=np.zeros(2, np.int64))
    with pytest.raises(InvalidInput, match=r"no tensor 'scores' \(scores\) was given"):
        run(step, boxes=boxes)


def test_declaration_checked_against_the_model_outputs() -> None:
    available = {
        "out_boxes": ("FP32", (1, -1, 4)),
        "out_scores": ("FP32", (1, -1)),
        "labels": ("INT64", (1, -1)),
        "feat": ("FP32", (1, -1, 3)),
        "feat4": ("FP32", (1, 2, 3, 4)),
    }
    decl = {
        "type": "nms",
        "inputs": {"boxes": "out_boxes", "scores": "out_scores", "classes": "labels"},
    }
    step = parse(decl, **available)
    assert step.reads == ("out_boxes", "out_scores", "labels")
    assert step.optional == ("labels",)  # read when given: a pipeline need not map it
    # nothing known yet (`models add` before the file is read): the optional ones may come
    unknown = parse({"type": "nms"})
    assert unknown.reads == ("boxes", "scores", "classes", "transform")
    assert unknown.optional == ("classes", "transform")
    assert step.writes == ("boxes", "scores", "classes")
    # without a classes tensor and no transform around, neither is read
    step = parse(
        {"type": "nms", "inputs": {"boxes": "out_boxes", "scores": "out_scores"}}, **available
    )
    assert step.reads == ("out_boxes", "out_scores")
    assert {s.name: (s.datatype, s.shape) for s in step.specs({}).values()} == {
        "boxes": ("FP32", (-1, 4)), "scores": ("FP32", (-1,)), "classes": ("INT64", (-1,))
    }  # fmt: skip
    cases: list[tuple[dict[str, Any], str]] = [
        (
            {"inputs": {"boxes": "feat", "scores": "out_scores"}},
            r"inputs\.boxes: tensor 'feat' has shape \[1, -1, 3\]: the last dim is not 4",
        ),
        (
            {"inputs": {"boxes": "out_boxes", "scores": "feat4"}},
            r"inputs\.scores: tensor 'feat4' has shape \[1, 2, 3, 4\], not 1 or 2 or 3 dims",
        ),
        ({"iou_threshold": 2}, r"iou_threshold: must be from 0\.0 to 1\.0, got 2"),
        ({"iou_threshold": "0.5"}, r"iou_threshold: must be a number, got '0\.5'"),
        ({"max_detections": 0}, r"max_detections: must be from 1 to 100000"),
        ({"class_agnostic": "yes"}, r"class_agnostic: must be true or false"),
        ({"box_format": "yxyx"}, r"box_format: must be one of xyxy, xywh, cxcywh"),
        (
            {"outputs": {"boxes": "x", "scores": "x"}},
            r"outputs: two outputs would have the same name",
        ),
    ]
    for extra, message in cases:
        with pytest.raises(ModelError, match=message):
            parse(
                {"type": "nms", "inputs": {"boxes": "out_boxes", "scores": "out_scores"}, **extra},
                **available,
            )


@pytest.mark.parametrize("n", [40, 700])
def test_both_ways_of_suppressing_agree_with_brute_force(
    n: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Up to nms.MATRIX_MAX candidates the IoUs are computed all at once, above one row per
    kept box: both give the definition's answer, on clustered boxes like a detector's."""
    rng = np.random.default_rng(n)
    centres = rng.uniform(50, 550, (12, 2))
    pick = rng.integers(0, 12, n)
    half = rng.uniform(10, 40, (12, 2))[pick] * rng.uniform(0.8, 1.2, (n, 2))
    middle = centres[pick] + rng.normal(0, 4, (n, 2))
    boxes = np.concatenate([middle - half, middle + half], axis=1).astype(np.float32)
    scores = rng.random(n).astype(np.float32)
    classes = rng.integers(0, 3, n)
    want = brute_nms(boxes.tolist(), scores.tolist(), classes.tolist(), 0.45, 0.0, False, 300)
    step = parse({"type": "nms", "iou_threshold": 0.45, "score_threshold": 0.0})
    for matrix_max in (nms.MATRIX_MAX, 0, 10_000):
        monkeypatch.setattr(nms, "MATRIX_MAX", matrix_max)
        out = run(step, boxes=boxes, scores=scores, classes=classes)
        assert out["boxes"].tolist() == boxes[want].tolist()
