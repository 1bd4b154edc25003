"""appliance.structured without a server: which schemas are refused and why, the grammars
llama.cpp must be able to parse (checked against the real parser), and the tool-call parser fed
whole or one character at a time."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from appliance.structured import CallParser, InvalidOutput, Tool, UnsupportedSchema
from appliance.structured.schema import check_schema, grammar_for_schema, validate
from appliance.structured.tools import prompt_messages, structured_grammar

llama_cpp = pytest.importorskip("llama_cpp")

PART = {
    "$defs": {"Item": {"type": "object", "properties": {"n": {"type": "integer"}},
                       "required": ["n"]}},
    "type": "object",
    "properties": {
        "items": {"type": "array", "items": {"$ref": "#/$defs/Item"}, "maxItems": 3},
        "code": {"type": "string", "pattern": "[A-Z]{2}\\.\\d+|x"},
        "note": {"type": ["string", "null"], "maxLength": 4},
        "when": {"type": "string", "format": "date-time"},
        "kind": {"enum": ["a", 1, None]},
        "title": {"type": "string", "title": "a property called title"},
    },
    "required": ["items", "code", "note", "when", "kind", "title"],
    "additionalProperties": False,
}  # fmt: skip
OTHER_ITEM = {
    "$defs": {"Item": {"type": "object", "properties": {"s": {"type": "boolean"}},
                       "required": ["s"]}},
    "type": "object",
    "properties": {"item": {"$ref": "#/$defs/Item"}},
    "required": ["item"],
}  # fmt: skip


@pytest.fixture(scope="module")
def vocab(gguf_models: Path) -> Any:
    llm = llama_cpp.Llama(str(gguf_models / "tiny-llama-q8_0.gguf"), vocab_only=True, verbose=False)
    yield llama_cpp.llama_model_get_vocab(llm.model)
    llm.close()


def parses(vocab: Any, grammar: str) -> bool:
    sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
    if sampler:
        llama_cpp.llama_sampler_free(sampler)
    return bool(sampler)


@pytest.mark.parametrize(
    "schema",
    [PART, OTHER_ITEM, {"type": "object"}, {"type": "integer"}, {"type": "array", "items": {}},
     {"anyOf": [{"type": "string", "maxLength": 2}, {"type": "number"}]},
     {"type": "string", "pattern": "^a|b$"}, {"type": "string", "pattern": "^[^^\\]]\\/$"},
     {"$defs": {"Node": {"type": "object", "properties": {"kids": {"type": "array",
      "items": {"$ref": "#/$defs/Node"}, "maxItems": 2}}, "required": ["kids"]}},
      "$ref": "#/$defs/Node"}],
)  # fmt: skip
def test_grammars_parse_in_llama_cpp(vocab, schema):
    check_schema(schema, "s")
    assert parses(vocab, grammar_for_schema(schema))


def test_tool_grammars_parse_and_keep_definitions_apart(vocab):
    tools = [Tool("part", "", PART), Tool("other", "", OTHER_ITEM), Tool("none", "", {})]
    for choice, only, parallel, schema in itertools.product(
        ("auto", "required", "none"), (None, "other"), (True, False), (None, PART)
    ):
        grammar = structured_grammar(schema, tools, choice, only, parallel)  # type: ignore[arg-type]
        if grammar is None:
            assert choice == "none" and schema is None
            continue
        assert parses(vocab, grammar), (choice, only, parallel)
    grammar = structured_grammar(None, tools)
    assert grammar is not None
    rules = dict(line.split(" ::= ", 1) for line in grammar.splitlines())
    assert '"\\"n\\""' in rules["fn0-Item-n-kv"] and '"\\"s\\""' in rules["fn1-Item-s-kv"]


def test_strings_never_hold_raw_control_characters():
    grammar = grammar_for_schema({"type": "string"})
    assert "\\x00-\\x1F" in grammar  # the converter's own string rule lets a newline through


@pytest.mark.parametrize(
    ("schema", "named"),
    [
        ({"type": "integer", "minimum": 0}, "minimum"),
        ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, "oneOf"),
        ({"type": "number", "multipleOf": 2}, "multipleOf"),
        ({"type": "string", "format": "email"}, "email"),
        ({"properties": {"a": {"not": {}}}}, "properties.a: unsupported keyword not"),
        ({"type": "array", "items": {}, "uniqueItems": True}, "uniqueItems"),
        ({"type": "array", "minItems": 2}, "minItems/maxItems need items"),
        ({"type": "object", "required": ["a"]}, "a, not declared"),
        ({"allOf": [{"type": "string"}, {"maxLength": 2}]}, "allOf of one"),
        ({"$ref": "http://example.com/s.json"}, "local references"),
        ({"type": "string", "pattern": "a", "maxLength": 3}, "pattern with maxLength"),
        ({"type": "string", "pattern": "(?<=a)b"}, "(?"),
        ({"type": "string", "pattern": "a\\bc"}, "\\b"),
        ({"type": "string", "pattern": "^a$|^b$"}, "anchors"),
        ({"type": "string", "pattern": "a+?"}, "lazy"),
        ({"if": {}, "then": {}}, "if, then"),
        ({"type": "strin"}, "not a valid JSON Schema"),
        ([1], "must be a JSON Schema object"),
    ],
)  # fmt: skip
def test_unsupported_is_refused_by_name(schema, named):
    with pytest.raises(UnsupportedSchema) as exc:
        check_schema(schema, "response_format.json_schema.schema")
    assert named in exc.value.message and exc.value.message.startswith("response_format")


def test_deep_schemas_are_refused_not_overflowed():
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(40):
        schema = {"type": "array", "items": schema}
    with pytest.raises(UnsupportedSchema, match="deeper"):
        check_schema(schema, "s")


def test_validation_names_the_violation():
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    assert validate(schema, '{"n": 2}', "rf") == {"n": 2}
    with pytest.raises(InvalidOutput, match="'n'"):
        validate(schema, '{"n": "2"}', "rf")
    with pytest.raises(InvalidOutput, match="not valid JSON"):
        validate(schema, '{"n": 2', "rf")
    with pytest.raises(InvalidOutput, match=r"format|date"):
        validate({"type": "string", "format": "date"}, '"2026-13-45"', "rf")


CALLS = (
    '<tool_call>\n{ "name" : "lookup", "arguments" : { "sku" : "A}\\"1", "n" : [1, {"x": 2}] } }'
    '\n</tool_call>\n<tool_call>\n{"name": "ping", "arguments": {}}\n</tool_call>'
)


@pytest.mark.parametrize("size", [1, 2, 7, len(CALLS)])
def test_call_parser_piece_by_piece(size):
    ids = (f"call_{i}" for i in itertools.count())
    parser = CallParser(True, lambda: next(ids))
    events = []
    for i in range(0, len(CALLS), size):
        events += parser.feed(CALLS[i : i + size])
    assert parser.complete
    assert [(c.id, c.name) for c in parser.calls] == [("call_0", "lookup"), ("call_1", "ping")]
    assert json.loads(parser.calls[0].arguments) == {"sku": 'A}"1', "n": [1, {"x": 2}]}
    assert parser.calls[1].arguments == "{}"
    starts = [e for e in events if e.kind == "call"]
    assert [e.index for e in starts] == [0, 1]
    for index, call in enumerate(parser.calls):  # the pieces add up to the arguments
        pieces = [e.text for e in events if e.kind == "arguments" and e.index == index]
        assert "".join(pieces) == call.arguments
    parser.check([Tool("lookup", "", {"type": "object"}), Tool("ping", "", {"type": "object"})])
    with pytest.raises(InvalidOutput, match="unknown function"):
        parser.check([Tool("lookup", "", {"type": "object"})])


def test_call_parser_auto_text_and_cut_calls():
    text = CallParser(False, lambda: "id")
    assert [e.text for e in text.feed("Hello <tool_call>")] == ["Hello <tool_call>"]
    assert text.complete and not text.calls
    cut = CallParser(False, lambda: "id")
    cut.feed(CALLS[:60])
    assert not cut.complete and cut.calls[0].name == "lookup"
    assert not CallParser(True, lambda: "id").complete  # required, and nothing came


def test_prompt_without_tool_support_in_the_template():
    history: list[dict[str, Any]] = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Stock?"},
        {"role": "assistant", "content": "",
         "tool_calls": [{"id": "c1", "type": "function",
                         "function": {"name": "lookup", "arguments": '{"sku": "A1"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "7"},
    ]  # fmt: skip
    tool = Tool("lookup", "Stock of a part", {"type": "object"})
    messages, tools = prompt_messages(history, [tool], knows_tools=False)
    assert tools is None and [m["role"] for m in messages] == [
        "system",
        "user",
        "assistant",
        "user",
    ]
    assert (
        messages[0]["content"].startswith("Be brief.")
        and '"name":"lookup"' in messages[0]["content"]
    )
    assert json.loads(messages[2]["content"].split("\n")[1]) == {
        "name": "lookup",
        "arguments": {"sku": "A1"},
    }
    assert messages[3]["content"] == "<tool_response>\n7\n</tool_response>"
    # a template that knows tools gets them the Hugging Face way
    messages, tools = prompt_messages(history, [tool], knows_tools=True)
    assert tools == [tool.as_template()]
    assert messages[2]["tool_calls"][0]["function"]["arguments"] == {"sku": "A1"}
