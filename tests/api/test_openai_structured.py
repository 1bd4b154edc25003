"""Structured output and tool calling on /v1/chat/completions with the official `openai` client,
against a real server running the tiny GGUF test model (tests/conftest.py `gguf_models`).

The tiny model cannot reason: these tests check the mechanics. Every JSON answer is held to its
schema by a llama.cpp grammar and re-validated; a tool call's arguments follow its function's
parameters; stream deltas add up to the whole answer."""

from __future__ import annotations

import json
from typing import Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from appliance.registry import Registry

GREEDY = {"temperature": 0, "seed": 1}
ASK = [{"role": "user", "content": "Describe a part."}]


@pytest.fixture
def llm_store(store: Registry, gguf_models) -> Registry:
    store.add("tiny", gguf_models / "tiny-llama-q8_0.gguf")
    return store


@pytest.fixture
async def oai(serve, llm_store):
    async def start(overrides=None):
        client = await serve(overrides)
        api = openai.AsyncOpenAI(
            base_url=str(client.make_url("/v1")), api_key="unused", max_retries=0
        )
        return client, api

    return start


def json_schema(schema: dict, name: str = "answer") -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


SCHEMAS = {
    "object": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "count": {"type": "integer"},
            "ok": {"type": "boolean"},
        },
        "required": ["name", "count", "ok"],
        "additionalProperties": False,
    },
    "array": {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 4},
    "enum": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}, "size": {"const": "XL"}},
        "required": ["color", "size"],
    },
    "nested": {
        "$defs": {
            "Part": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "pattern": "^[A-Z]{2}-\\d{3}$"},
                    "made": {"type": "string", "format": "date"},
                },
                "required": ["sku", "made"],
            }
        },
        "type": "object",
        "properties": {
            "parts": {"type": "array", "items": {"$ref": "#/$defs/Part"}, "maxItems": 2},
            "note": {"anyOf": [{"type": "string", "maxLength": 8}, {"type": "null"}]},
            "id": {"type": "string", "format": "uuid"},
        },
        "required": ["parts", "note", "id"],
    },
    "optional": {
        "type": "object",
        "properties": {"a": {"type": ["integer", "null"]}, "b": {"type": "string", "maxLength": 3}},
        "required": ["a"],
    },
}


@pytest.mark.parametrize("kind", sorted(SCHEMAS))
async def test_json_schema_answers_validate(oai, kind):
    _, api = await oai()
    schema = SCHEMAS[kind]
    out = await api.chat.completions.create(
        model="tiny", messages=ASK, response_format=json_schema(schema), max_tokens=200, **GREEDY
    )
    choice = out.choices[0]
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.message.content), schema)
    # streamed: the same answer, piece by piece
    stream = await api.chat.completions.create(
        model="tiny", messages=ASK, response_format=json_schema(schema), max_tokens=200,
        stream=True, **GREEDY,
    )  # fmt: skip
    pieces, finishes = [], []
    async for chunk in stream:
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            finishes += [c.finish_reason] if c.finish_reason else []
    assert "".join(pieces) == choice.message.content and finishes == ["stop"]


async def test_json_object_is_an_object_or_refused(oai):
    """The tiny model writes one endless string in a free-form object: the answer is a JSON
    object, or (as here) refused naming max_tokens, never a 200 holding something else."""
    _, api = await oai()
    fmt = {"type": "json_object"}
    try:
        out = await api.chat.completions.create(
            model="tiny", messages=ASK, response_format=fmt, max_tokens=60, **GREEDY
        )
    except openai.BadRequestError as exc:
        assert exc.param == "max_tokens"
    else:
        assert isinstance(json.loads(out.choices[0].message.content), dict)
    stream = await api.chat.completions.create(
        model="tiny", messages=ASK, response_format=fmt, max_tokens=60, stream=True, **GREEDY
    )
    text, finish = "", None
    async for chunk in stream:
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    assert text.startswith("{") and not any(ord(ch) < 0x20 for ch in text.strip())
    if finish == "stop":
        assert isinstance(json.loads(text), dict)
    else:
        assert finish == "length"


class Part(BaseModel):
    name: str = Field(max_length=10)
    kind: Literal["bolt", "nut", "gear"]
    sizes: list[int] = Field(max_length=3)
    spare: bool | None


async def test_official_parse_with_pydantic(oai):
    _, api = await oai()
    out = await api.chat.completions.parse(
        model="tiny", messages=ASK, response_format=Part, max_tokens=200, **GREEDY
    )
    parsed = out.choices[0].message.parsed
    assert isinstance(parsed, Part) and parsed.kind in ("bolt", "nut", "gear")
    # the streaming helper parses too
    async with api.chat.completions.stream(
        model="tiny", messages=ASK, response_format=Part, max_tokens=200, **GREEDY
    ) as stream:
        final = await stream.get_final_completion()
    assert final.choices[0].message.parsed == parsed


async def test_unsupported_schema_features_are_refused_by_name(oai):
    client, api = await oai()
    cases = {
        "minimum": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 3}}},
        "format": {"type": "string", "format": "email"},
        "not": {"not": {"type": "string"}},
        "patternProperties": {"type": "object", "patternProperties": {"^a": {}}},
        "uniqueItems": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
        "(?": {"type": "string", "pattern": "^(?=a)b$"},
    }
    for keyword, schema in cases.items():
        with pytest.raises(openai.BadRequestError) as bad:
            await api.chat.completions.create(
                model="tiny", messages=ASK, response_format=json_schema(schema), max_tokens=8
            )
        assert keyword in bad.value.message, bad.value.message
        assert bad.value.param.startswith("response_format.json_schema.schema")
    bad_name = {"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}
    for fmt, param in (
        ({"type": "yaml"}, "response_format.type"),
        ({"type": "json_schema"}, "response_format.json_schema"),
        (bad_name, "response_format.json_schema.name"),
        (json_schema({"type": "nonsense"}), "response_format.json_schema.schema['type']"),
    ):
        r = await client.post(
            "/v1/chat/completions", json={"model": "tiny", "messages": ASK, "response_format": fmt}
        )
        assert r.status == 400 and (await r.json())["error"]["param"] == param
    # and the server still answers
    assert (await api.chat.completions.create(model="tiny", messages=ASK, max_tokens=4)).choices


async def test_max_tokens_before_the_json_closes(oai):
    _, api = await oai()
    schema = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}
    with pytest.raises(openai.BadRequestError) as bad:
        await api.chat.completions.create(
            model="tiny", messages=ASK, response_format=json_schema(schema), max_tokens=3
        )
    assert bad.value.param == "max_tokens" and "max_tokens" in bad.value.message
    # a stream cannot take back what it sent: it ends with finish_reason "length", as OpenAI's
    stream = await api.chat.completions.create(
        model="tiny", messages=ASK, response_format=json_schema(schema), max_tokens=3, stream=True
    )
    finishes = [c.finish_reason async for chunk in stream for c in chunk.choices if c.finish_reason]
    assert finishes == ["length"]
