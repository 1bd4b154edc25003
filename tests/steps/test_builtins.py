"""Every built-in step: found by the registry, strict about its keys, and its metadata is a
declaration that parses back to the same step."""

from __future__ import annotations

import json
from typing import Any

import pytest

from appliance.errors import ModelError
from appliance.steps import get_step
from tests.steps.helpers import parse

MINIMAL: dict[str, dict[str, Any]] = {
    "letterbox": {"size": [64, 64]},
    "resize": {"size": [32, 48], "layout": "NHWC"},
    "crop": {"size": [16, 16]},
    "nms": {"iou_threshold": 0.5},
    "threshold": {"value": 0.3, "also": ["boxes"]},
    "top_k": {"k": 3},
    "argmax_label": {"labels": ["cat", "dog"]},
    "cast": {"datatype": "FP16", "inputs": {"input": "logits"}},
    "reshape": {"shape": [-1, 4]},
    "json_field": {"path": 'a.b[0]["c.d"]', "datatype": "FP32"},
}


@pytest.mark.parametrize("type_", sorted(MINIMAL))
def test_registered_strict_and_described(type_: str) -> None:
    cls = get_step(type_)
    assert cls.type == type_
    decl = {"type": type_, **MINIMAL[type_]}
    step = parse(decl)
    described = step.describe()
    assert described["type"] == type_
    json.dumps(described)  # metadata is JSON
    again = parse(described)
    assert again.describe() == described
    assert (again.reads, again.writes) == (step.reads, step.writes)
    with pytest.raises(ModelError, match=r"steps\.output\[0\]: colour: unknown key"):
        parse({**decl, "colour": "red"})
    with pytest.raises(ModelError, match=r"inputs\.nope: unknown role"):
        parse({**decl, "inputs": {"nope": "x"}})
    with pytest.raises(ModelError, match=r"outputs: must be an object"):
        parse({**decl, "outputs": ["x"]})


def test_parameters_documented() -> None:
    assert set(get_step("nms").parameters) == {"score_threshold", "iou_threshold", "max_detections"}
    assert set(get_step("threshold").parameters) == {"threshold"}
    assert set(get_step("top_k").parameters) == {"top_k"}
    assert get_step("cast").parameters == {}
