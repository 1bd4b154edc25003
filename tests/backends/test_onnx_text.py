"""The MiniLM INT8 build served over real HTTP: /v1/embeddings (the official openai client) and
KServe v2 with BYTES text, against sentence-transformers' FP32 vectors; bad input gets 400."""

from __future__ import annotations

import base64
import shutil

import numpy as np
import openai
import pytest

from appliance.server import sources_from_store

ST = {"model": "minilm"}


@pytest.fixture
async def minilm(serve, minilm_build, tmp_path):
    shutil.copytree(minilm_build.store, tmp_path / "built")

    async def start(overrides=None):
        client = await serve(overrides, sources=sources_from_store(tmp_path / "built"))
        api = openai.AsyncOpenAI(
            base_url=str(client.make_url("/v1")), api_key="unused", max_retries=0
        )
        return client, api

    return start


def _cosines(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    cos: np.ndarray = (
        (got * want).sum(axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    )
    return cos


async def test_openai_embeddings_agree_with_sentence_transformers(minilm, minilm_build):
    client, api = await minilm()
    texts = minilm_build.sentences
    result = await api.embeddings.create(input=texts, encoding_format="float", **ST)
    got = np.asarray([d.embedding for d in result.data], dtype=np.float64)
    assert [d.index for d in result.data] == list(range(len(texts)))
    assert got.shape == (len(texts), 384)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # normalized
    cos = _cosines(got, minilm_build.reference)
    assert cos.mean() >= 0.99, cos.mean()
    assert cos.min() > 0.9, (cos.min(), texts[int(cos.argmin())])
    # different sentences stay apart: a constant vector cannot pass the check above
    assert float(got[0] @ got[4]) < 0.5
    assert result.usage.prompt_tokens > 2 * len(texts)
    # base64 carries the same float32 values
    raw = await client.post(
        "/v1/embeddings", json={**ST, "input": texts[:3], "encoding_format": "base64"}
    )
    body = await raw.json()
    assert raw.status == 200, body
    decoded = np.stack(
        [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in body["data"]]
    )
    np.testing.assert_allclose(decoded, got[:3], rtol=1e-5, atol=1e-6)


async def test_kserve_v2_bytes_input(minilm, minilm_build):
    client, _ = await minilm()
    meta = await (await client.get("/v2/models/minilm")).json()
    assert meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert meta["outputs"] == [{"name": "embedding", "datatype": "FP32", "shape": [-1, 384]}]
    texts = minilm_build.sentences[:8]
    req = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts}]}
    resp = await client.post("/v2/models/minilm/infer", json=req)
    body = await resp.json()
    assert resp.status == 200, body
    (out,) = body["outputs"]
    assert out["name"] == "embedding" and out["shape"] == [len(texts), 384]
    got = np.asarray(out["data"], dtype=np.float64).reshape(len(texts), 384)
    assert _cosines(got, minilm_build.reference[:8]).mean() >= 0.99


async def test_long_text_is_truncated_to_max_length(minilm):
    _, api = await minilm()
    long = " ".join(["word"] * 2000)  # far over 256 tokens, under max_chars
    result = await api.embeddings.create(input=[long], **ST)
    assert len(result.data[0].embedding) == 384
    assert result.usage.prompt_tokens == 256  # the manifest's max_length


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"input": []}, "non-empty list of strings"),
        ({"input": [1, 2]}, "non-empty list of strings"),
        ({"input": ["ok", None]}, "non-empty list of strings"),
        ({"input": ["x" * 101]}, "input 0 has 101 characters, more than the limit of 100"),
        ({"input": [""]}, "must not be empty"),
    ],
)
async def test_openai_bad_input_is_400(minilm, payload, message):
    client, _ = await minilm({"model_defaults": {"text": {"max_chars": 100}}})
    resp = await client.post("/v1/embeddings", json={**ST, **payload})
    body = await resp.json()
    assert resp.status == 400, body
    assert message in body["error"]["message"]
    ok = await client.post("/v1/embeddings", json={**ST, "input": "still serving"})
    assert ok.status == 200


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        ({"datatype": "INT64", "shape": [2], "data": [1, 2]}, "expects datatype BYTES"),
        ({"datatype": "BYTES", "shape": [0], "data": []}, "no texts to embed"),
        ({"datatype": "BYTES", "shape": [2], "data": [1, 2]}, "'text'"),
        ({"datatype": "BYTES", "shape": [1], "data": ["x" * 101]}, "more than the limit of 100"),
        ({"datatype": "BYTES", "shape": [1, 1], "data": ["a"]}, "does not match"),
    ],
)
async def test_kserve_bad_input_is_400(minilm, tensor, message):
    client, _ = await minilm({"model_defaults": {"text": {"max_chars": 100}}})
    req = {"inputs": [{"name": "text", **tensor}]}
    resp = await client.post("/v2/models/minilm/infer", json=req)
    body = await resp.json()
    assert resp.status == 400, body
    assert message in body["error"]
    ok_req = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["ok"]}]}
    assert (await client.post("/v2/models/minilm/infer", json=ok_req)).status == 200


async def test_small_batches_give_the_same_vectors(minilm, minilm_build):
    """Batches of 3: dynamic INT8 shares activation scales within a batch, so vectors move a
    little, but stay as close to the FP32 reference."""
    _, api = await minilm({"model_defaults": {"text": {"batch_size": 3}}})
    texts = minilm_build.sentences[:10]
    small = await api.embeddings.create(input=texts, **ST)
    got = np.asarray([d.embedding for d in small.data])
    assert _cosines(got, minilm_build.reference[:10]).mean() >= 0.99


async def test_not_a_language_model(minilm):
    _, api = await minilm()
    with pytest.raises(openai.BadRequestError) as info:
        await api.chat.completions.create(
            model="minilm", messages=[{"role": "user", "content": "hi"}]
        )
    assert "not a language model" in str(info.value)


@pytest.mark.parametrize("binary", [False, True])
def test_tritonclient_bytes_against_a_server_process(minilm_build, tmp_path, binary):
    """tritonclient (its JSON and its binary BYTES encoding) against `appliance serve`."""
    import tritonclient.http as httpclient

    from tests.conftest import start_server_process, stop_server_process

    shutil.copytree(minilm_build.store, tmp_path / "built")
    server = start_server_process(["--models", str(tmp_path / "built")])
    try:
        client = httpclient.InferenceServerClient(server.url)
        texts = minilm_build.sentences[10:14]
        text = httpclient.InferInput("text", [len(texts)], "BYTES")
        text.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object), binary)
        out = httpclient.InferRequestedOutput("embedding", binary_data=binary)
        result = client.infer("minilm", [text], outputs=[out])
        got = result.as_numpy("embedding")
        client.close()
    finally:
        stop_server_process(server)
    assert got.shape == (len(texts), 384) and got.dtype == np.float32
    assert _cosines(got.astype(np.float64), minilm_build.reference[10:14]).mean() >= 0.99
