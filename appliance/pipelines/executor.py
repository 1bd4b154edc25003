"""Runs one request through a bound pipeline.

Independent nodes run concurrently; a graph that is a chain runs as plain awaits (no task per
node: a 2-model pipeline must cost little more than calling both models). Model nodes go
through `Engine.infer_on`, so each model keeps its own steps, batching and priority queues,
and the request's priority and deadline apply to every node. A fan-out node's outputs are split
into rows and the nodes under it run once per row, all rows submitted at once so that a
model's dynamic batcher merges them; their outputs are gathered (concatenated along dimension
0) where the declaration says, and N = 0 gives empty tensors of the right shape.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import tracing
from ..codec import InferRequest, InferResponse
from ..engine import Engine, LoadedModel
from ..engine.validation import validate
from ..errors import ApplianceError, DeadlineExceeded, InferenceFailed, InvalidInput
from ..metrics import Histogram
from ..steps.base import Array, Arrays, StepCall, run_step
from ..tensors import DATATYPES, Signature, TensorSpec, datatype_of
from .declaration import REQUEST, Bound, BoundNode, Source

log = logging.getLogger("appliance.pipelines")

Env = dict[str, Array]


class Stats:
    """Counters of one pipeline (loop thread only)."""

    def __init__(self) -> None:
        self.outcomes: dict[str, int] = {"success": 0}
        #: Failures of optional nodes, by node.
        self.optional_failed: dict[str, int] = {}


@dataclass(frozen=True, slots=True)
class Fast:
    """A model node with no condition, list source or rename left to decide per request: its
    inputs and outputs as environment keys, worked out once."""

    model: str
    version: str | None
    ins: tuple[tuple[str, str], ...]
    outs: tuple[tuple[str, str], ...]
    timer: Histogram
    #: Inputs that are BYTES (a model decoding pictures itself looks at the declared type).
    bytes_ins: tuple[str, ...] = ()


def _fast(bound: BoundNode, timer: Histogram) -> Fast | None:
    node = bound.node
    if node.model is None or node.when is not None or node.optional or node.fan_out:
        return None
    if any(len(source) != 1 for source in node.inputs.values()):
        return None
    ins = tuple((key, str(source[0])) for key, source in node.inputs.items())
    outs = tuple((own, f"{node.name}.{graph}") for graph, own in bound.produces.items())
    texts = tuple(k for k, spec in bound.given.items() if spec.datatype == "BYTES")
    return Fast(node.model, node.version, ins, outs, timer, texts)


class Plan:
    """What `run` needs of a bound pipeline, worked out once per binding."""

    def __init__(self, bound: Bound, timer: Callable[[str], Histogram]) -> None:
        self.bound = bound
        decl = bound.decl
        self.name = decl.name
        self.in_signature = Signature(decl.inputs, ())
        self.in_keys = [(t.name, f"{REQUEST}.{t.name}") for t in decl.inputs]
        #: Per input: name, datatype, numpy dtype, rank, and the dimensions of fixed size
        #: (index, size): what the hot path compares (`_check_inputs`).
        self.in_checks = [
            (t.name, t.datatype, DATATYPES.get(t.datatype), len(t.shape),
             tuple((i, d) for i, d in enumerate(t.shape) if d >= 0))
            for t in decl.inputs
        ]  # fmt: skip
        self.timers = {name: timer(name) for name in decl.nodes}
        #: Outer units: node names (scope None) and fan-out blocks ("*F"), with their deps.
        self.outer: dict[str, frozenset[str]] = {}
        #: Nodes per row of each fan-out, with deps among them.
        self.rows: dict[str, dict[str, frozenset[str]]] = {}
        for node in decl.nodes.values():
            if node.scope is None:
                self.outer[node.name] = frozenset(_unit(decl, d) for d in node.deps)
            else:
                block = self.rows.setdefault(node.scope, {})
                block[node.name] = frozenset(
                    d for d in node.deps if decl.nodes[d].scope == node.scope
                )
        for f, block in self.rows.items():
            outer_deps = {f}
            for n in block:
                outer_deps |= {
                    _unit(decl, d) for d in decl.nodes[n].deps if decl.nodes[d].scope is None
                }
            # before the first node that needs the gathered rows
            self.outer[f"*{f}"] = frozenset(outer_deps)
        self.outer = _sorted(self.outer)
        self.outer_chain = _is_chain(self.outer)
        self.row_chain = {f: _is_chain(b) for f, b in self.rows.items()}
        #: Per row of a fan-out, the shape of a gathered tensor with no rows.
        self.specs = bound.specs
        #: The nodes in order when the graph is a chain with no fan-out (the common case),
        #: each with its fast form when it is a plain model node.
        self.flat: list[tuple[BoundNode, Fast | None]] | None = None
        #: All of `flat` when every node is a plain model node and every output one
        #: reference: run by `execute` itself.
        self.chain: list[tuple[BoundNode, Fast]] | None = None
        self.out_keys = [(name, str(source[0])) for name, source in decl.outputs.items()]
        if self.outer_chain and not self.rows:
            self.flat = [
                (bound.nodes[n], _fast(bound.nodes[n], self.timers[n])) for n in self.outer
            ]
            fasts = [(b, f) for b, f in self.flat if f is not None]
            if len(fasts) == len(self.flat) and all(len(s) == 1 for s in decl.outputs.values()):
                self.chain = fasts
        #: The inputs' declared datatypes, as a request from the wire states them.
        self.in_datatypes = {t.name: t.datatype for t in decl.inputs}
        #: Whether the chain's first model checks the pipeline's inputs at least as strictly
        #: as `_check_inputs` (then a request whose stated datatypes are the declared ones is
        #: not checked twice).
        self.first_checks = self.chain is not None and _checked_by(decl, *self.chain[0])


def _checked_by(decl: Any, bound: BoundNode, fast: Fast) -> bool:
    """Whether every pipeline input goes to this node's model, once, under the same datatype
    and rank, and with every size the pipeline fixes fixed the same by the model."""
    keys = {ref: key for key, ref in fast.ins}
    if len(keys) != len(fast.ins) or len(keys) != len(decl.inputs):
        return False
    for t in decl.inputs:
        key = keys.get(f"{REQUEST}.{t.name}")
        want = bound.wanted.get(key) if key is not None else None
        if want is None or want.datatype != t.datatype or len(want.shape) != len(t.shape):
            return False
        if any(d >= 0 and w != d for d, w in zip(t.shape, want.shape, strict=True)):
            return False
    return True


def _unit(decl: Any, node: str) -> str:
    scope = decl.nodes[node].scope
    return node if scope is None else f"*{scope}"


def _sorted(units: dict[str, frozenset[str]]) -> dict[str, frozenset[str]]:
    import graphlib

    order = graphlib.TopologicalSorter(units).static_order()
    return {u: units[u] for u in order if u in units}


def _is_chain(units: dict[str, frozenset[str]]) -> bool:
    """Whether running the units one after another loses no concurrency."""
    prev: str | None = None
    for unit, deps in units.items():
        if prev is not None and prev not in deps:
            return False
        prev = unit
    return True


class Run:
    """One request's way through the graph."""

    def __init__(
        self,
        plan: Plan,
        engine: Engine,
        request: InferRequest,
        deadline: float,
        max_fan_out: int,
        stats: Stats,
    ) -> None:
        self.plan = plan
        self.bound = plan.bound
        self.engine = engine
        self.request = request
        self.deadline = deadline
        self.max_fan_out = max_fan_out
        self.stats = stats
        #: Row environments of each fan-out once its rows ran.
        self.rows: dict[str, list[Env]] = {}
        self.counts: dict[str, int] = {}
        #: Rows waiting to be sent to a model node together, and the merged calls running.
        self.merging: dict[str, list[tuple[Arrays, asyncio.Future[Arrays]]]] = {}
        self.tasks: set[asyncio.Future[None]] = set()
        #: The version each model node ran on (for error messages).
        self.called: dict[str, str] = {}

    async def run(self) -> dict[str, Array]:
        request = self.request
        _check_inputs(self.plan, request)
        decl = self.bound.decl
        wanted = list(decl.outputs)
        if request.outputs is not None:
            for name in request.outputs:
                if name not in decl.outputs:
                    raise InvalidInput(
                        f"unknown output {name!r}; pipeline {decl.name!r} has outputs "
                        f"{', '.join(repr(o) for o in decl.outputs)}"
                    )
            wanted = list(request.outputs)
        env: Env = {f"{REQUEST}.{k}": v for k, v in request.inputs.items()}
        flat = self.plan.flat
        if flat is not None:  # a chain with no fan-out: plain awaits, no task per node
            for node, fast in flat:
                if fast is None:
                    await self._node(node, env, None)
                else:
                    await self._fast(node, fast, env)
        else:
            await self._units(self.plan.outer, self.plan.outer_chain, env, None)
        out: dict[str, Array] = {}
        for name in wanted:
            value = self._value(decl.outputs[name], env, None)
            if value is not None:
                out[name] = value
        return out

    async def _fast(self, bound: BoundNode, fast: Fast, env: Env) -> None:
        """`_node` for a plain model node: the same outcome, fewer steps (a 2-model pipeline
        should cost little more than its two model calls)."""
        t0 = time.perf_counter()
        try:
            inputs = {key: env[ref] for key, ref in fast.ins}
        except KeyError:
            return  # reads an absent tensor: skipped
        engine = self.engine
        request = self.request
        model = None
        try:
            remaining = self.deadline - time.perf_counter()
            if remaining <= 0:
                raise DeadlineExceeded("the request's deadline passed before this node could run")
            model = engine.ready_model(fast.model, fast.version)
            req = InferRequest(inputs, None, request.id, False, remaining, request.priority,
                               request.parameters)  # fmt: skip
            if fast.bytes_ins:
                req.datatypes = dict.fromkeys(fast.bytes_ins, "BYTES")
            response = await engine.infer_on(model, req)
        except ApplianceError as exc:
            fast.timer.observe(time.perf_counter() - t0)
            if model is not None:
                self.called[bound.node.name] = model.version
            raise self._named(bound, exc, None) from None
        outputs = response.outputs
        for own, key in fast.outs:
            value = outputs.get(own)
            if value is not None:
                env[key] = value
        t1 = time.perf_counter()
        fast.timer.observe(t1 - t0)
        if tracing.tracer is not None:
            _span(self.plan, bound, t0, t1)

    # -- scheduling ------------------------------------------------------------------------
    async def _units(
        self, units: Mapping[str, frozenset[str]], chain: bool, env: Env, row: int | None
    ) -> None:
        if chain:
            for unit in units:
                await self._unit(unit, env, row)
            return
        tasks: dict[str, asyncio.Future[None]] = {}

        async def after(unit: str, deps: list[asyncio.Future[None]]) -> None:
            for d in deps:
                await d
            await self._unit(unit, env, row)

        for unit, deps in units.items():
            tasks[unit] = asyncio.ensure_future(after(unit, [tasks[d] for d in deps]))
        try:
            await asyncio.gather(*tasks.values())
        except BaseException:
            for t in tasks.values():
                t.cancel()
            await asyncio.gather(*tasks.values(), return_exceptions=True)
            raise

    async def _unit(self, unit: str, env: Env, row: int | None) -> None:
        if unit.startswith("*"):
            await self._fan_out(unit[1:], env)
        else:
            await self._node(self.bound.nodes[unit], env, row)

    async def _fan_out(self, f: str, env: Env) -> None:
        """The nodes under fan-out `f`, once per row, all rows at once."""
        bound = self.bound.nodes[f]
        keys = [f"{f}.{graph}" for graph in bound.produces]
        present = [k for k in keys if k in env]
        n = self.counts.get(f)
        if n is None:  # the fan-out node was skipped: nothing runs under it
            self.rows[f] = []
            self.counts[f] = -1
            return
        envs = []
        for i in range(n):
            row_env = dict(env)
            for k in present:
                row_env[k] = env[k][i : i + 1]
            envs.append(row_env)
        block = self.plan.rows[f]
        chain = self.plan.row_chain[f]
        await asyncio.gather(*(self._units(block, chain, e, i) for i, e in enumerate(envs)))
        self.rows[f] = envs

    # -- values ----------------------------------------------------------------------------
    def _value(self, source: Source, env: Env, scope: str | None) -> Array | None:
        """The first present tensor of `source` as seen from `scope`: rows of a fan-out
        seen from outside it are gathered (absent if absent in any row)."""
        decl = self.bound.decl
        ref_scope = decl.scope_of(source[0])
        if ref_scope is None or scope is not None:
            for ref in source:
                value = env.get(f"{ref.node}.{ref.tensor}")
                if value is not None:
                    return value
            return None
        envs = self.rows.get(ref_scope)
        if envs is None or self.counts.get(ref_scope) == -1:
            return None  # the fan-out node did not run
        parts = []
        for e in envs:
            value = self._value(source, e, ref_scope)
            if value is None:
                return None
            parts.append(value)
        if parts:
            return np.concatenate(parts, axis=0)
        return self._empty(source)

    def _empty(self, source: Source) -> Array:
        """A gathered tensor of no rows: shape [0, ...] from the known spec."""
        for ref in source:
            spec = self.plan.specs.get(f"{ref.node}.{ref.tensor}")
            if spec is not None:
                return _empty_of(spec)
        return np.empty((0,), dtype=np.float32)

    # -- one node --------------------------------------------------------------------------
    async def _node(self, bound: BoundNode, env: Env, row: int | None) -> None:
        node = bound.node
        scope = node.scope
        if node.when is not None:
            value = self._value(node.when.source, env, scope)
            if value is None or value.size == 0 or not node.when.holds(float(np.max(value))):
                return
        inputs: dict[str, Array] = {}
        for key, source in node.inputs.items():
            value = self._value(source, env, scope)
            if value is None:
                return  # reads an absent tensor: skipped too
            inputs[key] = value
        t0 = time.perf_counter()
        try:
            outputs = await self._call(bound, inputs, row)
            if node.fan_out:
                self._rows_of(bound, outputs)
        except ApplianceError as exc:
            err = self._named(bound, exc, row)
            if node.optional:
                self.stats.optional_failed[node.name] = (
                    self.stats.optional_failed.get(node.name, 0) + 1
                )
                log.warning("%s (optional: its outputs are absent)", err.message)
                return
            raise err from None
        finally:
            t1 = time.perf_counter()
            self.plan.timers[node.name].observe(t1 - t0)
            if tracing.tracer is not None:
                _span(self.plan, bound, t0, t1, row)
        for own, graph_name in node.renames.items():
            if own in outputs:
                outputs[graph_name] = outputs.pop(own)
        for graph in bound.produces:
            value = outputs.get(graph)
            if value is not None:
                env[f"{node.name}.{graph}"] = value

    async def _call(
        self, bound: BoundNode, inputs: dict[str, Array], row: int | None
    ) -> dict[str, Array]:
        node = bound.node
        remaining = self.deadline - time.perf_counter()
        if remaining <= 0:
            raise DeadlineExceeded("the request's deadline passed before this node could run")
        if node.model is not None:
            engine = self.engine
            model = engine.ready_model(node.model, node.version)
            self.called[node.name] = model.version
            request = self.request
            req = InferRequest(
                inputs,
                id=request.id,
                timeout_s=remaining,
                priority=request.priority,
                parameters=request.parameters,
                datatypes={k: "BYTES" for k, v in inputs.items() if v.dtype.kind in "OSU"},
            )
            alone = row is None or self.counts.get(node.scope or "") == 1
            if not alone and _mergeable(model):
                return await self._merged(bound, model, req)
            # rows the model cannot take together go through its queue at once, for its
            # batcher to merge what it can
            response = await engine.infer_on(model, req, inline=alone)
            return dict(response.outputs)
        step = bound.step
        assert step is not None
        where = f"pipeline {self.bound.decl.name!r} node {node.name!r}"
        call = StepCall(self.request.parameters)
        if step.blocking:
            return await asyncio.to_thread(run_step, step, inputs, call, where)
        return run_step(step, inputs, call, where)

    async def _merged(self, bound: BoundNode, model: LoadedModel, req: InferRequest) -> Arrays:
        """One row's call to a model, merged with the other rows reaching the same node in
        the same turn of the event loop into one request along dimension 0 (what the model's
        dynamic batcher would do, without a queue entry per row)."""
        loop = asyncio.get_running_loop()
        name = bound.node.name
        waiting = self.merging.get(name)
        if waiting is None:
            waiting = self.merging[name] = []
            loop.call_soon(self._flush, name, model, req)
        future: asyncio.Future[Arrays] = loop.create_future()
        waiting.append((req.inputs, future))
        return await future

    def _flush(self, name: str, model: LoadedModel, first: InferRequest) -> None:
        waiting = self.merging.pop(name)
        task = asyncio.ensure_future(self._run_merged(model, first, waiting))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _run_merged(
        self,
        model: LoadedModel,
        first: InferRequest,
        waiting: list[tuple[Arrays, asyncio.Future[Arrays]]],
    ) -> None:
        try:
            sizes = [next(iter(inputs.values())).shape[0] for inputs, _ in waiting]
            keys = list(waiting[0][0])
            merged = {k: np.concatenate([inputs[k] for inputs, _ in waiting]) for k in keys}
            remaining = max(self.deadline - time.perf_counter(), 1e-6)
            req = InferRequest(merged, None, first.id, False, remaining, first.priority,
                               first.parameters, dict(first.datatypes))  # fmt: skip
            response = await self.engine.infer_on(model, req, inline=len(waiting) == 1)
            total = sum(sizes)
            for k, v in response.outputs.items():
                if v.ndim == 0 or v.shape[0] != total:
                    raise InferenceFailed(
                        f"output {k!r} has shape {list(v.shape)} for {total} rows sent together"
                    )
            start = 0
            for (_, future), n in zip(waiting, sizes, strict=True):
                part = {k: v[start : start + n] for k, v in response.outputs.items()}
                start += n
                if not future.done():
                    future.set_result(part)
        except BaseException as exc:
            for _, future in waiting:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise

    def _rows_of(self, bound: BoundNode, outputs: Mapping[str, Array]) -> None:
        counts = {k: (v.shape[0] if v.ndim else 1) for k, v in outputs.items()}
        if not counts:
            raise InvalidInput("a fan-out node with no outputs")
        n = next(iter(counts.values()))
        if any(c != n for c in counts.values()):
            raise ApplianceError(f"fan-out outputs disagree on their number of rows: {counts}")
        if n > self.max_fan_out:
            raise InvalidInput(f"fan-out of {n} rows is more than max_fan_out = {self.max_fan_out}")
        self.counts[bound.node.name] = n

    def _named(self, bound: BoundNode, exc: ApplianceError, row: int | None) -> ApplianceError:
        """The same error (class and status), its message naming the node and the model."""
        node = bound.node
        prefix = f"pipeline {self.bound.decl.name!r} node {node.name!r}"
        if exc.message.startswith(prefix):
            head = ""
            rest = exc.message
        else:
            if node.model is not None:
                version = self.called.get(node.name) or self._version(node.model, node.version)
                what = f"model {node.model!r}" + (f" version {version}" if version else "")
            else:
                what = f"step {node.step_type!r}"
            head = f"{prefix} ({what})"
            rest = exc.message
        at = f" row {row}" if row is not None else ""
        message = f"{head}{at}: {rest}" if head else rest
        err = copy.copy(exc)
        err.message = message
        err.args = (message,)
        return err

    def _version(self, name: str, pin: str | None) -> str | None:
        if pin is not None:
            return pin
        for model, version in self.bound.versions:
            if model == name:
                return version
        return None


def _span(plan: Plan, bound: BoundNode, t0: float, t1: float, row: int | None = None) -> None:
    """A pipeline node's span in the request's trace (only when traced)."""
    attrs: dict[str, Any] = {"appliance.pipeline": plan.name, "appliance.node": bound.node.name}
    if bound.node.model is not None:
        attrs["appliance.model"] = bound.node.model
    if row is not None:
        attrs["appliance.row"] = row
    tracing.record(f"node {bound.node.name}", t0, t1, attrs)


def _mergeable(model: LoadedModel) -> bool:
    """Whether rows sent to `model` may be merged into one request: its batcher would merge
    them too (every input and output has a dynamic first dimension), and it declares no
    processing of its own that would see the merged request."""
    runner = model.runner
    return runner is not None and runner.batching is not None and model.chain is None


def _check_inputs(plan: Plan, request: InferRequest) -> None:
    """The pipeline's own inputs: names, datatypes and shapes, each refused with a 400 naming
    it (values are checked by the models that read them)."""
    inputs = request.inputs
    signature = plan.in_signature
    if len(inputs) != len(signature.inputs):
        validate(signature, request, True)  # the precise message for a missing or unknown one
    declared = request.datatypes
    for name, datatype, dtype, rank, fixed in plan.in_checks:
        array = inputs.get(name)
        if array is None:
            validate(signature, request, True)
            return
        shape = array.shape
        if (
            (array.dtype != dtype and datatype_of(array) != datatype)
            or (declared and declared.get(name, datatype) != datatype)
            or len(shape) != rank
        ):
            validate(signature, request, True)
        for i, size in fixed:
            if shape[i] != size:
                validate(signature, request, True)


def _empty_of(spec: TensorSpec) -> Array:
    rest = tuple(max(d, 0) for d in spec.shape[1:])
    dtype = DATATYPES.get(spec.datatype, np.dtype(np.float32))
    return np.empty((0, *rest), dtype=dtype)


#: The pipeline's request counter label by status (the rest: "error").
OUTCOME = {400: "invalid", 404: "not_found", 503: "unavailable", 504: "timeout"}


async def execute(
    plan: Plan,
    engine: Engine,
    request: InferRequest,
    deadline: float,
    max_fan_out: int,
    stats: Stats,
    name: str,
    version: str,
    first: LoadedModel | None = None,
) -> InferResponse:
    """Run `request` through the plan of pipeline `name` and account for it: one coroutine,
    so that a pipeline of plain model nodes costs few frames over its models' own. `first`:
    the first node's model when the caller has just checked that it serves and is ready (not
    looked up again)."""
    try:
        chain = plan.chain
        if chain is None or request.outputs is not None:
            outputs = await Run(plan, engine, request, deadline, max_fan_out, stats).run()
        else:
            # A chain of plain model nodes (most pipelines): Run's steps, written out.
            given = request.inputs
            stated = request.datatypes
            checked = (
                plan.first_checks
                and len(given) == len(plan.in_keys)
                and (not stated or stated == plan.in_datatypes)
            )
            if not checked:
                _check_inputs(plan, request)
            # plain loops, not comprehensions: each of those is a call of its own before 3.12
            env: Env = {}
            for tensor, key in plan.in_keys:
                value = given.get(tensor)
                if value is None:
                    _check_inputs(plan, request)  # raises: the precise message
                env[key] = value  # type: ignore[assignment]
            rid, priority, parameters = request.id, request.priority, request.parameters
            perf = time.perf_counter
            t0 = perf()
            for bound, fast in chain:
                model, first = first, None
                try:
                    remaining = deadline - t0
                    if remaining <= 0:
                        raise DeadlineExceeded(
                            "the request's deadline passed before this node could run"
                        )
                    if model is None:
                        model = engine.ready_model(fast.model, fast.version)
                    inputs: Arrays = {}
                    for key, ref in fast.ins:
                        inputs[key] = env[ref]
                    req = InferRequest(inputs, None, rid, False, remaining, priority, parameters)
                    if fast.bytes_ins:
                        req.datatypes = dict.fromkeys(fast.bytes_ins, "BYTES")
                    response = await engine.infer_on(model, req)
                except ApplianceError as exc:
                    fast.timer.observe(perf() - t0)
                    if checked and isinstance(exc, InvalidInput) and bound is chain[0][0]:
                        _check_inputs(plan, request)  # the pipeline's own message first
                    run = Run(plan, engine, request, deadline, max_fan_out, stats)
                    if model is not None:
                        run.called[bound.node.name] = model.version
                    raise run._named(bound, exc, None) from None
                got = response.outputs
                for own, key in fast.outs:
                    value = got.get(own)
                    if value is not None:
                        env[key] = value
                t1 = perf()
                fast.timer.observe(t1 - t0)
                if tracing.tracer is not None:
                    _span(plan, bound, t0, t1)
                t0 = t1
            outputs = {}
            for tensor, key in plan.out_keys:
                if key in env:
                    outputs[tensor] = env[key]
    except ApplianceError as exc:
        outcome = OUTCOME.get(exc.status, "error")
        stats.outcomes[outcome] = stats.outcomes.get(outcome, 0) + 1
        raise
    stats.outcomes["success"] += 1
    return InferResponse(name, version, outputs, request.id)
