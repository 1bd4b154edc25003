"""OpenAI request bodies for Hypothesis: valid ones for the routes the appliance serves (every
field it reads, some it accepts and ignores), and the checks of what comes back."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import strategies as st

from . import schemas

CHAT_MODEL = "tiny"
EMBEDDING_MODEL = "minilm"
EMBEDDING_DIMS = 384
#: Short prompts: a tiny model with a 256-token context answers them quickly (a character
#: outside its vocabulary costs up to 4 byte tokens).
TEXT = st.text(max_size=20)
#: Fields of OpenAI's schema the appliance accepts and ignores (their type is still checked).
IGNORED: dict[str, st.SearchStrategy[Any]] = {
    "user": st.text(max_size=8),
    "metadata": st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=2),
    "store": st.booleans(),
    "service_tier": st.sampled_from(["auto", "default"]),
    "safety_identifier": st.text(max_size=8),
    "prompt_cache_key": st.text(max_size=8),
}


@st.composite
def sampling(draw: st.DrawFn, chat: bool) -> dict[str, Any]:
    """Sampling fields within their published ranges; at most 4 new tokens."""
    out: dict[str, Any] = {}
    key = draw(st.sampled_from(["max_tokens", "max_completion_tokens"])) if chat else "max_tokens"
    out[key] = draw(st.integers(1, 4))
    optional: dict[str, st.SearchStrategy[Any]] = {
        "temperature": st.floats(0, 2),
        "top_p": st.floats(0, 1),
        "presence_penalty": st.floats(-2, 2),
        "frequency_penalty": st.floats(-2, 2),
        "seed": st.integers(-(2**63), 2**63 - 1),
        "stop": st.one_of(
            st.text(min_size=1, max_size=4),
            st.lists(st.text(min_size=1, max_size=4), min_size=1, max_size=4),
        ),
        "n": st.just(1),
        "top_k": st.integers(0, 100),  # llama.cpp's own, beyond OpenAI's schema
        "repeat_penalty": st.floats(0, 10),
        **IGNORED,
    }
    if chat:
        optional["response_format"] = st.just({"type": "text"})
    for name in draw(st.lists(st.sampled_from(sorted(optional)), unique=True, max_size=4)):
        out[name] = draw(optional[name])
    if draw(st.booleans()):
        out["stream"] = draw(st.booleans())
        if out["stream"] and draw(st.booleans()):
            out["stream_options"] = {"include_usage": draw(st.booleans())}
    return out


def content() -> st.SearchStrategy[Any]:
    parts = st.lists(
        st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}), min_size=1, max_size=2
    )
    return st.one_of(TEXT, parts)


@st.composite
def chat_requests(draw: st.DrawFn) -> dict[str, Any]:
    roles = st.sampled_from(["system", "developer", "user", "assistant"])
    messages = [
        {"role": draw(roles), "content": draw(content())} for _ in range(draw(st.integers(0, 2)))
    ]
    messages.append({"role": "user", "content": draw(content())})
    return {"model": CHAT_MODEL, "messages": messages, **draw(sampling(chat=True))}


@st.composite
def completion_requests(draw: st.DrawFn) -> dict[str, Any]:
    prompt = draw(st.one_of(TEXT, st.lists(TEXT, min_size=1, max_size=1)))
    body = {"model": CHAT_MODEL, "prompt": prompt, **draw(sampling(chat=False))}
    for key, value in draw(
        st.lists(st.sampled_from([("echo", False), ("best_of", 1)]), unique=True)
    ):
        body[key] = value
    return body


@st.composite
def embedding_requests(draw: st.DrawFn) -> dict[str, Any]:
    text = st.text(min_size=1, max_size=40)
    body: dict[str, Any] = {
        "model": EMBEDDING_MODEL,
        "input": draw(st.one_of(text, st.lists(text, min_size=1, max_size=3))),
    }
    if draw(st.booleans()):
        body["encoding_format"] = draw(st.sampled_from(["float", "base64"]))
    if draw(st.booleans()):
        body["dimensions"] = EMBEDDING_DIMS
    if draw(st.booleans()):
        body["user"] = draw(st.text(max_size=8))
    return body


#: route -> (request schema, response schema, stream chunk schema, valid requests)
ROUTES: dict[str, tuple[str, str, str | None, st.SearchStrategy[dict[str, Any]]]] = {
    "/v1/chat/completions": (
        "CreateChatCompletionRequest",
        "CreateChatCompletionResponse",
        "CreateChatCompletionStreamResponse",
        chat_requests(),
    ),
    "/v1/completions": (
        "CreateCompletionRequest",
        "CreateCompletionResponse",
        "CreateCompletionResponse",
        completion_requests(),
    ),
    "/v1/embeddings": (
        "CreateEmbeddingRequest",
        "CreateEmbeddingResponse",
        None,
        embedding_requests(),
    ),
}


def sse_events(payload: bytes) -> list[Any]:
    """The JSON objects of a server-sent event stream, which must end with `data: [DONE]`."""
    events = [e for e in payload.split(b"\n\n") if e.strip()]
    assert events and events[-1] == b"data: [DONE]", payload[-200:]
    out = []
    for event in events[:-1]:
        assert event.startswith(b"data: "), event
        out.append(orjson.loads(event[len(b"data: ") :]))
    return out


def check_answer(route: str, request: dict[str, Any], content_type: str, payload: bytes) -> None:
    """A 200 answer has the shape the published schema gives it (each chunk of a stream too)."""
    _, response, chunk, _ = ROUTES[route]
    doc = schemas.openai()
    if request.get("stream"):
        assert content_type.startswith("text/event-stream"), content_type
        assert chunk is not None
        for event in sse_events(payload):
            assert "error" not in event, event
            if route == "/v1/completions":
                # The schema has no chunk type for completions: OpenAI streams the response
                # type with `finish_reason` null until the last chunk.
                choices = [{**c, "finish_reason": c["finish_reason"] or "stop"}
                           for c in event["choices"]]  # fmt: skip
                event = {**event, "choices": choices}
            assert not doc.errors(chunk, event), (doc.errors(chunk, event), event)
        return
    body = orjson.loads(payload)
    if route == "/v1/embeddings" and request.get("encoding_format") == "base64":
        # the schema describes only float vectors: check the rest, then the vector's size
        vectors = [item["embedding"] for item in body["data"]]
        assert all(isinstance(v, str) and len(v) == 4 * EMBEDDING_DIMS * 4 // 3 for v in vectors)
        body = {**body, "data": [{**item, "embedding": []} for item in body["data"]]}
    errors = doc.errors(response, body)
    assert not errors, (errors, body)
