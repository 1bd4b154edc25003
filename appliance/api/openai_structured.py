"""OpenAI's structured-output fields on /v1/chat/completions: `response_format` (json_object,
json_schema), `tools`, `tool_choice`, `parallel_tool_calls`, assistant `tool_calls` and
`role: tool` messages; and the answer's shape (`tool_calls`, `finish_reason: "tool_calls"`,
streamed `tool_calls[index].function.arguments` pieces).

The grammar and the parsing live in appliance.structured; this is the wire format only.

An answer is never returned as structured unless it validates: a JSON answer against its schema,
each call's arguments against its function's parameters. An answer the model could not finish
within `max_tokens` is refused with a 400 naming `max_tokens` (not a 200 with half a JSON
document); in a stream, whose pieces are already out, it ends with `finish_reason: "length"` as
OpenAI's does (the official client's `parse()` and stream helpers raise
LengthFinishReasonError on it).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import ApplianceError, InvalidInput
from ..llm import GenerationResult
from ..structured import ANY_JSON_OBJECT, CallParser, InvalidOutput, JsonSpec, Tool, json_spec
from ..structured.schema import UnsupportedSchema
from ..structured.tools import Event, ToolChoice

#: OpenAI's limit on the number of tools in one request.
MAX_TOOLS = 128
_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}


class BadField(InvalidInput):
    """A 400 whose OpenAI error names the field (`param`)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"'{param}': {message}")
        self.param = param


def _name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise BadField(where, "must be 1 to 64 letters, digits, underscores or dashes")
    return value


def _schema(value: Any, where: str) -> JsonSpec:
    try:
        return json_spec(value, where)
    except UnsupportedSchema as exc:
        raise BadField(exc.path, exc.detail) from None


# -- the request ------------------------------------------------------------------------------
def response_format(body: dict[str, Any]) -> JsonSpec | None:
    fmt = body.get("response_format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise BadField("response_format", "must be an object")
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return JsonSpec(ANY_JSON_OBJECT)
    if kind != "json_schema":
        raise BadField("response_format.type", "must be text, json_object or json_schema")
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict):
        raise BadField("response_format.json_schema", "must be an object")
    _name(spec.get("name"), "response_format.json_schema.name")
    if not isinstance(spec.get("description", ""), str):
        raise BadField("response_format.json_schema.description", "must be a string")
    if spec.get("strict") not in (None, True, False):
        raise BadField("response_format.json_schema.strict", "must be true or false")
    if spec.get("schema") is None:
        return JsonSpec(ANY_JSON_OBJECT)
    return _schema(spec["schema"], "response_format.json_schema.schema")


def tools(body: dict[str, Any]) -> list[Tool]:
    raw = body.get("tools")
    if raw is None:
        return []
    if not isinstance(raw, list) or len(raw) > MAX_TOOLS:
        raise BadField("tools", f"must be a list of at most {MAX_TOOLS} tools")
    out: list[Tool] = []
    for i, tool in enumerate(raw):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise BadField(f"{where}.type", "only function tools are supported")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise BadField(f"{where}.function", "must be an object")
        name = _name(fn.get("name"), f"{where}.function.name")
        if any(t.name == name for t in out):
            raise BadField(f"{where}.function.name", f"{name!r} is declared twice")
        description = fn.get("description", "")
        if not isinstance(description, str):
            raise BadField(f"{where}.function.description", "must be a string")
        if fn.get("strict") not in (None, True, False):
            raise BadField(f"{where}.function.strict", "must be true or false")
        params = fn.get("parameters")
        if params is None:
            params = _NO_PARAMETERS
        where_params = f"{where}.function.parameters"
        if not isinstance(params, dict) or params.get("type", "object") != "object":
            raise BadField(where_params, "must be a JSON Schema of type object")
        _schema(params, where_params)
        out.append(Tool(name, description, params))
    return out


def tool_choice(body: dict[str, Any], declared: list[Tool]) -> tuple[ToolChoice, str | None]:
    raw = body.get("tool_choice")
    if raw is None:
        return ("auto" if declared else "none"), None
    if raw in ("auto", "none", "required"):
        if raw != "none" and not declared:
            raise BadField("tool_choice", f"{raw!r} needs tools")
        return raw, None
    if isinstance(raw, dict) and raw.get("type") == "function":
        fn = raw.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if not any(t.name == name for t in declared):
            raise BadField("tool_choice.function.name", f"no tool is called {name!r}")
        return "required", name
    raise BadField(
        "tool_choice", "must be auto, none, required or {'type': 'function', 'function': {...}}"
    )


def message_fields(m: dict[str, Any], where: str, role: str) -> dict[str, Any]:
    """What an assistant (`tool_calls`) or tool (`tool_call_id`) message adds to role and
    content, checked."""
    if role == "tool":
        call_id = m.get("tool_call_id")
        if not isinstance(call_id, str) or not call_id:
            raise BadField(f"{where}.tool_call_id", "a tool message needs the id of its call")
        return {"tool_call_id": call_id}
    calls = m.get("tool_calls")
    if role != "assistant" or calls is None:
        return {}
    if not isinstance(calls, list):
        raise BadField(f"{where}.tool_calls", "must be a list")
    out = []
    for j, call in enumerate(calls):
        at = f"{where}.tool_calls[{j}]"
        if not isinstance(call, dict) or call.get("type", "function") != "function":
            raise BadField(f"{at}.type", "only function calls are supported")
        fn = call.get("function")
        if not isinstance(fn, dict):
            raise BadField(f"{at}.function", "must be an object")
        if not isinstance(call.get("id"), str):
            raise BadField(f"{at}.id", "must be a string")
        if not isinstance(fn.get("name"), str) or not isinstance(fn.get("arguments"), str):
            raise BadField(f"{at}.function", "needs a name and arguments (a JSON string)")
        out.append({"id": call["id"], "type": "function",
                    "function": {"name": fn["name"], "arguments": fn["arguments"]}})  # fmt: skip
    return {"tool_calls": out} if out else {}


@dataclass
class Structure:
    """What a chat asked of its answer's form, and how that answer goes back."""

    spec: JsonSpec | None = None
    tools: list[Tool] = field(default_factory=list)
    choice: ToolChoice = "none"
    only: str | None = None
    parallel: bool = True
    #: The request has stop sequences (one may cut a structured answer short).
    stops: bool = False

    @classmethod
    def of(cls, body: dict[str, Any]) -> Structure:
        declared = tools(body)
        choice, only = tool_choice(body, declared)
        parallel = body.get("parallel_tool_calls")
        if parallel not in (None, True, False):
            raise BadField("parallel_tool_calls", "must be true or false")
        stops = bool(body.get("stop"))
        return cls(response_format(body), declared, choice, only, parallel is not False, stops)

    def fields(self) -> dict[str, Any]:
        """The Generation's structured-output fields."""
        return {
            "schema": self.spec.schema if self.spec else None,
            "tools": [
                {"name": t.name, "description": t.description, "parameters": t.parameters}
                for t in self.tools
            ],
            "tool_choice": self.choice,
            "tool_name": self.only,
            "parallel_tool_calls": self.parallel,
        }

    @property
    def calls(self) -> bool:
        return bool(self.tools) and self.choice != "none"

    def parser(self) -> CallParser:
        return CallParser(self.choice == "required", _call_id)

    # -- a whole answer ------------------------------------------------------------------------
    def message(self, result: GenerationResult) -> tuple[dict[str, Any], str]:
        """The answer's message and finish_reason; raises when it does not hold."""
        if not self.calls:
            return self._text(result.text, result)
        parser = self.parser()
        parser.feed(result.text)
        self._check_complete(parser, result)
        if not parser.calls:
            return self._text(parser.text, result)
        parser.check(self.tools)
        calls = [
            {"id": c.id, "type": "function",
             "function": {"name": c.name, "arguments": c.arguments}}
            for c in parser.calls
        ]  # fmt: skip
        return {"role": "assistant", "content": None, "tool_calls": calls,
                "refusal": None}, "tool_calls"  # fmt: skip

    def _text(self, text: str, result: GenerationResult) -> tuple[dict[str, Any], str]:
        finish = "length" if result.finish_reason == "length" else "stop"
        if self.spec is not None:
            try:
                self.spec.validate(text)
            except InvalidOutput as exc:
                raise self._cut(result, exc, _unfinished(text)) from None
            finish = "stop"  # complete, whatever token it ended on
        return {"role": "assistant", "content": text, "refusal": None}, finish

    def _check_complete(self, parser: CallParser, result: GenerationResult) -> None:
        if not parser.complete:
            raise self._cut(result, InvalidOutput("the model's tool call was cut short"), True)

    def _cut(self, result: GenerationResult, error: ApplianceError, cut: bool) -> ApplianceError:
        """Why a structured answer does not hold: the client's max_tokens or stop sequence cut
        it short (a 400 naming the field), else `error` (a 502: the model's answer)."""
        if cut and result.finish_reason == "length":
            return _too_long(result)
        if cut and self.stops and result.finish_reason == "stop":
            # under a grammar the model itself can only end where the structure is complete
            return BadField("stop", "a stop sequence cut the structured answer short")
        return error

    # -- a stream ------------------------------------------------------------------------------
    def streamer(self) -> Streamer:
        return Streamer(self)


def _unfinished(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return True
    return False


def _too_long(result: GenerationResult) -> ApplianceError:
    return BadField(
        "max_tokens",
        f"the answer reached max_tokens ({result.completion_tokens} tokens) before its "
        "structure was complete: raise max_tokens",
    )


def _call_id() -> str:
    return f"call_{random.getrandbits(96):024x}"


class Streamer:
    """Pieces of generated text to OpenAI deltas, and the stream's end."""

    def __init__(self, structure: Structure) -> None:
        self.structure = structure
        self.parser = structure.parser() if structure.calls else None
        self.text: list[str] = []
        self.error: ApplianceError | None = None

    def deltas(self, piece: str) -> list[dict[str, Any]]:
        if self.parser is None:
            self.text.append(piece)
            return [{"content": piece}]
        if self.error is not None:
            return []
        try:
            events = self.parser.feed(piece)
        except InvalidOutput as exc:
            self.error = exc
            return []
        return [d for d in map(_delta, events) if d is not None]

    def finish(self, result: GenerationResult) -> str:
        """The finish_reason; raises when the answer does not hold (sent as an error event)."""
        if self.error is not None:
            raise self.error
        structure, parser = self.structure, self.parser
        if parser is not None and not parser.complete and result.finish_reason == "length":
            return "length"
        if parser is not None and parser.calls:
            structure._check_complete(parser, result)
            parser.check(structure.tools)
            return "tool_calls"
        text = parser.text if parser is not None else "".join(self.text)
        if structure.spec is not None:
            try:
                structure.spec.validate(text)
            except InvalidOutput as exc:
                if result.finish_reason == "length" and _unfinished(text):
                    return "length"
                raise structure._cut(result, exc, _unfinished(text)) from None
            return "stop"
        return "length" if result.finish_reason == "length" else "stop"


def _delta(event: Event) -> dict[str, Any] | None:
    if event.kind == "text":
        return {"content": event.text} if event.text else None
    if event.kind == "call":
        assert event.call is not None
        call = {"index": event.index, "id": event.call.id, "type": "function",
                "function": {"name": event.call.name, "arguments": ""}}  # fmt: skip
        return {"tool_calls": [call]}
    if not event.text:
        return None
    return {"tool_calls": [{"index": event.index, "function": {"arguments": event.text}}]}


__all__ = ["BadField", "Streamer", "Structure", "message_fields"]
