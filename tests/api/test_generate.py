"""The OIP generate extension (/generate, /generate_stream) on the tiny GGUF language model made
offline by build/make_gguf_models.py, through a real server; the answers are checked against
the published schema (tests/schemas/generate_rest.yaml) and against /v1/completions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest
import yaml

from appliance.registry import Registry

SCHEMAS = yaml.safe_load(
    (Path(__file__).parent.parent / "schemas" / "generate_rest.yaml").read_text()
)
COMPONENTS = SCHEMAS["components"]["schemas"]
GREEDY = {"temperature": 0, "seed": 1, "max_tokens": 16}
PROMPT = "The appliance"


def check_schema(obj: Any, name: str) -> None:
    jsonschema.validate(obj, COMPONENTS[name])


@pytest.fixture
def llm_store(store: Registry, gguf_models: Path) -> Registry:
    store.add("tiny", gguf_models / "tiny-llama-q8_0.gguf")
    return store


@pytest.fixture
async def client(serve, llm_store):
    return await serve()


def events(text: str) -> list[dict[str, Any]]:
    chunks = text.split("\n\n")
    assert chunks[-1] == ""
    assert all(c.startswith("data: ") for c in chunks[:-1])
    return [orjson.loads(c[len("data: ") :]) for c in chunks[:-1]]


async def test_generate_matches_completions(client):
    r = await client.post(
        "/v2/models/tiny/generate", json={"text_input": PROMPT, "parameters": GREEDY}
    )
    assert r.status == 200, await r.text()
    out = await r.json()
    check_schema(out, "GenerateResponse")
    assert out["model_name"] == "tiny" and out["model_version"] == "1"
    assert out["text_output"] and out["finish_reason"] in ("stop", "length")
    assert out["usage"]["completion_tokens"] > 0
    oai = await (
        await client.post("/v1/completions", json={"model": "tiny", "prompt": PROMPT, **GREEDY})
    ).json()
    assert out["text_output"] == oai["choices"][0]["text"]
    # Triton's convention: fields beside text_input are parameters too; a version in the URL
    flat = {"text_input": PROMPT, **GREEDY}
    r = await client.post("/v2/models/tiny/versions/1/generate", json=flat)
    assert (await r.json())["text_output"] == out["text_output"]
    meta = await (await client.get("/v2")).json()
    assert "generate" in meta["extensions"]


async def test_generate_stream_pieces_add_up(client):
    full = await (
        await client.post(
            "/v2/models/tiny/generate", json={"text_input": PROMPT, "parameters": GREEDY}
        )
    ).json()
    r = await client.post(
        "/v2/models/tiny/generate_stream", json={"text_input": PROMPT, "parameters": GREEDY}
    )
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
    got = events(await r.text())
    for e in got:
        check_schema(e, "GenerateStreamResponse")
        assert e["model_name"] == "tiny" and e["model_version"] == "1"
    assert [e["done"] for e in got] == [False] * (len(got) - 1) + [True]
    assert "".join(e["text_output"] for e in got) == full["text_output"]
    assert got[-1]["finish_reason"] == full["finish_reason"]


async def test_stop_and_max_tokens(client):
    short = await (
        await client.post(
            "/v2/models/tiny/generate",
            json={"text_input": PROMPT, "parameters": {**GREEDY, "max_tokens": 2}},
        )
    ).json()
    assert short["usage"]["completion_tokens"] <= 2 and short["finish_reason"] == "length"
    full = await (
        await client.post(
            "/v2/models/tiny/generate", json={"text_input": PROMPT, "parameters": GREEDY}
        )
    ).json()
    text = full["text_output"]
    stop = text.strip()[:2] if len(text.strip()) >= 2 else None
    if stop:
        cut = await (
            await client.post(
                "/v2/models/tiny/generate",
                json={"text_input": PROMPT, "parameters": {**GREEDY, "stop": [stop]}},
            )
        ).json()
        assert stop not in cut["text_output"] and text.startswith(cut["text_output"])


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "text_input"),
        ({"text_input": 5}, "text_input"),
        ({"text_input": "x", "parameters": []}, "parameters"),
        ({"text_input": "x", "parameters": {"temperature": "hot"}}, "parameters.temperature"),
        ({"text_input": "x", "parameters": {"temperature": 3}}, "parameters.temperature"),
        ({"text_input": "x", "parameters": {"max_tokens": 0}}, "parameters.max_tokens"),
        ({"text_input": "x", "parameters": {"max_tokens": 1.5}}, "parameters.max_tokens"),
        ({"text_input": "x", "parameters": {"top_p": 2}}, "parameters.top_p"),
        ({"text_input": "x", "parameters": {"stop": ["a"] * 6}}, "parameters.stop"),
        ({"text_input": "x", "parameters": {"stop": [1]}}, "parameters.stop"),
        ({"text_input": "x", "parameters": {"stop": "a"}}, "parameters.stop"),
        ({"text_input": "x", "parameters": {"max_tokens": 513}}, "parameters.max_tokens"),
        ({"text_input": "x", "parameters": {"frequency_penalty": -1}}, "parameters.frequency_"),
        ({"text_input": "x", "parameters": {"stream": "yes"}}, "parameters.stream"),
        ({"text_input": "x", "parameters": {"best_of": 3}}, "parameters.best_of"),
        ({"text_input": "x", "parameters": {"custom": {"a": 1}}}, "parameters.custom"),
        ({"text_input": "x", "extra": [1]}, "extra"),
    ],
)
async def test_bad_requests_name_the_field(client, body, field):
    for route in ("generate", "generate_stream"):
        r = await client.post(f"/v2/models/tiny/{route}", json=body)
        assert r.status == 400, (route, body, await r.text())
        assert r.headers["Content-Type"].startswith("application/json")
        err = await r.json()
        check_schema(err, "GenerateErrorResponse")
        assert field in err["error"]


async def test_not_json_unknown_model_and_version(client):
    r = await client.post("/v2/models/tiny/generate", data=b"{nope")
    assert r.status == 400 and "JSON" in (await r.json())["error"]
    r = await client.post("/v2/models/tiny/generate", data=b"[1]")
    assert r.status == 400
    r = await client.post("/v2/models/nope/generate", json={"text_input": "x"})
    assert r.status == 404
    r = await client.post("/v2/models/tiny/versions/7/generate", json={"text_input": "x"})
    assert r.status == 404 and "version" in (await r.json())["error"]
    # a tensor model that takes no text
    r = await client.post("/v2/models/sample/generate", json={"text_input": "x"})
    assert r.status == 400 and "BYTES" in (await r.json())["error"]
    # still serving
    r = await client.post(
        "/v2/models/tiny/generate", json={"text_input": PROMPT, "parameters": GREEDY}
    )
    assert r.status == 200


async def test_error_after_the_stream_started_is_an_event(serve, llm_store):
    """An output guard that refuses the finished text: the stream has said 200 already, so the
    refusal is its last event, `{"error", "status"}` (no `done: true` event)."""
    client = await serve({"guards": {"output": {"must_parse": "json", "action": "reject"}}})
    r = await client.post(
        "/v2/models/tiny/generate_stream", json={"text_input": PROMPT, "parameters": GREEDY}
    )
    assert r.status == 200
    got = events(await r.text())
    assert "error" in got[-1] and got[-1]["status"] >= 400, got
    check_schema(got[-1], "GenerateErrorResponse")
    assert not any(e.get("done") for e in got)


async def test_guards_mask_streamed_text(serve, llm_store):
    """The same masking as the OpenAI routes (appliance/guards): a PII rule that matches the
    model's words masks them in /generate and in every streamed piece."""
    client = await serve()
    full = await (
        await client.post(
            "/v2/models/tiny/generate", json={"text_input": PROMPT, "parameters": GREEDY}
        )
    ).json()
    word = next(w for w in full["text_output"].split() if w.isalpha() and len(w) > 2)
    pii = {"entities": ["word"], "custom": [{"name": "word", "regex": word}]}
    guarded = await serve({"guards": {"pii": pii}})
    out = await (
        await guarded.post(
            "/v2/models/tiny/generate", json={"text_input": PROMPT, "parameters": GREEDY}
        )
    ).json()
    assert word not in out["text_output"]
    r = await guarded.post(
        "/v2/models/tiny/generate_stream", json={"text_input": PROMPT, "parameters": GREEDY}
    )
    streamed = "".join(e.get("text_output", "") for e in events(await r.text()))
    assert word not in streamed and streamed == out["text_output"]


async def test_a_text_in_text_out_tensor_model_generates_too(client):
    """`strings` (ONNX, BYTES in, BYTES out: it echoes) through the generate routes."""
    text = "ünïcode, 汉字 and more"
    r = await client.post("/v2/models/strings/generate", json={"text_input": text})
    assert r.status == 200, await r.text()
    out = await r.json()
    check_schema(out, "GenerateResponse")
    assert out == {"model_name": "strings", "model_version": "1", "text_output": text}
    assert r.headers["X-Model-Name"] == "strings"
    r = await client.post(
        "/v2/models/strings/versions/1/generate_stream", json={"text_input": text}
    )
    got = events(await r.text())
    assert [e["done"] for e in got] == [False, True]
    assert "".join(e["text_output"] for e in got) == text
    r = await client.post(
        "/v2/models/strings/generate", json={"text_input": text, "parameters": {"top_p": 7}}
    )
    assert r.status == 400 and "parameters.top_p" in (await r.json())["error"]


async def test_an_embedding_model_generates_nothing(serve, llm_store, gguf_models):
    llm_store.add("minilm", gguf_models / "minilm-q8_0.gguf")
    client = await serve()
    r = await client.post("/v2/models/minilm/generate", json={"text_input": "x"})
    assert r.status == 400 and "embedding" in (await r.json())["error"]
