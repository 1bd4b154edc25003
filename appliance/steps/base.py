"""The step interface: one small piece of processing around a model or inside a pipeline.

A step reads named tensors and writes named tensors. Its declaration (a JSON object with a
`type`, from a manifest's `steps`, a legacy `preprocess`/`postprocess`, or a pipeline node)
is parsed and checked once, at `models add` and at load, by the step class itself; a request
then only calls `run`. The names a step reads and writes are its own: around a model they are
the model's input or output names, inside a pipeline the pipeline maps them to other nodes'
tensors (like Triton's `input_map` / `output_map`).

Why this shape: `run` is synchronous and gets plain numpy arrays, so a step is testable alone
and a pass-through step costs a function call; a step that blocks (decoding images) says so
with `blocking = True` and the caller runs it in a thread. Steps know nothing of protocols,
models or the engine: the request path and the pipeline executor call them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from ..config import ModelConfig
from ..errors import ApplianceError, InferenceFailed, ModelError
from ..tensors import TensorSpec

Array = np.ndarray[Any, Any]
Arrays = dict[str, Array]


@dataclass(frozen=True)
class StepContext:
    """What parsing a declaration may consult."""

    #: Where the declaration is, for messages: "model 'det' version 1: steps.output[0] (nms)".
    where: str
    #: The tensors the step may read, by name, with datatype and shape where known (the
    #: model's inputs for an input step, its outputs for an output step, the upstream nodes'
    #: outputs in a pipeline). Empty when not known yet (`models add` before the file is read).
    available: Mapping[str, TensorSpec] = field(default_factory=dict)
    #: The model's config (limits such as `image.max_pixels`); None inside a pipeline or when
    #: only checking a declaration.
    config: ModelConfig | None = None

    def bad(self, key: str, why: str) -> ModelError:
        """The one error shape for a wrong declaration: names the step and the key."""
        return ModelError(f"{self.where}: {key}: {why}")


@dataclass(frozen=True)
class StepCall:
    """What one request gives a step besides its tensors."""

    #: The request's parameters (KServe v2 `parameters`, MQTT user properties mapped there).
    parameters: Mapping[str, Any]
    #: The outputs the client named (None = all): a step may skip work nobody asked for.
    wanted: frozenset[str] | None = None


class Step(ABC):
    """One registered kind of processing; an instance is one checked declaration."""

    #: The `type` a declaration names (the registry key).
    type: ClassVar[str]
    #: Request parameters the step reads: name -> one line saying what it does (shown in
    #: model metadata; a pipeline lists those of its steps).
    parameters: ClassVar[Mapping[str, str]] = {}
    #: True when `run` blocks (decoding, heavy numpy): the caller runs it in a thread.
    blocking: ClassVar[bool] = False

    #: Tensor names read, in the step's namespace.
    reads: tuple[str, ...] = ()
    #: Those of `reads` the step does without when they are not given (a detector with no
    #: classes output): a pipeline node need not map them, a model need not have them.
    optional: tuple[str, ...] = ()
    #: Tensor names written.
    writes: tuple[str, ...] = ()

    @classmethod
    @abstractmethod
    def parse(cls, config: Mapping[str, Any], ctx: StepContext) -> Step:
        """Check a declaration (unknown keys, types, ranges, tensors it names against
        `ctx.available`) and build the step; ModelError through `ctx.bad` when wrong."""

    def specs(self, given: Mapping[str, TensorSpec]) -> dict[str, TensorSpec]:
        """What the step writes, given what it reads (checked at load, shown in metadata).

        The default says nothing about shapes: a pipeline cannot check what follows it."""
        return {}

    @abstractmethod
    def run(self, tensors: Mapping[str, Array], call: StepCall) -> Arrays:
        """Read `self.reads` from `tensors`, return the tensors in `self.writes`.

        Raise InvalidInput (400) for what the client sent wrong; any other exception is the
        step's own failure and becomes a 500 naming it (see `run_step`)."""

    def describe(self) -> dict[str, Any]:
        """The declaration as model metadata shows it."""
        return {"type": self.type}


#: Where a step class came from when it is not built in: type -> distribution name, so a
#: failure names the plugin to blame (filled by the registry).
PLUGIN_OF: dict[str, str] = {}


def run_step(step: Step, tensors: Mapping[str, Array], call: StepCall, where: str) -> Arrays:
    """`step.run` with its failures named: a client's mistake stays a 400, a step's own bug
    is a 500 naming the step (and the plugin it came from), and the server goes on."""
    try:
        return step.run(tensors, call)
    except ApplianceError:
        raise
    except Exception as exc:
        raise InferenceFailed(_failed(step, where, exc)) from exc


def _failed(step: Step, where: str, exc: BaseException) -> str:
    plugin = PLUGIN_OF.get(step.type)
    origin = f" (plugin {plugin!r})" if plugin else ""
    return f"{where}: step {step.type!r}{origin} failed: {type(exc).__name__}: {exc}"


def unknown_keys(config: Mapping[str, Any], known: frozenset[str], ctx: StepContext) -> None:
    """Refuse keys a step does not know: a typo must not be silently ignored."""
    unknown = sorted(set(config) - known - {"type"})
    if unknown:
        raise ctx.bad(unknown[0], f"unknown key (known: {', '.join(sorted(known | {'type'}))})")
