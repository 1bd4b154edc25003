"""argmax_label: labels, indexes and scores of the best class."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from appliance.errors import InvalidInput, ModelError
from appliance.tensors import TensorSpec
from tests.steps.helpers import parse, run

COLOURS = ["red", "green", "blue", "white"]


def test_labels_indexes_and_scores() -> None:
    logits = np.array([[0.0, 2.0, 1.0, 2.0], [5.0, -1.0, 0.0, 1.0]], np.float32)
    out = run(parse({"type": "argmax_label", "labels": COLOURS}), logits=logits)
    assert out["label"].tolist() == [b"green", b"red"]  # a tie goes to the lower index
    assert out["label"].dtype == object and out["index"].dtype == np.int64
    assert out["index"].tolist() == [1, 0]
    assert out["score"].dtype == np.float32 and out["score"].tolist() == [2.0, 5.0]
    soft = run(parse({"type": "argmax_label", "labels": COLOURS, "softmax": True}), logits=logits)
    e = np.exp(logits.astype(np.float64))
    np.testing.assert_allclose(
        soft["score"], (e / e.sum(axis=1, keepdims=True)).max(axis=1), rtol=1e-6
    )
    # one row of a fan-out ([1, C]) and a bare [C]
    one = run(parse({"type": "argmax_label", "labels": COLOURS}), logits=logits[1:])
    assert one["label"].shape == (1,) and one["label"].tolist() == [b"red"]
    bare = run(
        parse({"type": "argmax_label", "labels": ["ä", "b"]}), logits=np.array([3, 1], np.int64)
    )
    assert bare["label"].shape == () and bare["label"].item() == "ä".encode()


def test_declaration_and_tensor_checks() -> None:
    available = {"probs": ("FP32", (-1, 4)), "text": ("BYTES", (1,))}
    step = parse(
        {"type": "argmax_label", "labels": COLOURS, "inputs": {"logits": "probs"}}, **available
    )
    assert step.reads == ("probs",) and step.writes == ("label", "index", "score")
    specs = step.specs({"probs": TensorSpec("probs", "FP32", (-1, 4))})
    assert [(s.name, s.datatype, s.shape) for s in specs.values()] == [
        ("label", "BYTES", (-1,)), ("index", "INT64", (-1,)), ("score", "FP32", (-1,))
    ]  # fmt: skip
    cases: list[tuple[dict[str, Any], str]] = [
        (
            {"labels": ["a", "b"], "inputs": {"logits": "probs"}},
            r"labels: 2 labels, but 'probs' \[-1, 4\] has 4 classes",
        ),
        (
            {"labels": [], "inputs": {"logits": "probs"}},
            r"labels: must be a non-empty list of strings",
        ),
        (
            {"labels": ["a", 1], "inputs": {"logits": "probs"}},
            r"labels: must be a non-empty list of strings",
        ),
        (
            {"labels": COLOURS, "inputs": {"logits": "text"}},
            r"inputs\.logits: tensor 'text' is BYTES",
        ),
        (
            {"labels": COLOURS, "softmax": "no", "inputs": {"logits": "probs"}},
            r"softmax: must be true or false",
        ),
    ]
    for extra, message in cases:
        with pytest.raises(ModelError, match=message):
            parse({"type": "argmax_label", **extra}, **available)
    with pytest.raises(
        InvalidInput, match=r"tensor 'logits' has shape \[2, 3\]: the step has 4 labels"
    ):
        run(parse({"type": "argmax_label", "labels": COLOURS}), logits=np.zeros((2, 3), np.float32))
