"""The built-in steps of today's processing, alone: the image step standalone (as a pipeline
node uses it), the text declarations, and what a chain is for a plain or a text model."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from appliance.config import ModelConfig
from appliance.errors import InvalidInput, ModelError
from appliance.manifest import Manifest
from appliance.registry import Registry
from appliance.steps import parse_step
from appliance.steps.base import StepCall, StepContext
from appliance.steps.chain import build_chain
from appliance.tensors import TensorSpec
from tests.support.images import CLASSIFIER_PRE, by_hand, encode, picture

WHERE = "pipeline 'p': node 'decode' (image)"
STANDALONE = {"type": "image", "size": [32, 32], "layout": "NCHW", "color": "RGB",
              "dtype": "FP32", **{k: CLASSIFIER_PRE[k] for k in
                                  ("resize", "resize_to", "scale", "mean", "std")}}  # fmt: skip


def images(*data: bytes) -> np.ndarray:
    out = np.empty(len(data), dtype=object)
    out[:] = list(data)
    return out


def test_standalone_image_step_decodes_a_batch_as_declared() -> None:
    step = parse_step({**STANDALONE, "output": "pixels"}, StepContext(WHERE))
    assert (step.reads, step.writes, step.blocking) == (("image",), ("pixels",), True)
    spec = step.specs({})["pixels"]
    assert (spec.datatype, spec.shape) == ("FP32", (-1, 3, 32, 32))
    pics = [encode(picture(64, 48, 1), "JPEG"), encode(picture(40, 90, 2), "PNG")]
    out = step.run({"image": images(*pics)}, StepCall({}))
    want = np.stack([by_hand(d, {**CLASSIFIER_PRE, "layout": "NCHW"}) for d in pics])
    assert out["pixels"].shape == (2, 3, 32, 32)
    np.testing.assert_allclose(out["pixels"], want, rtol=1e-5, atol=1e-5)
    assert step.describe()["output"] == "pixels"
    with pytest.raises(InvalidInput, match="images are BYTES"):
        step.run({"image": np.zeros((1, 4), np.float32)}, StepCall({}))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"layout": None}, "layout: required in a pipeline"),
        ({"dtype": "FP99"}, "step.dtype = 'FP99': must be a numeric KServe datatype"),
        ({"size": [32]}, "step.size = [32]: must be [height, width]"),
        ({"output": 7}, "output: must be a tensor name, got 7"),
        ({"colour": "RGB"}, "step has unknown keys colour"),
    ],
)
def test_standalone_image_step_refuses_what_it_cannot_do(
    change: dict[str, object], message: str
) -> None:
    decl = {k: v for k, v in {**STANDALONE, **change}.items() if v is not None}
    with pytest.raises(ModelError) as err:
        parse_step(decl, StepContext(WHERE))
    assert message in err.value.message
    assert err.value.message.startswith(WHERE)


def test_standalone_image_step_checks_a_known_input() -> None:
    ctx = StepContext(WHERE, {"image": TensorSpec("image", "FP32", (-1, 4))})
    with pytest.raises(ModelError, match="'image' is FP32; images come as BYTES"):
        parse_step(STANDALONE, ctx)


def _manifest(registry: Registry, name: str) -> Manifest:
    return registry.active(name).manifest


def test_a_plain_model_has_no_chain(tmp_path: Path, samples: Path) -> None:
    registry = Registry(tmp_path / "store")
    registry.add("sample", samples / "sample.onnx")
    m = _manifest(registry, "sample")
    assert build_chain(m, m.signature, {}, ModelConfig()) is None


def test_text_declarations_are_checked_shown_and_never_run(tmp_path: Path, samples: Path) -> None:
    """The text backend tokenizes and pools; its chain has nothing to run on a request."""
    registry = Registry(tmp_path / "store")
    pre = {"type": "text", "tokenizer": "tokenizer.json", "max_length": 16,
           "inputs": {"input_ids": "input"}}  # fmt: skip
    post = {"type": "embedding", "output": "probabilities", "pooling": "none"}
    registry.add("enc", samples / "sample.onnx", preprocess=pre, postprocess=post)
    m = _manifest(registry, "enc")
    chain = build_chain(m, m.signature, {}, ModelConfig())
    assert chain is not None
    assert chain.describe()["steps"] == {
        "input": [{**pre, "padding": "longest", "truncation": True}],
        "output": [{**post, "normalize": True}],
    }
    assert not chain._run_in and not chain._run_out
    with pytest.raises(ModelError, match=r"postprocess \(embedding\): pooling: must be one of"):
        registry.add("enc2", samples / "sample.onnx", preprocess=pre,
                     postprocess={**post, "pooling": "max"})  # fmt: skip


def test_manifest_steps_round_trip_and_order(tmp_path: Path, samples: Path) -> None:
    registry = Registry(tmp_path / "store")
    steps = {"output": [{"type": "classification", "output": "probabilities", "top_k": 1,
                         "name": "best"}]}  # fmt: skip
    registry.add("s", samples / "sample.onnx", steps=steps)
    m = Registry(registry.root).active("s").manifest
    assert m.steps == steps
    assert Manifest.from_json(m.to_json(), "x") == m
    post = {"type": "classification", "output": "probabilities"}
    legacy = dataclasses.replace(m, postprocess=post)
    assert legacy.declared("output") == [
        ("postprocess", post),
        ("steps.output[0]", steps["output"][0]),
    ]
    assert legacy.declared("input") == [] and legacy.processing != m.processing
    with pytest.raises(ModelError, match=r"'steps\.input' must be a list"):
        Manifest.from_json({**m.to_json(), "steps": {"input": {}}}, "x")
