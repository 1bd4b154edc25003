"""The "text" and "embedding" steps: a text encoder's declaration, checked like any step.

    "preprocess":  {"type": "text", "tokenizer": "tokenizer.json", "max_length": 256, ...}
    "postprocess": {"type": "embedding", "output": "last_hidden_state", "pooling": "mean"}

These steps do no work of their own: the tokenization, the runtime calls in batches and the
pooling stay in the ONNX text backend (appliance/backends/onnx_text.py, with
appliance/preprocess/text.py), which the declaration selects (OnnxBackend picks it when a
"text" input step is declared) and which serves the model as BYTES "text" in, FP32
"embedding" out. They read and write nothing, so the model's chain never runs them; they
exist so that a declaration is checked at `models add` (unknown keys, types, ranges) and
shown in model metadata like every other step. The model-side checks (which inputs the
tokenizer feeds, the tokenizer file) happen when the backend loads.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import ModelError
from ..preprocess.text import embedding_fields, text_fields
from .base import Array, Arrays, Step, StepCall, StepContext, unknown_keys

_TEXT_KEYS = frozenset({"tokenizer", "max_length", "padding", "truncation", "inputs"})
_EMBEDDING_KEYS = frozenset({"output", "pooling", "normalize"})


class TextStep(Step):
    type = "text"

    def __init__(self, fields: dict[str, Any]) -> None:
        self.fields = fields

    @classmethod
    def parse(cls, config: Mapping[str, Any], ctx: StepContext) -> TextStep:
        unknown_keys(config, _TEXT_KEYS, ctx)
        try:
            return cls(text_fields(dict(config)))
        except KeyError as exc:
            raise ctx.bad(str(exc.args[0]), "required") from None
        except (TypeError, ValueError) as exc:
            raise _bad(ctx, exc) from None

    def run(self, tensors: Mapping[str, Array], call: StepCall) -> Arrays:
        return {}  # the backend tokenizes (see the module docstring)

    def describe(self) -> dict[str, Any]:
        return {"type": self.type, **self.fields}


class EmbeddingStep(Step):
    type = "embedding"

    def __init__(self, fields: dict[str, Any]) -> None:
        self.fields = fields

    @classmethod
    def parse(cls, config: Mapping[str, Any], ctx: StepContext) -> EmbeddingStep:
        unknown_keys(config, _EMBEDDING_KEYS, ctx)
        try:
            return cls(embedding_fields(dict(config)))
        except KeyError as exc:
            raise ctx.bad(str(exc.args[0]), "required") from None
        except (TypeError, ValueError) as exc:
            raise _bad(ctx, exc) from None

    def run(self, tensors: Mapping[str, Array], call: StepCall) -> Arrays:
        return {}  # the backend pools (see the module docstring)

    def describe(self) -> dict[str, Any]:
        return {"type": self.type, **self.fields}


def _bad(ctx: StepContext, exc: Exception) -> ModelError:
    """preprocess/text.py's messages start with the key they are about: "'max_length' must..."."""
    text = str(exc)
    key, sep, why = text[1:].partition("' ") if text.startswith("'") else ("", "", "")
    return ctx.bad(key, why) if sep else ctx.bad("type", text)
