"""cast and reshape."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from appliance.errors import InvalidInput, ModelError
from appliance.tensors import DATATYPES, INT_TYPES, TensorSpec
from tests.steps.helpers import parse, run


def test_cast_rounds_and_clamps_to_integers() -> None:
    step = parse({"type": "cast", "datatype": "UINT8", "inputs": {"input": "x"}})
    assert step.reads == ("x",) and step.writes == ("x",)  # in place by default
    x = np.array([-3.0, 0.5, 1.5, 2.49, 254.5, 255.5, 1e9, -np.inf, np.inf], np.float32)
    assert run(step, x=x)["x"].tolist() == [0, 0, 2, 2, 254, 255, 255, 0, 255]
    with pytest.raises(InvalidInput, match="tensor 'x' holds NaN, which UINT8 cannot hold"):
        run(step, x=np.array([np.nan], np.float32))
    big = np.array([2**63 - 1, -(2**63), 300], np.int64)
    assert run(step, x=big)["x"].tolist() == [255, 0, 255]
    to64 = parse(
        {"type": "cast", "datatype": "INT64", "inputs": {"input": "x"}, "outputs": {"output": "y"}}
    )
    assert run(to64, x=np.array([1e30, -1e30, 2.5], np.float64))["y"].tolist() == [
        2**63 - 1,
        -(2**63),
        2,
    ]
    assert run(to64, x=np.array([2**64 - 1], np.uint64))["y"].tolist() == [2**63 - 1]
    to_bool = parse({"type": "cast", "datatype": "BOOL"})
    assert run(to_bool, input=np.array([0.0, -0.1, 3.0]))["input"].tolist() == [False, True, True]
    with pytest.raises(InvalidInput, match="tensor 'input' must be numeric"):
        run(to_bool, input=np.array([b"a"], dtype=object))


@settings(max_examples=150, deadline=None)
@given(
    hnp.arrays(
        np.float64, hnp.array_shapes(max_dims=2, max_side=5), elements=st.floats(-1e20, 1e20)
    ),
    st.sampled_from(sorted(INT_TYPES)),
)
def test_cast_to_integers_is_rint_then_clamp(x: np.ndarray, datatype: str) -> None:
    out = run(parse({"type": "cast", "datatype": datatype}), input=x)["input"]
    info = np.iinfo(DATATYPES[datatype])
    want = [min(max(int(np.rint(v)), info.min), info.max) for v in x.reshape(-1).tolist()]
    assert out.dtype == DATATYPES[datatype] and out.reshape(-1).tolist() == want


def test_cast_to_the_same_type_hands_the_array_on() -> None:
    x = np.arange(4, dtype=np.float32)
    assert run(parse({"type": "cast", "datatype": "FP32"}), input=x)["input"] is x
    spec = parse({"type": "cast", "datatype": "FP16"}).specs(
        {"input": TensorSpec("input", "FP32", (1, 3))}
    )
    assert spec == {"input": TensorSpec("input", "FP16", (1, 3))}
    with pytest.raises(ModelError, match=r"datatype: must be one of BOOL, FP16"):
        parse({"type": "cast", "datatype": "BYTES"})
    with pytest.raises(ModelError, match=r"datatype: must be one of"):
        parse({"type": "cast"})
    with pytest.raises(ModelError, match=r"inputs\.input: tensor 'text' is BYTES"):
        parse(
            {"type": "cast", "datatype": "FP32", "inputs": {"input": "text"}}, text=("BYTES", (1,))
        )


def test_reshape() -> None:
    step = parse({"type": "reshape", "shape": [-1, 4], "inputs": {"input": "boxes"}})
    assert run(step, boxes=np.zeros((1, 3, 4), np.float32))["boxes"].shape == (3, 4)
    assert run(step, boxes=np.zeros((0, 4), np.float32))["boxes"].shape == (0, 4)
    with pytest.raises(
        InvalidInput,
        match=r"tensor 'boxes' FP32 \[1, 3, 5\] \(15 elements\) cannot be reshaped to \[-1, 4\]",
    ):
        run(step, boxes=np.zeros((1, 3, 5), np.float32))
    given_ = {"boxes": TensorSpec("boxes", "FP32", (1, 6, 4))}
    assert step.specs(given_)["boxes"].shape == (6, 4)
    assert step.specs({"boxes": TensorSpec("boxes", "FP32", (1, -1, 4))})["boxes"].shape == (-1, 4)
    with pytest.raises(ModelError, match=r"shape: cannot hold the elements of 'b' \[2, 5\]"):
        parse({"type": "reshape", "shape": [3, -1], "inputs": {"input": "b"}}, b=("FP32", (2, 5)))
    for bad in ([-1, -1], [2, -2], "2,2", [1.5]):
        with pytest.raises(ModelError, match=r"shape: must be a list of sizes"):
            parse({"type": "reshape", "shape": bad})
