"""Classification answers: softmax, top-k, labels, and the declaration's checks."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from appliance.errors import InvalidInput, ModelError
from appliance.preprocess.classify import ClassifySpec
from appliance.tensors import Signature, TensorSpec

LOGITS = Signature((), (TensorSpec("logits", "FP32", (-1, 4)),))


def test_top_k_with_softmax_and_labels() -> None:
    c = ClassifySpec.parse(
        {"type": "classification", "softmax": True, "labels": ["a", "b", "c", "d"]}, LOGITS, "m"
    )
    logits = np.array([[1.0, 3.0, 2.0, 3.0], [0.0, -1.0, 5.0, 1.0]], np.float32)
    out = c.answer(logits, 3, softmax=True)
    assert out["top_k_indices"].tolist() == [[1, 3, 2], [2, 3, 0]]  # a tie keeps index order
    assert out["top_k_labels"].tolist() == [[b"b", b"d", b"c"], [b"c", b"d", b"a"]]
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs = e / e.sum(axis=1, keepdims=True)
    best = np.sort(probs, axis=1)[:, ::-1][:, :3]
    np.testing.assert_allclose(out["top_k_scores"], best, rtol=1e-6)
    raw = c.answer(logits, 1, softmax=False)
    assert raw["top_k_scores"].tolist() == [[3.0], [5.0]]
    with pytest.raises(InvalidInput, match="top_k 5 is more than the model's 4 classes"):
        c.answer(logits, 5, softmax=True)
    assert c.requested({}) == (0, True)
    assert c.requested({"top_k": 2, "softmax": False}) == (2, False)
    with pytest.raises(InvalidInput, match="top_k must be a non-negative integer"):
        c.requested({"top_k": "2"})


@pytest.mark.parametrize(
    ("post", "message"),
    [
        ({"type": "classification", "labels": ["a"]}, "has 1 labels for 4 classes"),
        ({"type": "classification", "top_k": 0}, "must be a positive integer"),
        ({"type": "classification", "output": "nope"}, "no such model output"),
        ({"type": "classification", "softmax": "yes"}, "must be true or false"),
        ({"type": "classification", "k": 3}, "unknown keys k"),
    ],
)
def test_bad_classification_declarations(post: dict[str, Any], message: str) -> None:
    with pytest.raises(ModelError) as exc:
        ClassifySpec.parse(post, LOGITS, "m")
    assert message in exc.value.message


def test_a_default_k_from_the_manifest_applies_unless_the_request_says_otherwise() -> None:
    c = ClassifySpec.parse({"type": "classification", "top_k": 2}, LOGITS, "m")
    assert c.requested({}) == (2, False)  # e.g. an MQTT 3.1.1 raw picture, with no parameters
    assert c.requested({"top_k": 0}) == (0, False)
    assert c.to_json() == {"type": "classification", "output": "logits", "softmax": False,
                           "top_k": 2}  # fmt: skip
