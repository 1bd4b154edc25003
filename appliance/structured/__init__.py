"""Structured LLM output: JSON Schema to llama.cpp grammar (refusing what a grammar cannot
enforce), re-validation of what came out, and tool calls (their grammar, their prompt, and a
parser that turns generated text into calls, piece by piece when streaming).

Protocol-neutral: the OpenAI front decodes requests into these objects, the GGUF backend
constrains sampling with the grammar text, and the front shapes the answer.
"""

from __future__ import annotations

from .schema import (
    ANY_JSON_OBJECT,
    InvalidOutput,
    JsonSpec,
    UnsupportedSchema,
    grammar_for_schema,
    json_spec,
)
from .tools import (
    CALL_CLOSE,
    CALL_OPEN,
    CallParser,
    Tool,
    ToolCall,
    ToolChoice,
    structured_grammar,
)

__all__ = [
    "ANY_JSON_OBJECT",
    "CALL_CLOSE",
    "CALL_OPEN",
    "CallParser",
    "InvalidOutput",
    "JsonSpec",
    "Tool",
    "ToolCall",
    "ToolChoice",
    "UnsupportedSchema",
    "grammar_for_schema",
    "json_spec",
    "structured_grammar",
]
