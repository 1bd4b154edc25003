"""A pipeline that takes texts and gives vectors serves /v1/embeddings (the official client's
request shape); one that takes a prompt and gives text serves /v1/completions and
/v1/chat/completions (whole, one chunk when streamed); other pipelines are refused there with
a 400 saying why, and /v1/models lists the pipelines these routes serve."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson

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
    assert "is not a text pipeline" in (await r.json())["error"]["message"]


LABELS = ["long", "vowels", "spaced", "numeric"]
TEXT = {
    "kind": "pipeline",
    "inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [-1]}],
    "nodes": [
        {"name": "features", "step": {"type": "t_embed"}, "inputs": {"text": "request.prompt"}},
        {"name": "a", "model": "double", "inputs": {"x": "features.vec"}},
        {"name": "best", "step": {"type": "argmax_label", "labels": LABELS},
         "inputs": {"logits": "a.y"}},
    ],
    "outputs": [{"name": "answer", "source": "best.label"}],
}  # fmt: skip
#: No model: a JSON prompt's field "q" is the answer.
PICK = {
    "kind": "pipeline",
    "inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [-1]}],
    "nodes": [{"name": "q", "step": {"type": "json_field", "path": "q"},
               "inputs": {"text": "request.prompt"}}],
    "outputs": [{"name": "answer", "source": "q.value"}],
}  # fmt: skip


def expected(text: str) -> str:
    return LABELS[int(np.argmax(toy_embedding(text)))]


def sse(raw: bytes) -> list[object]:
    events = [line[len(b"data: ") :] for line in raw.split(b"\n\n") if line.strip()]
    assert events[-1] == b"[DONE]"
    return [orjson.loads(e) for e in events[:-1]]


async def test_a_text_pipeline_answers_completions_and_chats(serve, tmp_path: Path):
    pipelines = {"talk": TEXT, "pick": PICK, "emb": EMBED, "chain": CHAIN}
    client = await serve(declare(tmp_path, pipelines))
    r = await client.post("/v1/completions", json={"model": "talk", "prompt": "hello world"})
    answer = await r.json()
    assert r.status == 200, answer
    assert answer["object"] == "text_completion" and answer["model"] == "talk"
    assert answer["choices"][0]["text"] == expected("hello world") == "long"
    assert answer["choices"][0]["finish_reason"] == "stop"
    assert answer["usage"]["prompt_tokens"] == 2

    # A chat: the last user message is the prompt (text parts joined).
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": '{"q": "first"}'},
        {"role": "assistant", "content": "first"},
        {"role": "user", "content": [{"type": "text", "text": '{"q": '},
                                     {"type": "text", "text": '"second"}'}]},
    ]  # fmt: skip
    r = await client.post("/v1/chat/completions", json={"model": "pick", "messages": messages})
    answer = await r.json()
    assert r.status == 200, answer
    message = answer["choices"][0]["message"]
    assert message["role"] == "assistant" and message["content"] == "second"
    assert answer["choices"][0]["finish_reason"] == "stop"

    # Streamed: the whole text as one chunk, then the end and [DONE].
    body = {"model": "pick", "messages": messages, "stream": True}
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
    chunks = sse(await r.read())
    deltas = [c["choices"][0]["delta"] for c in chunks]  # type: ignore[index]
    assert deltas == [{"role": "assistant", "content": ""}, {"content": "second"}, {}]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"  # type: ignore[index]
    body = {"model": "talk", "prompt": "aeiou aeiou", "stream": True}
    r = await client.post("/v1/completions", json=body)
    chunks = sse(await r.read())
    texts = [c["choices"][0]["text"] for c in chunks]  # type: ignore[index]
    assert texts == [expected("aeiou aeiou"), ""]

    r = await client.get("/v1/models")
    listed = {m["id"] for m in (await r.json())["data"]}
    assert {"talk", "pick", "emb"} <= listed and "chain" not in listed
    r = await client.get("/v1/models/talk")
    assert r.status == 200 and (await r.json())["id"] == "talk"


async def test_what_a_text_pipeline_refuses(serve, tmp_path: Path):
    client = await serve(declare(tmp_path, {"talk": TEXT, "chain": CHAIN}))
    cases = [
        ({"model": "chain", "prompt": "x"}, "/v1/completions", "is not a text pipeline"),
        ({"model": "talk", "messages": [{"role": "system", "content": "x"}]},
         "/v1/chat/completions", "needs a user message"),
        ({"model": "talk", "messages": [{"role": "user", "content": "x"}],
          "response_format": {"type": "json_object"}},
         "/v1/chat/completions", "response_format and tools do not apply"),
        ({"model": "talk", "input": "x"}, "/v1/embeddings", "not an embedding pipeline"),
    ]  # fmt: skip
    for body, route, message in cases:
        r = await client.post(route, json=body)
        error = (await r.json())["error"]
        assert r.status == 400, (body, error)
        assert message in error["message"], (body, error)
    r = await client.post("/v1/completions", json={"model": "talk", "prompt": "still serving"})
    assert r.status == 200
