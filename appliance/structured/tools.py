"""Tool calling on a model that emits text: the grammar of a call, the prompt, and the parser.

A call is written the way Hermes- and Qwen-style chat templates teach their models:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Lyon"}}
    </tool_call>

so a model trained on that format meets its own convention, and one that was not (the tiny test
model) is held to it by the grammar:

- `required` or a named function: the answer must be one call (more when parallel calls are
  allowed), each an object whose `name` is one of the functions and whose `arguments` follow
  that function's parameter schema.
- `auto`: either calls, or an answer that does not start with `<` (free text, or JSON under the
  request's `response_format`). The first character decides, so a stream knows at once whether
  it is text or calls, and nothing is held back.
- `none`: no call grammar; the tools are not shown to the model.

The prompt: a chat template that knows tools (its source mentions `tools`) gets them, and the
history's calls, the Hugging Face way (`tools=[...]`, `tool_calls[].function.arguments` as an
object, `role: tool` messages). Any other template gets a system message describing the tools
and the call format, earlier calls written in that format, and tool results as user turns.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from .schema import InvalidOutput, check_value, format_rules, schema_rules

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
#: The longest a call's opening (up to its arguments) may be before the parser gives up.
MAX_CALL_HEAD = 1024
#: The most calls one answer may hold when parallel calls are allowed.
MAX_PARALLEL_CALLS = 8

ToolChoice = Literal["auto", "none", "required"]


@dataclass(frozen=True)
class Tool:
    """A function the model may call: `parameters` is a checked JSON Schema of an object."""

    name: str
    description: str
    parameters: dict[str, Any]

    def as_template(self) -> dict[str, Any]:
        """The tool as Hugging Face chat templates take it (OpenAI's shape)."""
        function = {"name": self.name, "description": self.description,
                    "parameters": self.parameters}  # fmt: skip
        return {"type": "function", "function": function}


@dataclass
class ToolCall:
    id: str
    name: str
    #: The arguments as the model wrote them (JSON text: what the OpenAI API returns).
    arguments: str = ""


# -- the grammar ------------------------------------------------------------------------------
def _call_schema(tool: Tool) -> dict[str, Any]:
    params = dict(tool.parameters)
    defs: dict[str, Any] = {k: params.pop(k) for k in ("$defs", "definitions") if k in params}
    return {
        **defs,  # the converter resolves #/$defs/... from the top of what it is given
        "type": "object",
        "properties": {"name": {"const": tool.name}, "arguments": params},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def structured_grammar(
    schema: dict[str, Any] | None,
    tools: list[Tool],
    choice: ToolChoice = "auto",
    only: str | None = None,
    parallel: bool = True,
) -> str | None:
    """The GBNF grammar for an answer (None: unconstrained). `schema`: what a text answer must
    be (response_format); `only`: the one function a call must be (a named tool_choice)."""
    callable_ = [t for t in tools if only is None or t.name == only]
    if choice == "none" or not callable_:
        if schema is None:
            return None
        parts = [(schema, "answer", "response_format")]
    else:
        parts = [
            (_call_schema(t), f"fn{i}", f"the parameters of tool {t.name}")
            for i, t in enumerate(callable_)
        ]
        if schema is not None and choice == "auto":
            parts.append((schema, "answer", "response_format"))
    rules, tops = schema_rules(parts)
    if choice == "none" or not callable_:
        rules["root"] = tops[0]
        return format_rules(rules)
    calls = tops[: len(callable_)]
    rules["tc-call"] = f'"{CALL_OPEN}\\n" ({" | ".join(calls)}) "\\n{CALL_CLOSE}"'
    more = f' ("\\n" tc-call){{0,{MAX_PARALLEL_CALLS - 1}}}' if parallel else ""
    rules["tc-calls"] = f"tc-call{more}"
    if choice == "auto":
        if schema is not None:
            rules["tc-text"] = tops[-1]
        else:
            rules["tc-text"] = "([^<\\x00] [^\\x00]*)?"
        rules["root"] = "tc-calls | tc-text"
    else:
        rules["root"] = "tc-calls"
    return format_rules(rules)


# -- the prompt -------------------------------------------------------------------------------
_INSTRUCTIONS = (
    f'To call a function, answer with {CALL_OPEN}\n{{"name": ..., "arguments": {{...}}}}\n'
    f"{CALL_CLOSE}. Functions:"
)


def template_knows_tools(template: str | None) -> bool:
    return bool(template) and "tools" in str(template)


def _arguments(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def prompt_messages(
    messages: list[dict[str, Any]], tools: list[Tool], knows_tools: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """Messages (and the `tools` argument) for the chat template, see the module docstring.
    `messages` are checked OpenAI messages: tool_calls with string arguments, role tool with
    tool_call_id."""
    if knows_tools:
        out = []
        for m in messages:
            m = dict(m)
            if m.get("tool_calls"):
                m["tool_calls"] = [
                    {**c, "function": {**c["function"],
                                       "arguments": _arguments(c["function"]["arguments"])}}
                    for c in m["tool_calls"]
                ]  # fmt: skip
            if m.get("content") is None:
                m["content"] = ""
            out.append(m)
        return out, [t.as_template() for t in tools] or None
    out = []
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if m.get("tool_calls"):
            calls = [_written(c["function"]["name"], c["function"]["arguments"])
                     for c in m["tool_calls"]]  # fmt: skip
            content = "\n".join([content, *calls] if content else calls)
        if role == "tool":
            role, content = "user", f"<tool_response>\n{content}\n</tool_response>"
        out.append({"role": role, "content": content})
    if tools:
        listing = "\n".join(
            json.dumps(
                {"name": t.name, "description": t.description, "parameters": t.parameters},
                ensure_ascii=False,
                separators=(",", ":"),
            )
            for t in tools
        )
        text = f"{_INSTRUCTIONS}\n{listing}"
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{text}"}
        else:
            out.insert(0, {"role": "system", "content": text})
    return out, None


def _written(name: str, arguments: str) -> str:
    call = json.dumps({"name": name, "arguments": _arguments(arguments)}, ensure_ascii=False)
    return f"{CALL_OPEN}\n{call}\n{CALL_CLOSE}"


# -- the parser -------------------------------------------------------------------------------
_HEAD = re.compile(
    r'\s*' + re.escape(CALL_OPEN) + r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*'
    r'"arguments"\s*:\s*(?=\S)'
)  # fmt: skip


@dataclass
class Event:
    """What a piece of generated text turned out to be: `text`, the start of call `index`
    (its `id` and `name`), or a piece of call `index`'s arguments."""

    kind: Literal["text", "call", "arguments"]
    text: str = ""
    index: int = 0
    call: ToolCall | None = None


@dataclass
class CallParser:
    """Turns generated text into text or tool calls, piece by piece (a stream) or at once.

    `auto`: the first character decides (a call starts with `<`, the grammar keeps text from
    doing so); otherwise every answer is calls. `new_id` makes each call's id."""

    calls_only: bool
    new_id: Any
    calls: list[ToolCall] = field(default_factory=list)
    text: str = ""
    _state: str = "start"
    _buffer: str = ""
    _depth: int = 0
    _in_string: bool = False
    _escaped: bool = False

    def feed(self, piece: str) -> list[Event]:
        events: list[Event] = []
        if self._state == "start":
            if not piece:
                return events
            # the grammar's text never starts with "<": the first character decides
            self._state = "head" if self.calls_only or piece[0] == "<" else "text"
        if self._state == "text":
            self.text += piece
            return [Event("text", piece)] if piece else []
        self._buffer += piece
        while self._buffer:
            if self._state in ("head", "between"):
                if self._state == "between":
                    stripped = self._buffer.lstrip()
                    if not stripped:
                        self._buffer = ""
                        break
                    self._state = "head"
                m = _HEAD.match(self._buffer)
                if m is None:
                    if len(self._buffer) > MAX_CALL_HEAD:
                        raise InvalidOutput("the model wrote a malformed tool call")
                    break
                name = json.loads(f'"{m.group(1)}"')
                call = ToolCall(self.new_id(), name)
                self.calls.append(call)
                events.append(Event("call", index=len(self.calls) - 1, call=call))
                self._buffer = self._buffer[m.end() :]
                self._state, self._depth = "arguments", 0
            elif self._state == "arguments":
                end = self._scan(self._buffer)
                taken = self._buffer[:end]
                self.calls[-1].arguments += taken
                events.append(Event("arguments", taken, index=len(self.calls) - 1))
                self._buffer = self._buffer[end:]
                if self._depth == 0 and self.calls[-1].arguments:
                    self._state = "tail"
            elif self._state == "tail":
                at = self._buffer.find(CALL_CLOSE)
                if at < 0:
                    break
                self._buffer = self._buffer[at + len(CALL_CLOSE) :]
                self._state = "between"
        return events

    def _scan(self, text: str) -> int:
        """How much of `text` belongs to the arguments' JSON value (which starts with `{`)."""
        for i, c in enumerate(text):
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif c == "\\":
                    self._escaped = True
                elif c == '"':
                    self._in_string = False
            elif c == '"':
                self._in_string = True
            elif c in "{[":
                self._depth += 1
            elif c in "}]":
                self._depth -= 1
                if self._depth == 0:
                    return i + 1
        return len(text)

    @property
    def complete(self) -> bool:
        """True when the answer ended where it may: after text, or after a closed call."""
        if self._state == "start":
            return not self.calls_only
        return self._state in ("text", "between")

    def check(self, tools: list[Tool]) -> None:
        """Every call names a tool and its arguments follow that tool's parameters."""
        by_name = {t.name: t for t in tools}
        for call in self.calls:
            tool = by_name.get(call.name)
            if tool is None:
                raise InvalidOutput(f"the model called an unknown function {call.name!r}")
            where = f"tools[{call.name}].function.parameters"
            try:
                value = json.loads(call.arguments)
            except ValueError as exc:
                raise InvalidOutput(f"the arguments of {call.name} are not JSON: {exc}") from None
            check_value(tool.parameters, value, where)


__all__ = [
    "CALL_CLOSE",
    "CALL_OPEN",
    "CallParser",
    "Event",
    "Tool",
    "ToolCall",
    "ToolChoice",
    "prompt_messages",
    "structured_grammar",
    "template_knows_tools",
]
