"""Structured output and tool calling on /v1/chat/completions with the official `openai` client,
against a real server running the tiny GGUF test model (tests/conftest.py `gguf_models`).

The tiny model cannot reason: these tests check the mechanics. Every JSON answer is held to its
schema by a llama.cpp grammar and re-validated; a tool call's arguments follow its function's
parameters; stream deltas add up to the whole answer."""

from __future__ import annotations

import json
from typing import Any, Literal

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


SCHEMAS: dict[str, dict] = {
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
    cases: dict[str, dict] = {
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
        assert str(bad.value.param).startswith("response_format.json_schema.schema")
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
    with pytest.raises(openai.BadRequestError) as bad:  # a stop sequence inside the JSON
        await api.chat.completions.create(
            model="tiny", messages=ASK, response_format=json_schema(schema), max_tokens=60,
            stop=[":"],
        )  # fmt: skip
    assert bad.value.param == "stop"
    # a stream cannot take back what it sent: it ends with finish_reason "length", as OpenAI's
    stream = await api.chat.completions.create(
        model="tiny", messages=ASK, response_format=json_schema(schema), max_tokens=3, stream=True
    )
    finishes = [c.finish_reason async for chunk in stream for c in chunk.choices if c.finish_reason]
    assert finishes == ["length"]


# -- tools --------------------------------------------------------------------------------------
LOOKUP: dict = {
    "type": "function",
    "function": {
        "name": "lookup",
        "description": "Stock of a part",
        "parameters": {
            "type": "object",
            "properties": {"sku": {"enum": ["A1", "B2"]}, "qty": {"type": "integer"}},
            "required": ["sku", "qty"],
            "additionalProperties": False,
        },
    },
}
PING = {"type": "function", "function": {"name": "ping"}}
TOOLS = [LOOKUP, PING]
PARAMS: dict[str, dict] = {"lookup": LOOKUP["function"]["parameters"], "ping": {"type": "object"}}
STOCK: list[dict] = [{"role": "user", "content": "Stock of A1?"}]
#: A chat template that knows tools (Hugging Face style: `tools`, `tool_calls` with arguments
#: as objects, `role: tool`), terse enough for the tiny model's 256-token context.
TOOL_TEMPLATE = (
    "{{ bos_token }}{% if tools %}<|im_start|>system\nTools:"
    "{% for t in tools %} {{ t.function.name }}{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.tool_calls %}"
    "{% for c in m.tool_calls %}<tool_call>{{ {'name': c.function.name, "
    "'arguments': c.function.arguments} | tojson }}</tool_call>{% endfor %}"
    "{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture
async def tool_api(oai):
    _, api = await oai({"model_defaults": {"gguf": {"chat_template": TOOL_TEMPLATE}}})
    return api


def assert_calls(message, names=("lookup", "ping")) -> list[Any]:
    assert message.content is None and message.tool_calls
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), PARAMS[call.function.name])
    assert len({c.id for c in message.tool_calls}) == len(message.tool_calls)
    return list(message.tool_calls)


async def streamed(api, **kwargs) -> tuple[dict, list[str]]:
    """Tool calls rebuilt from raw deltas (checking their shape), and the finish reasons."""
    calls: dict[int, dict] = {}
    finishes = []
    async for chunk in await api.chat.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            finishes += [c.finish_reason] if c.finish_reason else []
            for d in c.delta.tool_calls or []:
                if d.index not in calls:  # the first delta of a call: id, type, name
                    assert d.id.startswith("call_") and d.type == "function"
                    assert d.function.name and d.function.arguments == ""
                    calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": ""}
                else:  # then pieces of its arguments only
                    assert d.id is None and d.function.name is None
                    calls[d.index]["arguments"] += d.function.arguments
    assert sorted(calls) == list(range(len(calls)))
    return calls, finishes


async def test_required_tool_call_streamed_and_not(tool_api):
    api = tool_api
    # one call: given the choice, the tiny model calls again and again (see the parallel test)
    ask = {"model": "tiny", "messages": STOCK, "tools": TOOLS, "max_tokens": 90,
           "parallel_tool_calls": False, **GREEDY}  # fmt: skip
    out = await api.chat.completions.create(tool_choice="required", **ask)
    assert out.choices[0].finish_reason == "tool_calls"
    calls = assert_calls(out.choices[0].message)
    rebuilt, finishes = await streamed(api, tool_choice="required", **ask)
    assert finishes == ["tool_calls"]
    assert [(c["name"], c["arguments"]) for c in rebuilt.values()] == [
        (c.function.name, c.function.arguments) for c in calls
    ]
    # the official client's stream helper assembles the same calls
    async with api.chat.completions.stream(tool_choice="required", **ask) as stream:
        final = await stream.get_final_completion()
    assert [c.function.arguments for c in final.choices[0].message.tool_calls] == [
        c.function.arguments for c in calls
    ]


async def test_named_function_and_no_parallel_calls(tool_api):
    api = tool_api
    out = await api.chat.completions.create(
        model="tiny", messages=STOCK, tools=TOOLS, max_tokens=90, parallel_tool_calls=False,
        tool_choice={"type": "function", "function": {"name": "lookup"}}, **GREEDY,
    )  # fmt: skip
    (call,) = assert_calls(out.choices[0].message, names=("lookup",))
    assert json.loads(call.function.arguments)["sku"] in ("A1", "B2")


async def test_auto_and_none(tool_api):
    api = tool_api
    out = await api.chat.completions.create(
        model="tiny", messages=STOCK, tools=TOOLS, max_tokens=60, **GREEDY
    )
    choice = out.choices[0]
    if choice.message.tool_calls:  # auto: a call or text, each well formed
        assert choice.finish_reason == "tool_calls"
        assert_calls(choice.message)
    else:
        assert choice.message.content and not choice.message.content.startswith("<")
    none = await api.chat.completions.create(
        model="tiny", messages=STOCK, tools=TOOLS, tool_choice="none", max_tokens=8, **GREEDY
    )
    assert none.choices[0].message.tool_calls is None and none.choices[0].message.content


async def test_tool_round_trip(tool_api):
    """Tools -> tool_calls -> role tool -> an answer, with the official client's types."""
    api = tool_api
    first = await api.chat.completions.create(
        model="tiny", messages=STOCK, tools=[LOOKUP], tool_choice="required", max_tokens=90,
        parallel_tool_calls=False, **GREEDY,
    )  # fmt: skip
    (call,) = assert_calls(first.choices[0].message, names=("lookup",))[:1]
    history = [
        *STOCK,
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"stock": 7}'},
    ]
    answer = await api.chat.completions.create(
        model="tiny", messages=history, tools=[LOOKUP], tool_choice="none", max_tokens=8,
        **GREEDY,
    )  # fmt: skip
    assert answer.choices[0].message.content and answer.choices[0].finish_reason in (
        "stop", "length",
    )  # fmt: skip
    # streamed, with a required call again: the history is rendered into the prompt
    calls, finishes = await streamed(
        api, model="tiny", messages=history, tools=[LOOKUP], tool_choice="required",
        max_tokens=100, parallel_tool_calls=False, **GREEDY,
    )  # fmt: skip
    assert finishes == ["tool_calls"] and calls[0]["name"] == "lookup"


async def test_parallel_calls_stream_one_index_each(tool_api):
    """Parallel calls allowed (OpenAI's default): the tiny model calls ping again and again;
    each call streams under its own index, and the answer cut by max_tokens ends "length"."""
    calls, finishes = await streamed(
        tool_api, model="tiny", messages=STOCK, tools=[PING], tool_choice="required",
        max_tokens=150, **GREEDY,
    )  # fmt: skip
    assert len(calls) >= 2 and finishes == ["length"]
    assert all(c["name"] == "ping" for c in calls.values())
    assert json.loads(calls[0]["arguments"]) == {}
    with pytest.raises(openai.BadRequestError) as bad:  # whole: refused, naming max_tokens
        await tool_api.chat.completions.create(
            model="tiny", messages=STOCK, tools=[PING], tool_choice="required", max_tokens=150,
            **GREEDY,
        )  # fmt: skip
    assert bad.value.param == "max_tokens"


class Lookup(BaseModel):
    sku: Literal["A1", "B2"]
    qty: int


async def test_pydantic_function_tool_parses(tool_api):
    api = tool_api
    out = await api.chat.completions.parse(
        model="tiny", messages=STOCK, tools=[openai.pydantic_function_tool(Lookup)],
        tool_choice="required", max_tokens=90, parallel_tool_calls=False, **GREEDY,
    )  # fmt: skip
    call = out.choices[0].message.tool_calls[0]
    assert call.function.name == "Lookup" and isinstance(call.function.parsed_arguments, Lookup)


async def test_tool_errors_name_the_field(oai):
    client, _ = await oai()
    bad_params = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"n": {"type": "number", "maximum": 3}}}}}  # fmt: skip
    for extra, param in (
        ({"tools": [bad_params]}, "tools[0].function.parameters.properties.n"),
        ({"tools": [{"type": "custom", "custom": {}}]}, "tools[0].type"),
        ({"tools": [LOOKUP, LOOKUP]}, "tools[1].function.name"),
        ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
         "tool_choice.function.name"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
        ({"messages": [{"role": "tool", "content": "7"}]}, "messages[0].tool_call_id"),
        ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
          "function": {"name": "f"}}]}]}, "messages[0].tool_calls[0].function"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"messages": [*STOCK, {"role": "assistant", "content": []}]},
         f"messages[{len(STOCK)}].content"),  # the schema's minItems: 1 (a fuzzer found it)
    ):  # fmt: skip
        body = {"model": "tiny", "messages": STOCK, "max_tokens": 4, **extra}
        r = await client.post("/v1/chat/completions", json=body)
        assert r.status == 400, (extra, await r.text())
        assert (await r.json())["error"]["param"] == param
    r = await client.post(
        "/v1/completions", json={"model": "tiny", "prompt": "x", "tools": TOOLS, "max_tokens": 2}
    )
    assert r.status == 400 and (await r.json())["error"]["param"] == "tools"


async def test_template_without_tools_gets_them_in_a_system_message(oai):
    """The tiny model's own template knows nothing of tools: the server describes them (and the
    call format) in a system message, writes earlier calls in that format and results as user
    turns; the round trip still works."""
    _, api = await oai()
    out = await api.chat.completions.create(
        model="tiny", messages=STOCK, tools=[PING], tool_choice="required", max_tokens=100,
        parallel_tool_calls=False, **GREEDY,
    )  # fmt: skip
    (call,) = assert_calls(out.choices[0].message, names=("ping",))[:1]
    assert json.loads(call.function.arguments) == {}
    history = [
        *STOCK,
        out.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "pong"},
    ]
    again = await api.chat.completions.create(
        model="tiny", messages=history, tools=[PING], tool_choice="none", max_tokens=8, **GREEDY
    )
    assert again.choices[0].message.content and not again.choices[0].message.tool_calls


async def test_in_a_worker_process_too(oai):
    """With isolation = "process" the schema and tools cross to the worker with the request:
    the grammar is applied there, the answers are the same as in-process."""
    fields = {"model": "tiny", "messages": ASK, "max_tokens": 200, **GREEDY}
    schema = SCHEMAS["enum"]
    _, api = await oai()
    local = await api.chat.completions.create(response_format=json_schema(schema), **fields)
    _, isolated = await oai({"model_defaults": {"isolation": "process"}})
    remote = await isolated.chat.completions.create(response_format=json_schema(schema), **fields)
    assert remote.choices[0].message.content == local.choices[0].message.content
    jsonschema.validate(json.loads(remote.choices[0].message.content), schema)
    call = await isolated.chat.completions.create(
        model="tiny", messages=STOCK, tools=[PING], tool_choice="required", max_tokens=100,
        parallel_tool_calls=False, **GREEDY,
    )  # fmt: skip
    assert_calls(call.choices[0].message, names=("ping",))


async def test_auto_with_a_response_format_and_the_beta_helper(tool_api):
    """tool_choice auto beside a json_schema: a call, or JSON valid against the schema; the
    client's `beta.chat.completions.parse` (an alias kept for older code) works the same."""
    schema = SCHEMAS["enum"]
    strict = {**LOOKUP, "function": {**LOOKUP["function"], "strict": True}}  # parse() wants it
    out = await tool_api.beta.chat.completions.parse(
        model="tiny", messages=ASK, tools=[strict], response_format=json_schema(schema),
        max_tokens=100, parallel_tool_calls=False, **GREEDY,
    )  # fmt: skip
    message = out.choices[0].message
    if message.tool_calls:
        assert_calls(message, names=("lookup",))
    else:
        jsonschema.validate(json.loads(message.content or ""), schema)
