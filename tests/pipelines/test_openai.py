"""A pipeline that takes texts and gives vectors serves /v1/embeddings (the official client's
request shape); other pipelines are refused there with a 400 saying why."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.pipelines.conftest import declare
from tests.pipelines.test_execution import CHAIN
from tests.support.pipeline_steps import toy_embedding

EMBED = {
    "kind": "pipeline",
    "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}],
    "nodes": [
        {"name": "features", "step": {"type": "t_embed"}, "inputs": {"text": "request.text"}},
        {"name": "a", "model": "double", "inputs": {"x": "features.vec"}},
    ],
    "outputs": [{"name": "embedding", "source": "a.y"}],
}


async def test_embeddings_through_a_pipeline(serve, tmp_path: Path):
    client = await serve(declare(tmp_path, {"emb": EMBED, "chain": CHAIN}))
    texts = ["hello world", "edge 42"]
    r = await client.post("/v1/embeddings", json={"model": "emb", "input": texts})
    answer = await r.json()
    assert r.status == 200, answer
    got = np.array([d["embedding"] for d in answer["data"]], dtype=np.float32)
    np.testing.assert_allclose(got, np.array([toy_embedding(t) for t in texts]) * 2)
    assert answer["model"] == "emb"
    r = await client.post("/v1/embeddings", json={"model": "chain", "input": "x"})
    assert r.status == 400
    assert "not an embedding pipeline" in (await r.json())["error"]["message"]
    r = await client.post(
        "/v1/chat/completions",
        json={"model": "emb", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert r.status == 400
    assert "is a pipeline, not a language model" in (await r.json())["error"]["message"]
