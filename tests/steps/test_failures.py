"""Steps that fail: a step's own bug is a 500 naming it while the server goes on; a chain whose
tensors do not connect is refused when the model is added."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from appliance.errors import ModelError
from appliance.registry import Registry
from tests.conftest import ClientFactory

BODY = orjson.dumps(
    {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
)


async def test_a_failing_step_is_a_500_naming_it_and_the_server_goes_on(
    test_steps: None, serve: ClientFactory, store: Registry, tflite_models: Path
) -> None:
    model = tflite_models / "tfl_float.tflite"
    store.add("m", model, steps={"output": [{"type": "boom", "name": "broken"}]})
    client = await serve()
    r = await client.post("/v2/models/m/infer", data=BODY)
    assert r.status == 500
    assert (await r.json())["error"] == (
        "model 'm' version 1: steps.output[0] (boom): step 'boom' failed: "
        "ZeroDivisionError: the step's own bug"
    )
    # the step runs only for what it writes: the model's own outputs are still served
    r = await client.post(
        "/v2/models/m/infer",
        data=orjson.dumps({**orjson.loads(BODY), "outputs": [{"name": "scores"}]}),
    )
    assert r.status == 200, await r.text()
    text = await (await client.get("/metrics")).text()
    assert 'appliance_step_seconds_count{model="m",step="broken"} 1.0' in text


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ({"output": [{"type": "gate", "tensor": "nope"}]},
         "steps.output[0] (gate): reads 'nope', which is neither a model output (logits, "
         "scores) nor written by an earlier step"),
        ({"input": [{"type": "gate", "tensor": "nope"}]},
         "steps.input[0] (gate): writes 'nope', which is not a model input (features) nor "
         "read by a later input step"),
    ],
)  # fmt: skip
def test_steps_whose_tensors_do_not_connect_are_refused(
    test_steps: None, tmp_path: Path, tflite_models: Path, steps: dict[str, Any], message: str
) -> None:
    registry = Registry(tmp_path / "store")
    with pytest.raises(ModelError) as err:
        registry.add("m", tflite_models / "tfl_float.tflite", steps=steps)
    assert message in err.value.message
    # a later output step may read what an earlier one writes
    ok = {"output": [{"type": "boom"}, {"type": "gate", "tensor": "boom"}]}
    registry.add("m", tflite_models / "tfl_float.tflite", steps=ok)
