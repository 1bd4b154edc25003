"""threshold and top_k: aligned rows kept, k largest with ties by index."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from appliance.errors import InvalidInput, ModelError
from appliance.tensors import TensorSpec
from tests.steps.helpers import parse, run


def test_threshold_filters_aligned_tensors() -> None:
    scores = np.array([[0.2, 0.9, 0.5, np.nan]], np.float32)  # [1, N]
    boxes = np.arange(16, dtype=np.float32).reshape(1, 4, 4)  # [1, N, 4]
    classes = np.array([3, 1, 2, 0], np.int64)  # [N]
    step = parse({"type": "threshold", "value": 0.5})
    out = run(step, scores=scores, boxes=boxes, classes=classes)
    assert out["scores"].tolist() == [[pytest.approx(0.9), 0.5]]
    assert out["boxes"].tolist() == [boxes[0, [1, 2]].tolist()]
    assert out["classes"].tolist() == [1, 2]
    # the default `also` tensors are read when they are there
    assert set(run(step, scores=scores[0])) == {"scores"}
    assert run(step, {"threshold": 0.95}, scores=scores[0])["scores"].shape == (0,)
    assert run(step, {"threshold": "-1"}, scores=scores[0])["scores"].shape == (3,)
    with pytest.raises(InvalidInput, match="parameter threshold must be a number, got 'x'"):
        run(step, {"threshold": "x"}, scores=scores)
    with pytest.raises(
        InvalidInput, match=r"tensor 'boxes' has shape \[3, 4\]: not aligned with the 4 rows"
    ):
        run(step, scores=scores, boxes=np.zeros((3, 4), np.float32))
    with pytest.raises(
        InvalidInput, match=r"tensor 'scores' must be scores \[N\], \[1, N\] or \[N, 1\]"
    ):
        run(step, scores=np.zeros((2, 2), np.float32))


def test_threshold_names_and_specs() -> None:
    available = {"conf": ("FP32", (1, -1)), "det": ("FP32", (1, -1, 4))}
    step = parse(
        {
            "type": "threshold",
            "also": ["det"],
            "inputs": {"scores": "conf"},
            "outputs": {"det": "kept"},
        },
        **available,
    )
    assert step.reads == ("conf", "det") and step.writes == ("conf", "kept")
    specs = step.specs({n: TensorSpec(n, dt, s) for n, (dt, s) in available.items()})
    # [1, N, ...]: N rows of the second dimension, or of the first when N is 1
    assert specs["kept"].shape == (-1, -1, 4) and specs["conf"].shape == (-1, -1)
    assert step.optional == ()
    assert parse({"type": "threshold"}).optional == ("boxes", "classes")
    # the default `also` only takes tensors that exist
    assert parse({"type": "threshold", "inputs": {"scores": "conf"}}, **available).reads == (
        "conf",
    )
    # an explicit `also` is required: read even when its spec is not known
    explicit = parse(
        {"type": "threshold", "also": ["other"], "inputs": {"scores": "conf"}}, **available
    )
    assert explicit.reads == ("conf", "other") and explicit.optional == ()
    with pytest.raises(ModelError, match=r"also: must be a list of tensor names"):
        parse({"type": "threshold", "also": "boxes"})
    with pytest.raises(ModelError, match=r"value: must be a number"):
        parse({"type": "threshold", "value": None})


@settings(max_examples=100, deadline=None)
@given(
    hnp.arrays(
        np.int64, hnp.array_shapes(min_dims=1, max_dims=3, max_side=7), elements=st.integers(-5, 5)
    ),
    st.sampled_from([np.float32, np.int64, np.uint8, np.int8, np.uint64]),
    st.integers(1, 9),
)
def test_top_k_against_sorted(small: np.ndarray, dtype: type, k: int) -> None:
    """Few distinct values, so ties happen; unsigned types included (negation overflows)."""
    x: np.ndarray = (np.abs(small) if np.dtype(dtype).kind == "u" else small).astype(dtype)
    out = run(parse({"type": "top_k", "k": k}), scores=x)
    n = x.shape[-1]
    rows = [[float(v) for v in row] for row in x.reshape(-1, n)]
    ranked = [sorted(range(n), key=lambda i: (-row[i], i))[:k] for row in rows]
    want_idx = np.array(ranked).reshape(*x.shape[:-1], min(k, n))
    assert out["indices"].tolist() == want_idx.tolist()
    assert out["indices"].dtype == np.int64 and out["values"].dtype == x.dtype
    assert out["values"].tolist() == np.take_along_axis(x, want_idx, axis=-1).tolist()


def test_top_k_parameter_names_and_limits() -> None:
    step = parse(
        {"type": "top_k", "k": 2, "inputs": {"scores": "probs"}, "outputs": {"indices": "ids"}}
    )
    assert step.reads == ("probs",) and step.writes == ("values", "ids")
    probs = np.array([0.1, 0.7, 0.2, 0.7], np.float32)
    assert run(step, probs=probs)["ids"].tolist() == [1, 3]
    assert run(step, {"top_k": 3}, probs=probs)["ids"].tolist() == [1, 3, 2]
    assert run(step, {"top_k": 10}, probs=probs)["ids"].tolist() == [1, 3, 2, 0]
    assert run(step, probs=np.array([np.nan, 0.5], np.float32))["ids"].tolist() == [1, 0]
    for bad in (0, -1, "two", 1.5):
        with pytest.raises(InvalidInput, match="parameter top_k must be an integer from 1 to"):
            run(step, {"top_k": bad}, probs=probs)
    with pytest.raises(ModelError, match=r"k: must be from 1 to"):
        parse({"type": "top_k", "k": 0})
    spec = step.specs({"probs": TensorSpec("probs", "FP16", (-1, 10))})
    assert spec["values"] == TensorSpec("values", "FP16", (-1, -1))
    assert spec["ids"] == TensorSpec("ids", "INT64", (-1, -1))


def test_parameters_as_text() -> None:
    """MQTT user properties and form fields send numbers as text: decimal ASCII only."""
    step = parse({"type": "top_k", "k": 1})
    x = np.array([0.1, 0.7, 0.2], np.float32)
    assert run(step, {"top_k": " 2 "}, scores=x)["indices"].tolist() == [1, 2]
    assert run(step, {"top_k": "+2"}, scores=x)["indices"].tolist() == [1, 2]
    for bad in ("²", "2.0", "0x2", "", "1e2", "٣"):
        with pytest.raises(InvalidInput, match="parameter top_k must be an integer"):
            run(step, {"top_k": bad}, scores=x)
