"""Protocol-neutral requests and results for language and embedding models.

The OpenAI routes (and any later protocol) decode into these, and the GGUF backend consumes
them, so the wire format never reaches the runtime.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np


@dataclass
class Sampling:
    """Generation parameters; None means the model's or the server's default."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    repeat_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None


@dataclass
class Generation:
    """A chat (messages) or a plain completion (prompt) to run."""

    kind: Literal["chat", "completion"]
    messages: list[dict[str, Any]] = field(default_factory=list)
    prompt: str = ""
    sampling: Sampling = field(default_factory=Sampling)
    #: Its priority level (1 = highest; None = the model's default).
    priority: int | None = None
    #: Structured output (appliance.structured): the answer must be JSON valid against this
    #: (checked) JSON Schema; None: free text.
    schema: dict[str, Any] | None = None
    #: Functions the model may call: {"name", "description", "parameters"} each (checked).
    tools: list[dict[str, Any]] = field(default_factory=list)
    #: "auto", "none" or "required"; with `tool_name`, the one function a call must be.
    tool_choice: Literal["auto", "none", "required"] = "auto"
    tool_name: str | None = None
    parallel_tool_calls: bool = True

    def structure(self) -> dict[str, Any]:
        """The structured-output fields, as plain data (they cross to worker processes and
        into cache keys with the rest of the request)."""
        return {
            "schema": self.schema,
            "tools": self.tools,
            "tool_choice": self.tool_choice,
            "tool_name": self.tool_name,
            "parallel_tool_calls": self.parallel_tool_calls,
        }


@dataclass
class GenerationResult:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass
class EmbeddingResult:
    vectors: np.ndarray[Any, Any]
    prompt_tokens: int


#: Called from the worker thread with each new piece of text.
Emit = Callable[[str], None]
#: Polled between tokens: True once the client has gone or the deadline passed.
Cancelled = Callable[[], bool]


@runtime_checkable
class TextModel(Protocol):
    """What a language or embedding backend offers beyond tensors."""

    mode: Literal["chat", "embedding"]

    def generate(
        self, request: Generation, emit: Emit | None, cancelled: Cancelled
    ) -> GenerationResult:
        """Run a generation, streaming pieces through `emit` when given."""
        ...

    def embed(self, texts: list[str]) -> EmbeddingResult:
        """One vector per text."""
        ...
