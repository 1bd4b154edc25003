"""A model's chain of steps (appliance/steps/chain.py) on a real server with a real image
classifier: the `steps` manifest key, outputs a client names, refusal, metrics, metadata."""

from __future__ import annotations

import base64
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from appliance.engine.engine import ModelSource
from appliance.errors import ModelError
from appliance.registry import Registry
from appliance.server import sources_from_store
from tests.api.test_images import answer, expected, pictures
from tests.conftest import ClientFactory
from tests.support.images import CLASSIFIER_POST, CLASSIFIER_PRE, LABELS, litert

INFER = "/v2/models/clf/infer"
STEPS = {
    "input": [{**CLASSIFIER_PRE, "name": "decode"}],
    "output": [CLASSIFIER_POST],
}


@pytest.fixture
def steps_store(tmp_path: Path, tflite_models: Path) -> Registry:
    """The image classifier declared with the `steps` key only (no preprocess/postprocess)."""
    registry = Registry(tmp_path / "steps-store")
    registry.add("clf", tflite_models / "tfl_classifier.tflite", steps=STEPS)
    registry.add("plain", tflite_models / "tfl_float.tflite")
    return registry


@pytest.fixture
async def client(serve: ClientFactory, steps_store: Registry) -> Any:
    return await serve(sources=sources_from_store(steps_store.root))


def v2_image(data: bytes, outputs: list[str] | None = None, **params: Any) -> bytes:
    body: dict[str, Any] = {
        "inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [1],
             "data": [base64.b64encode(data).decode()]}
        ],
        "parameters": params,
    }  # fmt: skip
    if outputs is not None:
        body["outputs"] = [{"name": n} for n in outputs]
    return orjson.dumps(body)


def logits_of(tflite_models: Path, data: bytes) -> Any:
    from tests.support.images import by_hand

    (logits,) = litert(
        tflite_models / "tfl_classifier.tflite", [by_hand(data, CLASSIFIER_PRE)[None]]
    )
    return logits


async def test_the_steps_key_answers_like_the_legacy_declarations(
    client: Any, tflite_models: Path
) -> None:
    for ctype, data in pictures():
        r = await client.post(f"{INFER}?top_k=3", data=data, headers={"Content-Type": ctype})
        assert r.status == 200, await r.text()
        names, scores, outs = answer(await r.json())
        want_names, want_scores = expected(tflite_models, [data], 3)
        assert names == want_names
        np.testing.assert_allclose(scores, want_scores, rtol=1e-5)
        assert set(outs) == {"logits", "top_k_indices", "top_k_scores", "top_k_labels"}


async def test_named_outputs_ask_the_model_for_what_the_steps_read(
    client: Any, tflite_models: Path
) -> None:
    _, data = pictures()[0]
    logits = logits_of(tflite_models, data)
    order = np.argsort(-logits, axis=-1, kind="stable")[:, :2]
    # a step's output alone: the logits it read are computed, not returned
    r = await client.post(INFER, data=v2_image(data, ["top_k_indices"], top_k=2))
    assert r.status == 200, await r.text()
    outs = (await r.json())["outputs"]
    assert [o["name"] for o in outs] == ["top_k_indices"]
    assert outs[0]["shape"] == [1, 2] and outs[0]["data"] == order.ravel().tolist()
    # the model's own output and a step's, in the order named
    r = await client.post(INFER, data=v2_image(data, ["top_k_labels", "logits"], top_k=2))
    outs = (await r.json())["outputs"]
    assert [o["name"] for o in outs] == ["top_k_labels", "logits"]
    assert outs[0]["data"] == [LABELS[i] for i in order[0]]
    np.testing.assert_allclose(outs[1]["data"], logits.ravel(), rtol=1e-5)
    # only the model's output named: no classification answer comes back, even with top_k
    r = await client.post(INFER, data=v2_image(data, ["logits"], top_k=2))
    assert [o["name"] for o in (await r.json())["outputs"]] == ["logits"]


@pytest.mark.parametrize(
    ("outputs", "params", "message"),
    [
        (["top_k_labels"], {}, "outputs top_k_labels need the parameter top_k"),
        (["nope"], {"top_k": 1}, "unknown output 'nope'; the model's outputs are 'logits' and "
                                 "its steps add 'top_k_indices', 'top_k_labels', 'top_k_scores'"),
        (["top_k_scores"], {"top_k": 11}, "top_k 11 is more than the model's 10 classes"),
    ],
)  # fmt: skip
async def test_bad_named_outputs_are_400_naming_them(
    client: Any, outputs: list[str], params: dict[str, Any], message: str
) -> None:
    _, data = pictures()[0]
    r = await client.post(INFER, data=v2_image(data, outputs, **params))
    assert r.status == 400
    assert message in (await r.json())["error"]
    # a failed request leaves nothing behind: the same request, fixed, is answered
    r = await client.post(INFER, data=v2_image(data, outputs[:1] if outputs != ["nope"] else
                                               ["logits"], top_k=2))  # fmt: skip
    assert r.status == 200, await r.text()


async def test_each_step_is_timed_under_its_name_or_type(client: Any) -> None:
    _, data = pictures()[0]
    for query in ("?top_k=1", "", "?top_k=2"):
        r = await client.post(INFER + query, data=data, headers={"Content-Type": "image/jpeg"})
        assert r.status == 200
    # a plain model has no steps, so no step series
    body = orjson.dumps(
        {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 4], "data": [0.0] * 4}]}
    )
    assert (await client.post("/v2/models/plain/infer", data=body)).status == 200
    text = await (await client.get("/metrics")).text()
    assert 'appliance_step_seconds_count{model="clf",step="decode"} 3.0' in text
    assert 'appliance_step_seconds_count{model="clf",step="classification"} 3.0' in text
    assert 'model="plain",step=' not in text


async def test_metadata_lists_the_steps_and_their_parameters(client: Any) -> None:
    params = (await (await client.get("/v2/models/clf")).json())["parameters"]
    steps = params["steps"]
    assert [s["type"] for s in steps["input"]] == ["image"]
    assert steps["input"][0]["name"] == "decode"
    assert steps["input"][0]["size"] == [32, 32]
    assert steps["output"][0]["labels"] == list(LABELS)
    assert set(steps["output"][0]["parameters"]) == {"top_k", "softmax"}
    # what older clients read is still there
    assert params["preprocess"]["resize"] == "shorter_side"
    assert params["postprocess"]["softmax"] is True
    plain = (await (await client.get("/v2/models/plain")).json())["parameters"]
    assert "steps" not in plain and "preprocess" not in plain


@pytest.mark.parametrize(
    ("steps", "reason"),
    [
        ({"output": [{"type": "nope"}]},
         "model 'clf' version 1: steps.output[0] (nope): unknown step type 'nope' (known: "),
        ({"output": [{"type": "classification", "top_k": 0}]},
         "model 'clf' version 1: steps.output[0].top_k = 0: must be a positive integer"),
        ({"input": [{"type": "image", "size": [8, 8]}]},
         "steps.input[0].size = [8, 8]: does not match input 'image'"),
        ({"output": [{"type": "classification", "colour": "red"}]},
         "steps.output[0] has unknown keys colour"),
        ({"output": [{"type": "classification", "name": "9lives"}]},
         "steps.output[0] (classification): name: '9lives' is not a step name"),
        ({"input": [{"type": "text", "tokenizer": "t.json", "max_length": 1,
                     "inputs": {"input_ids": "image"}}]},
         "steps.input[0] (text): max_length: must be an integer of at least 2, got 1"),
    ],
)  # fmt: skip
async def test_a_wrong_declaration_is_refused_at_load_by_step_and_key(
    serve: ClientFactory, steps_store: Registry, steps: dict[str, Any], reason: str
) -> None:
    """Written past `models add` (a hand-edited or older store): the model is not ready, the
    reason names the step and key, and the other models serve."""
    mv = steps_store.active("clf")
    bad = dataclasses.replace(mv.manifest, steps=steps)
    plain = steps_store.active("plain")
    client = await serve(
        sources=[ModelSource(bad, mv.file), ModelSource(plain.manifest, plain.file)]
    )
    params = (await (await client.get("/v2/models/clf")).json())["parameters"]
    assert params["status"] == "failed"
    assert reason in params["reason"]
    r = await client.post(INFER, data=pictures()[0][1], headers={"Content-Type": "image/jpeg"})
    assert r.status == 503 and reason in (await r.json())["error"]
    r = await client.post(INFER, data=v2_image(pictures()[0][1]))
    assert r.status == 503 and reason in (await r.json())["error"]
    meta = (await (await client.get("/v2/models/plain")).json())["parameters"]
    assert meta["status"] == "ready"


def test_a_wrong_declaration_is_refused_at_add_and_nothing_is_kept(
    tmp_path: Path, tflite_models: Path
) -> None:
    registry = Registry(tmp_path / "store")
    model = tflite_models / "tfl_classifier.tflite"
    cases: list[tuple[dict[str, Any], str]] = [
        ({"output": [{"type": "nope"}]}, "steps.output[0] (nope): unknown step type 'nope'"),
        ({"inputs": []}, "'steps' has unknown key 'inputs' (known: input, output)"),
        ({"output": [{"top_k": 1}]}, "'steps.output[0]' must be an object with a string 'type'"),
        ({"input": [{"type": "embedding", "output": "x", "pool": "max"}]},
         "steps.input[0] (embedding): pool: unknown key"),
    ]  # fmt: skip
    for steps, message in cases:
        with pytest.raises(ModelError) as err:
            registry.add("clf", model, steps=steps)
        assert message in err.value.message
        assert registry.names() == []
        assert not (registry.root / "clf").exists()


def test_cli_models_add_steps(tmp_path: Path, tflite_models: Path) -> None:
    from tests.test_cli import appliance

    store = str(tmp_path / "store")
    model = str(tflite_models / "tfl_classifier.tflite")
    steps_file = tmp_path / "steps.json"
    steps_file.write_text(orjson.dumps(STEPS).decode())
    out = appliance("models", "add", "clf", model, "--models", store, "--steps", str(steps_file))
    assert out.returncode == 0, out.stderr
    assert Registry(Path(store)).active("clf").manifest.steps == STEPS
    bad = appliance("models", "add", "other", model, "--models", store, "--steps",
                    '{"output": [{"type": "classification", "softmax": "yes"}]}')  # fmt: skip
    assert bad.returncode == 1
    assert "steps.output[0].softmax = 'yes': must be true or false" in bad.stderr
    assert Registry(Path(store)).names() == ["clf"]
