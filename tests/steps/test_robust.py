"""Whatever tensors a client sends a step (any datatype, any shape, odd values), the answer is
a result or a 400 naming what is wrong, never a step failure (500): in a pipeline a step's
inputs can come straight from the request."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from appliance.errors import InferenceFailed, InvalidInput
from appliance.steps.base import StepCall, run_step
from appliance.tensors import TensorSpec, datatype_of
from tests.steps.helpers import WHERE, parse

DECLARATIONS: dict[str, dict[str, Any]] = {
    "letterbox": {"type": "letterbox", "size": [6, 5]},
    "resize": {"type": "resize", "size": [3, 4], "layout": "NHWC"},
    "crop": {"type": "crop", "size": [3, 2], "max_crops": 8},
    "nms": {"type": "nms"},
    "nms_multi": {"type": "nms", "multi_label": True, "box_format": "cxcywh"},
    "threshold": {"type": "threshold"},
    "top_k": {"type": "top_k", "k": 2},
    "argmax_label": {"type": "argmax_label", "labels": ["a", "b", "c"], "softmax": True},
    "cast": {"type": "cast", "datatype": "UINT8"},
    "reshape": {"type": "reshape", "shape": [-1, 2]},
}
NUMERIC = ["bool", "uint8", "int8", "int32", "int64", "uint64", "float16", "float32", "float64"]
ODD = st.sampled_from([0.0, -1.0, 1.0, 0.5, 255.0, 1e30, -1e30, float("nan"), float("inf")])


def _as(value: float, dtype: np.dtype) -> Any:
    with np.errstate(over="ignore"):  # 1e30 as FP16 is inf: an odd value too
        return dtype.type(value)


#: Shapes near what each role takes (N rows, C classes), so the steps are reached past their
#: shape checks; any other shape is drawn too.
SHAPES: dict[str, list[str]] = {
    "image": ["1,3,H,W", "3,H,W", "H,W,3", "2,H,W,1"],
    "boxes": ["N,4", "1,N,4"],
    "scores": ["N", "1,N", "N,C", "1,N,C"],
    "classes": ["N", "1,N"],
    "transform": ["3", "1,3"],
    "logits": ["N,3", "3"],
    "input": ["N,2", "N"],
}


@st.composite
def tensors(draw: Any, role: str = "", n: int = 1) -> np.ndarray:
    templates = SHAPES.get(role, [])
    if templates and draw(st.integers(0, 4)):
        sizes = {
            "N": n,
            "C": draw(st.integers(1, 3)),
            "H": draw(st.integers(1, 6)),
            "W": draw(st.integers(1, 6)),
        }
        template = draw(st.sampled_from(templates))
        shape = tuple(sizes[d] if d in sizes else int(d) for d in template.split(","))
    else:
        shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5))
    kind = draw(
        st.sampled_from([*NUMERIC, "bytes"] if draw(st.integers(0, 3)) == 0 else ["float32"])
    )
    if kind == "bytes":
        return np.array(draw(st.lists(st.binary(max_size=4), min_size=1, max_size=3)), dtype=object)
    dtype = np.dtype(kind)
    if dtype.kind == "f":
        plain = st.floats(-5, 60, width=8 * dtype.itemsize)
        odd = ODD.map(lambda v: _as(v, dtype))
        elements = odd if draw(st.integers(0, 3)) == 0 else plain
        return np.asarray(draw(hnp.arrays(dtype, shape, elements=elements)))
    return np.asarray(draw(hnp.arrays(dtype, shape)))


@pytest.mark.parametrize("key", sorted(DECLARATIONS))
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_a_400_or_an_answer(key: str, data: st.DataObject) -> None:
    step = parse(DECLARATIONS[key])
    n = data.draw(st.integers(0, 5), label="rows")
    given_ = {name: data.draw(tensors(name, n), label=name) for name in step.reads}
    params = data.draw(
        st.dictionaries(
            st.sampled_from([*step.parameters, "other"]),
            st.one_of(st.integers(-3, 400), st.floats(allow_nan=True), st.text(max_size=3)),
            max_size=2,
        ),
        label="parameters",
    )
    with np.errstate(all="ignore"):
        try:
            out = run_step(step, given_, StepCall(params), WHERE)
        except InvalidInput:
            return
        except InferenceFailed as exc:  # pragma: no cover - the failure this test exists for
            raise AssertionError(f"{key}: a 500 for client tensors: {exc}") from exc
    assert set(out) <= set(step.writes)
    # what specs() promised at load is what came out (a pipeline checks nodes against it)
    specs = step.specs({n: TensorSpec(n, datatype_of(a), a.shape) for n, a in given_.items()})
    for name, array in out.items():
        spec = specs.get(name)
        if spec is not None:
            assert datatype_of(array) == spec.datatype, (name, spec)
            assert len(array.shape) == len(spec.shape), (name, array.shape, spec)
            assert all(d in (-1, a) for d, a in zip(spec.shape, array.shape, strict=True))
    OUTCOMES[key] = OUTCOMES.get(key, 0) + 1


#: answers (not 400s) per declaration, so a run shows the steps were reached
OUTCOMES: dict[str, int] = {}
