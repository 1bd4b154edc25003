"""A model that decodes pictures itself (manifest image pre-processing) inside a pipeline: its
image input takes the pipeline's BYTES tensor, checked and run like the model alone."""

from __future__ import annotations

from pathlib import Path

import orjson

from appliance.registry import Registry
from appliance.server import sources_from_store
from tests.support.images import encode, picture


async def test_a_picture_through_a_model_with_image_preprocessing(
    serve, image_store: Registry, tmp_path: Path
):
    sig = image_store.active("classifier").manifest.signature
    image_input, logits = sig.inputs[0].name, sig.outputs[0].name
    doc = {
        "kind": "pipeline",
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [-1]}],
        "nodes": [{"name": "cls", "model": "classifier", "inputs": {image_input: "request.image"}}],
        "outputs": [{"name": "logits", "source": f"cls.{logits}"}],
    }
    path = tmp_path / "pic.pipeline.json"
    path.write_bytes(orjson.dumps(doc))
    client = await serve(
        {"pipelines": {"pic": {"file": str(path)}}},
        sources=sources_from_store(image_store.root),
    )
    png = encode(picture(48, 40, 3), "PNG")
    headers = {"Content-Type": "image/png"}
    direct = await client.post("/v2/models/classifier/infer", data=png, headers=headers)
    piped = await client.post("/v2/models/pic/infer", data=png, headers=headers)
    assert direct.status == 200 and piped.status == 200, await piped.text()
    want = {o["name"]: o for o in (await direct.json())["outputs"]}[logits]
    got = (await piped.json())["outputs"][0]
    assert got["shape"] == want["shape"] and got["data"] == want["data"]
