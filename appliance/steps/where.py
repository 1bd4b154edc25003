"""How a step around a model is named in messages: "model 'm' version 1: steps.input[0] (image)".

The model's chain writes `StepContext.where` this way; the built-in steps that wrap older
checks (image, classification) split it back, so their messages keep naming the manifest key
("model 'm' version 1: preprocess.size = ...") as they did before steps existed.
"""

from __future__ import annotations

from .base import StepContext


def around_model(what: str, key: str, type_: str) -> str:
    """`what` is "model 'm' version 1", `key` the manifest key ("preprocess", "steps.output[1]")."""
    return f"{what}: {key} ({type_})"


def model_where(ctx: StepContext) -> tuple[str, str]:
    """(what, key) back from a `where` made by `around_model` (model names hold no ': ')."""
    head = ctx.where.rpartition(" (")[0] or ctx.where
    what, _, key = head.rpartition(": ")
    return (what, key) if what else (head, "step")
