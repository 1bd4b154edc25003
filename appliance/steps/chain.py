"""A model's chain: the steps its manifest declares around it, run on every request.

Input steps run on the request's inputs before validation (an image decoded into the model's
tensor), output steps on the model's outputs after the run (top-k answers added). The legacy
`preprocess` / `postprocess` objects are the first input / output step, then `steps.input` /
`steps.output` in order (Manifest.declared). Raw quantized tensors (parameter
`raw_quantized`) are the chain's own implicit part: inputs dequantized before, outputs
quantized after everything else.

`build_chain` returns None when a model declares nothing and has no quantized tensors, so a
plain model pays nothing. A step that reads and writes nothing (the text encoder's
declarations, which the backend acts on) is checked and shown in metadata but never run.

Outputs a client names are handled the same for every output step: a named output that a step
writes is not asked of the model; the model is asked for what the needed steps read instead,
and only what the client named comes back (a classification's `top_k_labels` without the
logits it came from).

Every step run is timed into `appliance_step_seconds{model,step}` (the step label is its
declared `name`, else its type) once the engine binds the chain to its metrics.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .. import tracing
from ..backends.base import Quantization
from ..codec import InferRequest
from ..config import ModelConfig
from ..errors import InvalidInput, ModelError
from ..manifest import Manifest
from ..metrics import Histogram
from ..preprocess.image import ImageSpec
from ..tensors import Signature, TensorSpec, datatype_of
from . import parse_step
from .base import Array, Arrays, Step, StepCall, StepContext, run_step
from .classify import ClassifyStep
from .image import ImageStep
from .where import around_model

#: A step's optional `name` (its metrics label): like a pipeline node's name.
NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")


class Bound:
    """One step of a chain, with its label and where it was declared."""

    __slots__ = ("hist", "label", "named", "skips", "step", "where")

    def __init__(self, step: Step, where: str, name: str | None) -> None:
        self.step = step
        #: A step's optional `skips(tensors)`: True when this request needs nothing of it (an
        #: image step given the model's tensor), so a blocking step costs no thread hop then.
        self.skips: Callable[[Mapping[str, Array]], bool] | None = getattr(step, "skips", None)
        self.where = where
        self.named = name is not None
        self.label = name if name is not None else step.type
        self.hist: Histogram | None = None

    async def run(self, tensors: Mapping[str, Array], call: StepCall) -> Arrays:
        """Run the step (in a thread when it blocks), timed; failures named (run_step)."""
        if not self.step.blocking:
            return self.run_here(tensors, call)
        t0 = time.perf_counter()
        try:
            return await asyncio.to_thread(run_step, self.step, tensors, call, self.where)
        finally:
            self._timed(t0)

    def run_here(self, tensors: Mapping[str, Array], call: StepCall) -> Arrays:
        """Run a step that does not block, on this thread, timed."""
        t0 = time.perf_counter()
        try:
            return run_step(self.step, tensors, call, self.where)
        finally:
            self._timed(t0)

    def _timed(self, t0: float) -> None:
        """Into the step's histogram, and a `step {label}` span when the request is traced."""
        t1 = time.perf_counter()
        if self.hist is not None:
            self.hist.observe(t1 - t0)
        if tracing.tracer is not None:
            attributes = {"appliance.step.type": self.step.type, "appliance.step.where": self.where}
            tracing.record(f"step {self.label}", t0, t1, attributes)

    def describe(self) -> dict[str, Any]:
        out = self.step.describe()
        if self.named:
            out["name"] = self.label
        if self.step.parameters:
            out["parameters"] = dict(self.step.parameters)
        return out


@dataclass(frozen=True)
class Plan:
    """A request that named its outputs: what it named, and the output steps that serve it."""

    named: dict[str, bool]
    run: tuple[Bound, ...]


class Chain:
    def __init__(
        self,
        inputs: tuple[Bound, ...],
        outputs: tuple[Bound, ...],
        quantization: dict[str, Quantization],
        signature: Signature,
    ) -> None:
        self.inputs = inputs
        self.outputs = outputs
        self.quantization = quantization
        #: The steps that do something on a request (see the module docstring).
        self._run_in = tuple(b for b in inputs if b.step.reads or b.step.writes)
        self._run_out = tuple(b for b in outputs if b.step.reads or b.step.writes)
        model_in = set(signature.input_by_name)
        self._model_out = frozenset(signature.output_by_name)
        #: Request inputs only input steps read: removed before validation.
        self._consumed = tuple(sorted({r for b in self._run_in for r in b.step.reads} - model_in))
        #: Outputs only output steps write.
        self._produced = frozenset(w for b in self._run_out for w in b.step.writes)
        #: The image input the HTTP and MQTT fronts fill with raw image bodies.
        self.image: ImageSpec | None = next(
            (b.step.spec for b in inputs if isinstance(b.step, ImageStep)), None
        )

    def bind(self, histogram: Callable[[str], Histogram]) -> None:
        """Time each step that runs into the histogram for its label (the engine's metrics)."""
        for b in (*self._run_in, *self._run_out):
            b.hist = histogram(b.label)

    # -- a request ---------------------------------------------------------------------------
    async def prepare(self, request: InferRequest) -> Plan | None:
        """Run the input steps and dequantize raw inputs, in place; settle which outputs the
        model computes. What it returns goes to `finish` (and `restore` on failure)."""
        if self._run_in:
            call = StepCall(request.parameters)
            inputs = request.inputs
            for b in self._run_in:
                if any(r not in inputs for r in b.step.reads) or (b.skips and b.skips(inputs)):
                    continue  # validation names a missing input
                out = await b.run(inputs, call)
                for name in b.step.writes:
                    value = out.get(name)
                    if value is not None and value is not inputs.get(name):
                        inputs[name] = value
                        request.datatypes[name] = datatype_of(value)
            for name in self._consumed:
                inputs.pop(name, None)
                request.datatypes.pop(name, None)
        if self._raw(request):
            for name, q in self.quantization.items():
                value = request.inputs.get(name)
                if value is None:
                    continue  # missing inputs are reported by validation
                given = request.datatypes.get(name)
                if given != q.datatype:
                    raise InvalidInput(
                        f"input {name!r}: with raw_quantized the model takes {q.datatype} "
                        f"(scale {q.scale}, zero point {q.zero_point}), got {given}"
                    )
                request.inputs[name] = q.dequantize(value)
                request.datatypes[name] = "FP32"
        return self._plan(request) if self._produced and request.outputs is not None else None

    def _plan(self, request: InferRequest) -> Plan | None:
        named = request.outputs
        assert named is not None
        unknown = [n for n in named if n not in self._model_out and n not in self._produced]
        if unknown:
            raise InvalidInput(
                f"unknown output {unknown[0]!r}; the model's outputs are "
                f"{', '.join(map(repr, sorted(self._model_out)))} and its steps add "
                f"{', '.join(map(repr, sorted(self._produced)))}"
            )
        need = set(named)
        run = []
        for b in reversed(self._run_out):
            if need.intersection(b.step.writes):
                run.append(b)
                need.difference_update(b.step.writes)
                need.update(b.step.reads)
        if not run:
            return None
        run.reverse()
        # the model computes what the client named of its own and what the steps read
        request.outputs = {n: named.get(n, False) for n in sorted(need)}
        return Plan(dict(named), tuple(run))

    async def finish(self, request: InferRequest, outputs: Arrays, plan: Plan | None) -> Arrays:
        """Run the output steps, keep only what the client named, re-quantize raw outputs."""
        out = dict(outputs)
        # the plan's; else all outputs, or none when the client named only the model's own
        steps = plan.run if plan else (self._run_out if request.outputs is None else ())
        if steps:
            call = StepCall(request.parameters, frozenset(plan.named) if plan else None)
            for b in steps:
                if any(r not in out for r in b.step.reads):
                    continue  # an earlier step wrote nothing for this request
                blocks = b.step.blocking
                produced = await b.run(out, call) if blocks else b.run_here(out, call)
                for name in b.step.writes:
                    if name in produced:
                        out[name] = produced[name]
        if plan is not None:
            request.outputs = plan.named
            missing = [n for n in plan.named if n not in out]
            if missing:
                raise InvalidInput(
                    f"output {missing[0]!r} was named, but no step produced it for this "
                    "request (see the model metadata's steps and their parameters)"
                )
            out = {n: out[n] for n in plan.named}
        if self._raw(request):
            for name, q in self.quantization.items():
                if name in out:
                    out[name] = q.quantize(out[name])
        return out

    def restore(self, request: InferRequest, plan: Plan | None) -> None:
        """Give a failed request back the outputs its client named (a retry sees them)."""
        if plan is not None:
            request.outputs = plan.named

    def _raw(self, request: InferRequest) -> bool:
        raw = request.parameters.get("raw_quantized", False)
        if not isinstance(raw, bool):
            raise InvalidInput(f"parameter raw_quantized must be true or false, got {raw!r}")
        return raw  # a model with no quantized tensors: raw and real are the same

    def describe(self) -> dict[str, Any]:
        """Model metadata parameters: what a client may send and ask for."""
        out: dict[str, Any] = {}
        if self.image is not None:
            out["preprocess"] = self.image.to_json()
        classify = next((b.step for b in self.outputs if isinstance(b.step, ClassifyStep)), None)
        if classify is not None:
            out["postprocess"] = classify.describe()
        if self.quantization:
            out["quantization"] = {n: q.to_json() for n, q in self.quantization.items()}
        if self.inputs or self.outputs:
            out["steps"] = {
                "input": [b.describe() for b in self.inputs],
                "output": [b.describe() for b in self.outputs],
            }
        return out


def build_chain(
    manifest: Manifest,
    signature: Signature,
    quantization: Mapping[str, Quantization],
    config: ModelConfig,
) -> Chain | None:
    """The chain a model's manifest declares, checked against the model's tensors (ModelError
    naming the step and key when a declaration is wrong); None when there is nothing to do."""
    what = f"model {manifest.name!r} version {manifest.version}"
    inputs = _side(manifest, "input", what, {t.name: t for t in signature.inputs}, config)
    outputs = _side(manifest, "output", what, {t.name: t for t in signature.outputs}, config)
    if not inputs and not outputs and not quantization:
        return None
    _check_input_writes(inputs, signature)
    return Chain(inputs, outputs, dict(quantization), signature)


def _side(
    manifest: Manifest,
    side: str,
    what: str,
    model: dict[str, TensorSpec],
    config: ModelConfig,
) -> tuple[Bound, ...]:
    out = []
    known = set(model)  # names a step may read (output side)
    available = dict(model)  # ... with their specs where known
    for key, decl in manifest.declared("input" if side == "input" else "output"):
        where = around_model(what, key, str(decl.get("type")))
        name = decl.get("name")
        if name is not None and not (isinstance(name, str) and NAME_RE.match(name)):
            raise ModelError(
                f"{where}: name: {name!r} is not a step name (a letter, then up to 63 letters, "
                "digits, '_' or '-')"
            )
        body = {k: v for k, v in decl.items() if k != "name"}
        ctx = StepContext(where, dict(available), config)
        try:
            step = parse_step(body, ctx)
        except ModelError as exc:
            if exc.message.startswith(what):
                raise
            raise ModelError(f"{where}: {exc.message}") from None
        if side == "output":
            for r in step.reads:
                if r not in known:
                    raise ModelError(
                        f"{where}: reads {r!r}, which is neither a model output "
                        f"({', '.join(sorted(model))}) nor written by an earlier step"
                    )
            known.update(step.writes)
            available.update(step.specs(available))
        out.append(Bound(step, where, name))
    return tuple(out)


def _check_input_writes(inputs: tuple[Bound, ...], signature: Signature) -> None:
    """An input step's tensor must reach the model: a model input, or read by a later step."""
    model_in = signature.input_by_name
    for i, b in enumerate(inputs):
        later = {r for later_b in inputs[i + 1 :] for r in later_b.step.reads}
        for name in b.step.writes:
            if name not in model_in and name not in later:
                raise ModelError(
                    f"{b.where}: writes {name!r}, which is not a model input "
                    f"({', '.join(model_in)}) nor read by a later input step"
                )
