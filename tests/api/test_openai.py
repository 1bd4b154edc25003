"""OpenAI-compatible routes with the official `openai` client, on GGUF models made offline by
build/make_gguf_models.py (a tiny trained Llama and the real all-MiniLM-L6-v2 weights)."""

from __future__ import annotations

import asyncio
import base64
import math

import numpy as np
import openai
import pytest

from appliance.errors import ModelError
from appliance.registry import Registry
from appliance.server import source_from_file, sources_from_store

SAMPLE_REQUEST = {
    "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]
}


@pytest.fixture
def llm_store(store: Registry, gguf_models) -> Registry:
    store.add("tiny", gguf_models / "tiny-llama-q8_0.gguf")
    store.add("minilm", gguf_models / "minilm-q8_0.gguf")
    return store


@pytest.fixture
async def oai(serve, llm_store):
    async def start(overrides=None, token: str | None = None):
        client = await serve(overrides)
        api = openai.AsyncOpenAI(
            base_url=str(client.make_url("/v1")), api_key=token or "unused", max_retries=0
        )
        return client, api

    return start


GREEDY = {"temperature": 0, "seed": 1, "max_tokens": 24}
ASK = [{"role": "user", "content": "What is a model store?"}]


async def test_models_and_kserve_listing(oai):
    client, api = await oai()
    ids = {m.id async for m in api.models.list()}
    assert ids == {"tiny", "minilm"}
    assert (await api.models.retrieve("tiny")).id == "tiny"
    # GGUF models are KServe v2 models too
    meta = await (await client.get("/v2/models/tiny")).json()
    assert meta["platform"] == "llama_cpp_gguf"
    assert meta["inputs"] == [{"name": "text_input", "datatype": "BYTES", "shape": [1]}]
    assert (await client.get("/v2/models/minilm/ready")).status == 200
    assert (await client.get("/v2/health/ready")).status == 200


async def test_chat_streaming_and_not_agree(oai):
    _, api = await oai()
    full = await api.chat.completions.create(model="tiny", messages=ASK, **GREEDY)
    choice = full.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert full.usage.completion_tokens > 0 and full.usage.prompt_tokens > 0
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    stream = await api.chat.completions.create(
        model="tiny", messages=ASK, stream=True, stream_options={"include_usage": True}, **GREEDY
    )
    pieces, finishes, usage = [], [], None
    async for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            if c.finish_reason:
                finishes.append(c.finish_reason)
    assert "".join(pieces) == choice.message.content
    assert finishes == [choice.finish_reason]
    assert usage is not None and usage.completion_tokens == full.usage.completion_tokens


async def test_completions(oai):
    _, api = await oai()
    out = await api.completions.create(model="tiny", prompt="The appliance", **GREEDY)
    assert out.choices[0].text and out.usage.completion_tokens > 0
    text = ""
    async for chunk in await api.completions.create(
        model="tiny", prompt="The appliance", stream=True, **GREEDY
    ):
        text += chunk.choices[0].text
    assert text == out.choices[0].text


async def test_raw_stream_is_well_formed_sse(oai):
    client, _ = await oai()
    r = await client.post(
        "/v1/chat/completions", json={"model": "tiny", "messages": ASK, "stream": True, **GREEDY}
    )
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
    events = (await r.text()).split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events[:-1])


async def test_embeddings_float_and_base64(oai):
    _, api = await oai()
    texts = ["a quantized model on a gateway", "an edge device serving models", "bananas"]
    # the official client asks for base64 by default and decodes it itself
    default = await api.embeddings.create(model="minilm", input=texts)
    floats = await api.embeddings.create(model="minilm", input=texts, encoding_format="float")
    a = np.array([d.embedding for d in default.data])
    b = np.array([d.embedding for d in floats.data])
    assert a.shape == (3, 384) and np.allclose(a, b, atol=1e-6)
    assert np.allclose(np.linalg.norm(b, axis=1), 1, atol=1e-4)
    sim = b @ b.T
    assert sim[0, 1] > sim[0, 2]  # related sentences are closer than unrelated ones
    assert default.usage.prompt_tokens > 0
    single = await api.embeddings.create(model="minilm", input="bananas", encoding_format="float")
    assert math.isclose(float(np.dot(single.data[0].embedding, b[2])), 1, rel_tol=1e-4)


async def test_raw_base64_is_little_endian_float32(oai):
    client, _ = await oai()
    r = await client.post(
        "/v1/embeddings", json={"model": "minilm", "input": "x", "encoding_format": "base64"}
    )
    body = await r.json()
    vec = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), "<f4")
    assert vec.shape == (384,)


async def test_two_streams_at_once_both_complete(oai):
    _, api = await oai({"models": {"tiny": {"gguf": {"instances": 2}}}})

    async def one(question: str) -> tuple[str, list[str]]:
        stream = await api.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": question}], stream=True, **GREEDY
        )
        text, finishes = "", []
        async for chunk in stream:
            for c in chunk.choices:
                text += c.delta.content or ""
                if c.finish_reason:
                    finishes.append(c.finish_reason)
        return text, finishes

    questions = ["What is a model store?", "How are requests queued?"]
    results = await asyncio.gather(one(questions[0]), one(questions[1]))
    alone = [await one(q) for q in questions]
    for (text, finishes), (text_alone, _) in zip(results, alone, strict=True):
        assert len(finishes) == 1 and text
        assert text == text_alone  # nothing interleaved or corrupted


async def test_errors_have_openai_shape(oai):
    client, api = await oai()
    with pytest.raises(openai.NotFoundError) as nf:
        await api.chat.completions.create(model="nope", messages=ASK)
    assert nf.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        await api.chat.completions.create(model="tiny", messages=ASK, temperature=5)
    assert "temperature" in bad.value.message and bad.value.param == "temperature"
    with pytest.raises(openai.BadRequestError):
        await api.embeddings.create(model="tiny", input="x")  # a chat model cannot embed
    with pytest.raises(openai.BadRequestError):
        await api.chat.completions.create(model="minilm", messages=ASK)  # nor chat the reverse
    for body in (
        b"{not json",
        b'{"model": "tiny", "messages": []}',
        b'{"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}',
        b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "tools": [{}]}',
        b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}',
        b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "n": 2}',
    ):
        r = await client.post("/v1/chat/completions", data=body)
        err = (await r.json())["error"]
        assert r.status == 400 and err["type"] == "invalid_request_error" and err["message"]
    r = await client.post("/v1/embeddings", json={"model": "minilm", "input": [1, 2, 3]})
    assert r.status == 400
    r = await client.get("/v1/nothing")
    assert r.status == 404 and "error" in (await r.json())
    # still serving
    assert (await api.chat.completions.create(model="tiny", messages=ASK, **GREEDY)).choices


async def test_bearer_token_applies_to_v1(oai):
    client, api = await oai({"server": {"auth_token": "s3cret"}}, token="wrong")
    with pytest.raises(openai.AuthenticationError):
        await api.models.list()
    good = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="s3cret")
    assert [m.id async for m in good.models.list()]


async def test_client_leaving_mid_stream_stops_generation(serve, monkeypatch, tmp_path):
    from appliance import backends
    from appliance.engine import ModelSource
    from appliance.manifest import Manifest
    from tests.support.gated import SIGNATURE, TickingTextBackend

    monkeypatch.setitem(backends._BACKENDS, "ticking", "tests.support.gated:TickingTextBackend")
    TickingTextBackend.gate.set()
    TickingTextBackend.finished = []
    f = tmp_path / "ticking.bin"
    f.write_bytes(b"")
    manifest = Manifest("ticking", "1", "ticking", f.name, "", 0, SIGNATURE, "", "test")
    client = await serve({}, [ModelSource(manifest, f, verify=False)])
    body = {"model": "ticking", "messages": ASK, "stream": True}
    r = await client.post("/v1/chat/completions", json=body)
    await r.content.readline()  # the first event arrived: generation is under way
    r.close()  # the client goes away
    for _ in range(500):
        if TickingTextBackend.finished:
            break
        await asyncio.sleep(0.02)
    assert TickingTextBackend.finished == ["cancelled"]  # stopped long before its 1000 tokens
    text = await (await client.get("/metrics")).text()
    assert 'outcome="cancelled",version="1"} 1.0' in text


async def test_kserve_infer_on_gguf(oai):
    client, _ = await oai()
    r = await client.post(
        "/v2/models/minilm/infer",
        json={"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["a", "b"]}]},
    )
    out = (await r.json())["outputs"][0]
    assert r.status == 200 and out["shape"] == [2, 384] and out["datatype"] == "FP32"
    r = await client.post(
        "/v2/models/tiny/infer",
        json={"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1],
                          "data": ["The appliance"]}]},
    )  # fmt: skip
    assert r.status == 200 and (await r.json())["outputs"][0]["data"][0]


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data[: len(data) // 3],  # truncated
        lambda data: b"GGUF" + b"\xff" * 60,  # absurd counts
        lambda data: data[:8] + (2**40).to_bytes(8, "little") + data[16:],  # absurd tensor count
    ],
    ids=["truncated", "absurd", "tensor-count"],
)
async def test_hostile_gguf_is_refused_and_the_server_keeps_serving(
    serve, store, gguf_models, tmp_path, damage
):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(damage((gguf_models / "tiny-llama-q8_0.gguf").read_bytes()))
    with pytest.raises(ModelError, match="not a valid GGUF file"):
        store.add("bad", bad)
    assert "bad" not in store.names()
    # served directly, it fails to load alone; the other models serve
    sources = [source_from_file(bad, "bad"), *sources_from_store(store.root)]
    client = await serve({}, sources)
    r = await client.get("/v2/models/bad/ready")
    assert r.status == 503 and "not a valid GGUF file" in (await r.json())["error"]
    r = await client.post("/v2/models/sample/infer", json=SAMPLE_REQUEST)
    assert r.status == 200


async def test_file_llama_cpp_rejects_is_refused_from_a_child_process(serve, tmp_path):
    from tests.backends.test_gguf_file import gguf, kv_str, tensor

    odd = tmp_path / "odd.gguf"  # a well-formed header that is no usable model
    odd.write_bytes(gguf([kv_str("general.architecture", "llama")], [tensor("w", [4, 4])]))
    client = await serve({}, [source_from_file(odd, "odd")])
    r = await client.get("/v2/models/odd/ready")
    error = (await r.json())["error"]
    assert r.status == 503 and "llama.cpp cannot load odd.gguf" in error, error
