"""A pipeline declaration: parsed, checked, and bound to the models that serve its nodes.

Two passes, because a declaration is checked before its models may be loaded:

- `parse` checks the document alone (keys, names, references to nodes, cycles, `when`,
  `gather`, fan-out scopes, limits, step types) and says which fan-out each node runs under.
  It runs at `models add --pipeline`, at start for a config's pipeline, and refuses the
  declaration with a message naming the node and the key.
- `bind` checks it against the models' signatures (unknown models, unknown tensors, dtype and
  shape mismatches between a producer and a consumer) and builds the steps with the specs of
  what they read. It runs whenever the models a pipeline uses change (load, version switch).

The format is /work/briefs16/pipeline-format.md, kept in the README: nodes are models or
steps, wired by `"<node>.<tensor>"` references split at the first dot.
"""

from __future__ import annotations

import graphlib
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import ApplianceError, ModelError
from ..steps import get_step, parse_step
from ..steps.base import Step, StepContext
from ..tensors import DATATYPES, Signature, TensorSpec

#: Datatypes a `when` condition can compare.
NUMBERS = frozenset(DATATYPES) - {"BYTES"}
#: The name that stands for the pipeline's own inputs in a reference.
REQUEST = "request"
_NODE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")
_OPS: dict[str, Callable[[float, float], bool]] = {
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
}
_NODE_KEYS = frozenset(
    {"name", "model", "version", "step", "inputs", "outputs", "fan_out", "gather", "when",
     "optional"}
)  # fmt: skip
_TOP_KEYS = frozenset({"kind", "inputs", "nodes", "outputs", "templates", "description"})


@dataclass(frozen=True)
class Ref:
    """One tensor reference: `<node>.<tensor>`."""

    node: str
    tensor: str

    def __str__(self) -> str:
        return f"{self.node}.{self.tensor}"


#: A source: references tried in order, the first present one is used.
Source = tuple[Ref, ...]


def show(source: Source) -> str:
    return str(source[0]) if len(source) == 1 else "[" + ", ".join(map(str, source)) + "]"


@dataclass(frozen=True)
class When:
    source: Source
    op: str
    value: float

    def holds(self, value: float) -> bool:
        return _OPS[self.op](value, self.value)


@dataclass
class Node:
    name: str
    #: A model node: the served model's name (and pinned version); else a step node.
    model: str | None
    version: str | None
    step: Mapping[str, Any] | None
    #: The node's own input name -> where it comes from.
    inputs: dict[str, Source]
    #: The node's output name -> the name the graph knows it by.
    renames: dict[str, str]
    fan_out: bool
    gather: str | None
    when: When | None
    optional: bool
    #: Filled by `parse`: the fan-out node whose rows this node runs once per (None: once per
    #: request), and the nodes it waits for.
    scope: str | None = None
    deps: frozenset[str] = frozenset()

    @property
    def what(self) -> str:
        return f"model {self.model!r}" if self.model else f"step {self.step_type!r}"

    @property
    def step_type(self) -> str:
        return str(self.step["type"]) if self.step else ""

    def sources(self) -> list[Source]:
        out = list(self.inputs.values())
        if self.when is not None:
            out.append(self.when.source)
        return out


@dataclass
class Declaration:
    """A parsed declaration: nodes in an order that runs every node after its inputs."""

    name: str
    inputs: tuple[TensorSpec, ...]
    nodes: dict[str, Node]
    #: Pipeline output name -> source.
    outputs: dict[str, Source]
    templates: dict[str, str] = field(default_factory=dict)
    raw: Mapping[str, Any] = field(default_factory=dict)

    def models(self) -> list[tuple[str, str | None]]:
        """The models its nodes call (name, pinned version), in order, once each."""
        seen: dict[tuple[str, str | None], None] = {}
        for n in self.nodes.values():
            if n.model is not None:
                seen[(n.model, n.version)] = None
        return list(seen)

    def scope_of(self, ref: Ref) -> str | None:
        """The fan-out whose rows tensor `ref` lives in (None: one per request)."""
        if ref.node == REQUEST:
            return None
        node = self.nodes[ref.node]
        return node.name if node.fan_out else node.scope


class _Where:
    def __init__(self, pipeline: str) -> None:
        self.pipeline = pipeline

    def bad(self, where: str, key: str, why: str) -> ModelError:
        return ModelError(f"pipeline {self.pipeline!r}: {where}: {key}: {why}")


def _ref(text: Any, w: _Where, where: str, key: str) -> Ref:
    if not isinstance(text, str) or "." not in text:
        raise w.bad(where, key, f"a reference is '<node>.<tensor>', got {text!r}")
    node, _, tensor = text.partition(".")
    if not node or not tensor:
        raise w.bad(where, key, f"a reference is '<node>.<tensor>', got {text!r}")
    return Ref(node, tensor)


def _source(value: Any, w: _Where, where: str, key: str) -> Source:
    if isinstance(value, list):
        if not value:
            raise w.bad(where, key, "a list of references must not be empty")
        return tuple(_ref(v, w, where, f"{key}[{i}]") for i, v in enumerate(value))
    return (_ref(value, w, where, key),)


def _spec(obj: Any, w: _Where, where: str) -> TensorSpec:
    if not isinstance(obj, Mapping):
        raise w.bad(where, "inputs", f"each input is an object with name, datatype, shape: {obj!r}")
    name, datatype, shape = obj.get("name"), obj.get("datatype"), obj.get("shape")
    if not isinstance(name, str) or not name:
        raise w.bad(where, "name", "must be a non-empty string")
    if datatype not in DATATYPES:
        raise w.bad(where, "datatype", f"must be one of {', '.join(DATATYPES)}, got {datatype!r}")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= -1 for d in shape
    ):
        raise w.bad(where, "shape", f"must be a list of integers (-1: any size), got {shape!r}")
    unknown = sorted(set(obj) - {"name", "datatype", "shape"})
    if unknown:
        raise w.bad(where, unknown[0], "unknown key (known: name, datatype, shape)")
    return TensorSpec(name, str(datatype), tuple(shape))


def parse(doc: Any, name: str, max_nodes: int = 64) -> Declaration:
    """Check a declaration on its own (see the module docstring); ModelError naming the node
    and the key when it is wrong."""
    w = _Where(name)
    if not isinstance(doc, Mapping):
        raise ModelError(f"pipeline {name!r}: a declaration is a JSON object")
    unknown = sorted(set(doc) - _TOP_KEYS)
    if unknown:
        raise w.bad(
            "declaration", unknown[0], f"unknown key (known: {', '.join(sorted(_TOP_KEYS))})"
        )
    if doc.get("kind", "pipeline") != "pipeline":
        raise w.bad("declaration", "kind", f"must be 'pipeline', got {doc.get('kind')!r}")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise w.bad("declaration", "inputs", "must list the pipeline's inputs")
    inputs = tuple(_spec(t, w, f"inputs[{i}]") for i, t in enumerate(raw_inputs))
    input_names = {t.name for t in inputs}
    if len(input_names) != len(inputs):
        raise w.bad("declaration", "inputs", "input names must be unique")
    raw_nodes = doc.get("nodes")
    if not isinstance(raw_nodes, list) or not raw_nodes:
        raise w.bad("declaration", "nodes", "must list at least one node")
    if len(raw_nodes) > max_nodes:
        raise w.bad(
            "declaration", "nodes", f"{len(raw_nodes)} nodes, more than max_nodes = {max_nodes}"
        )
    nodes: dict[str, Node] = {}
    for i, raw in enumerate(raw_nodes):
        node = _node(raw, w, f"nodes[{i}]")
        if node.name in nodes:
            raise w.bad(f"node {node.name!r}", "name", "another node has this name")
        nodes[node.name] = node
    raw_outputs = doc.get("outputs")
    if not isinstance(raw_outputs, list) or not raw_outputs:
        raise w.bad("declaration", "outputs", "must list the pipeline's outputs")
    outputs: dict[str, Source] = {}
    for i, out in enumerate(raw_outputs):
        where = f"outputs[{i}]"
        if not isinstance(out, Mapping) or not isinstance(out.get("name"), str) or not out["name"]:
            raise w.bad(where, "name", 'each output is {"name": ..., "source": ...}')
        extra = sorted(set(out) - {"name", "source"})
        if extra:
            raise w.bad(where, extra[0], "unknown key (known: name, source)")
        if out["name"] in outputs:
            raise w.bad(where, "name", f"output {out['name']!r} is listed twice")
        outputs[out["name"]] = _source(out.get("source"), w, f"output {out['name']!r}", "source")
    templates = doc.get("templates") or {}
    if not isinstance(templates, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in templates.items()
    ):
        raise w.bad("declaration", "templates", "must map a format name to a template file name")
    decl = Declaration(name, inputs, nodes, outputs, dict(templates), doc)
    _check_references(decl, w, input_names)
    _order(decl, w)
    _scopes(decl, w)
    return decl


def _node(raw: Any, w: _Where, where: str) -> Node:
    if not isinstance(raw, Mapping):
        raise w.bad(where, "node", "each node is a JSON object")
    name = raw.get("name")
    if not isinstance(name, str) or not _NODE_NAME.fullmatch(name):
        raise w.bad(where, "name", "1-64 letters, digits, '_' or '-', starting with a letter, "
                    f"got {name!r}")  # fmt: skip
    if name == REQUEST:
        raise w.bad(where, "name", f"{REQUEST!r} is reserved for the pipeline's inputs")
    where = f"node {name!r}"
    unknown = sorted(set(raw) - _NODE_KEYS)
    if unknown:
        raise w.bad(where, unknown[0], f"unknown key (known: {', '.join(sorted(_NODE_KEYS))})")
    model, step = raw.get("model"), raw.get("step")
    if (model is None) == (step is None):
        raise w.bad(where, "model", "a node is either a 'model' or a 'step'")
    version = raw.get("version")
    if model is not None:
        if not isinstance(model, str) or not model:
            raise w.bad(where, "model", f"must name a served model, got {model!r}")
        if version is not None and not isinstance(version, (str, int)):
            raise w.bad(where, "version", f"must be a string, got {version!r}")
    elif version is not None:
        raise w.bad(where, "version", "only a model node has a version")
    if step is not None:
        if not isinstance(step, Mapping) or not isinstance(step.get("type"), str):
            raise w.bad(where, "step", "a step is a JSON object with a 'type'")
        try:
            get_step(step["type"])  # an unknown type or a plugin that does not import
        except ApplianceError as exc:
            raise w.bad(where, "step.type", exc.message) from None
    raw_inputs = raw.get("inputs", {})
    if not isinstance(raw_inputs, Mapping):
        raise w.bad(where, "inputs", "must map the node's input names to references")
    inputs = {str(k): _source(v, w, where, f"inputs.{k}") for k, v in raw_inputs.items()}
    renames = raw.get("outputs", {})
    if not isinstance(renames, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) and v for k, v in renames.items()
    ):
        raise w.bad(where, "outputs", "must map the node's output names to new names")
    if len(set(renames.values())) != len(renames):
        raise w.bad(where, "outputs", "two outputs renamed to the same name")
    for key in ("fan_out", "optional"):
        if not isinstance(raw.get(key, False), bool):
            raise w.bad(where, key, f"must be true or false, got {raw[key]!r}")
    gather = raw.get("gather")
    if gather is not None and not isinstance(gather, str):
        raise w.bad(where, "gather", f"must name a fan-out node, got {gather!r}")
    when = None
    if raw.get("when") is not None:
        when = _when(raw["when"], w, where)
    return Node(
        name, model, None if version is None else str(version), step, inputs, dict(renames),
        bool(raw.get("fan_out", False)), gather, when, bool(raw.get("optional", False)),
    )  # fmt: skip


def _when(raw: Any, w: _Where, where: str) -> When:
    if not isinstance(raw, Mapping):
        raise w.bad(where, "when", 'must be {"source": ..., "op": ..., "value": ...}')
    extra = sorted(set(raw) - {"source", "op", "value"})
    if extra:
        raise w.bad(where, f"when.{extra[0]}", "unknown key (known: source, op, value)")
    op, value = raw.get("op"), raw.get("value")
    if op not in _OPS:
        raise w.bad(where, "when.op", f"must be one of {' '.join(_OPS)}, got {op!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise w.bad(where, "when.value", f"must be a finite number, got {value!r}")
    return When(_source(raw.get("source"), w, where, "when.source"), str(op), float(value))


def _check_references(decl: Declaration, w: _Where, input_names: set[str]) -> None:
    def check(source: Source, where: str, key: str) -> None:
        for ref in source:
            if ref.node == REQUEST:
                if ref.tensor not in input_names:
                    raise w.bad(where, key, f"{ref}: the pipeline has no input {ref.tensor!r} "
                                f"(inputs: {', '.join(sorted(input_names))})")  # fmt: skip
            elif ref.node not in decl.nodes:
                raise w.bad(where, key, f"{ref}: no node is named {ref.node!r}")

    for node in decl.nodes.values():
        where = f"node {node.name!r}"
        for key, source in node.inputs.items():
            check(source, where, f"inputs.{key}")
        if node.when is not None:
            check(node.when.source, where, "when.source")
        if node.gather is not None and node.gather not in decl.nodes:
            raise w.bad(where, "gather", f"no node is named {node.gather!r}")
    for out, source in decl.outputs.items():
        check(source, f"output {out!r}", "source")


def _order(decl: Declaration, w: _Where) -> None:
    """Nodes sorted so that each comes after what it reads; a cycle is named."""
    for node in decl.nodes.values():
        deps = {ref.node for s in node.sources() for ref in s if ref.node != REQUEST}
        if node.gather is not None:
            deps.add(node.gather)
        node.deps = frozenset(deps)
    sorter = graphlib.TopologicalSorter({n.name: n.deps for n in decl.nodes.values()})
    try:
        order = list(sorter.static_order())
    except graphlib.CycleError as exc:
        cycle = exc.args[1]
        raise w.bad(
            f"node {cycle[0]!r}", "inputs", "the nodes form a cycle: " + " -> ".join(cycle)
        ) from None
    decl.nodes = {name: decl.nodes[name] for name in order}


def _scopes(decl: Declaration, w: _Where) -> None:
    """Which fan-out each node runs under; one level of fan-out, gathered where declared."""
    ancestors: dict[str, set[str]] = {}
    for node in decl.nodes.values():
        ancestors[node.name] = set(node.deps).union(*(ancestors[d] for d in node.deps))
    for node in decl.nodes.values():
        where = f"node {node.name!r}"
        scopes = set()
        for key, source in [*node.inputs.items(), *(
            [("when.source", node.when.source)] if node.when else []
        )]:  # fmt: skip
            found = {decl.scope_of(ref) for ref in source}
            if len(found) > 1:
                raise w.bad(where, key, "the references of one list must come from the same "
                            "fan-out (or none)")  # fmt: skip
            scopes |= found
        rows = {s for s in scopes if s is not None}
        if node.gather is not None:
            g = decl.nodes[node.gather]
            if not g.fan_out or g.name not in ancestors[node.name]:
                raise w.bad(where, "gather", f"{node.gather!r} is not a fan-out node upstream "
                            "of this node")  # fmt: skip
            if rows - {g.name}:
                raise w.bad(where, "gather", f"the node also reads rows of {sorted(rows)[0]!r}")
            node.scope = None
        else:
            if len(rows) > 1:
                raise w.bad(where, "inputs", f"reads rows of two fan-outs: {sorted(rows)}")
            node.scope = next(iter(rows), None)
        if node.fan_out and node.scope is not None:
            raise w.bad(where, "fan_out", f"runs once per row of {node.scope!r} already: a "
                        "fan-out inside a fan-out is not supported (gather first)")  # fmt: skip
    for out, source in decl.outputs.items():
        if len({decl.scope_of(ref) for ref in source}) > 1:
            raise w.bad(f"output {out!r}", "source", "the references of one list must come "
                        "from the same fan-out (or none)")  # fmt: skip


# -- binding to the models -------------------------------------------------------------------


@dataclass
class BoundNode:
    node: Node
    #: The node's input name -> spec of what it receives (per row inside a fan-out).
    given: dict[str, TensorSpec]
    #: Graph name of each output -> the node's own output name.
    produces: dict[str, str]
    step: Step | None = None
    #: A model node's input specs as its model declares them (empty when it publishes none).
    wanted: Mapping[str, TensorSpec] = field(default_factory=dict)


@dataclass
class Bound:
    """A declaration checked against its models: what each node gets and gives."""

    decl: Declaration
    nodes: dict[str, BoundNode]
    #: Every tensor's spec as produced (before per-row or gathered views): "node.tensor".
    specs: dict[str, TensorSpec]
    signature: Signature
    #: The model versions bound to: (name, version) of each model node.
    versions: tuple[tuple[str, str], ...] = ()


#: What a model node sees of a model: its signature and version; None when not served.
Lookup = Callable[[str, str | None], "tuple[str, Signature] | None"]


def _view(spec: TensorSpec, rows: bool, gathered: bool) -> TensorSpec:
    shape = spec.shape
    if shape and rows:
        shape = (1, *shape[1:])
    elif shape and gathered:
        shape = (-1, *shape[1:])
    return TensorSpec(spec.name, spec.datatype, shape)


def _compatible(given: tuple[int, ...], wanted: tuple[int, ...]) -> bool:
    if not given or not wanted:
        return True  # a scalar or unknown shape: the model checks it per request
    if len(given) != len(wanted):
        return False
    return all(a < 0 or b < 0 or a == b for a, b in zip(given, wanted, strict=True))


def bind(decl: Declaration, lookup: Lookup, strict: bool = True) -> Bound:
    """Check `decl` against the models `lookup` finds and build its steps.

    `strict`: a model `lookup` does not know is an error (at load); not strict (at `models
    add`, before the models are in the store), what depends on it is left unchecked."""
    w = _Where(decl.name)
    specs: dict[str, TensorSpec] = {f"{REQUEST}.{t.name}": t for t in decl.inputs}
    known: set[str] = set(specs)  # tensors that exist, spec known or not
    unknown_from: set[str] = set()  # nodes whose outputs are not known (not strict)
    nodes: dict[str, BoundNode] = {}
    versions: list[tuple[str, str]] = []

    def resolve(source: Source, scope: str | None, where: str, key: str) -> TensorSpec | None:
        out: TensorSpec | None = None
        for ref in source:
            text = str(ref)
            if ref.node in unknown_from:
                continue
            if text not in known:
                producer = decl.nodes[ref.node]
                have = sorted(t.partition(".")[2] for t in known if t.startswith(ref.node + "."))
                raise w.bad(
                    where,
                    key,
                    f"{text}: node {ref.node!r} ({producer.what}) has no output "
                    f"{ref.tensor!r} (it has: {', '.join(have) or 'none'})",
                )
            spec = specs.get(text)
            if spec is None:
                continue
            ref_scope = decl.scope_of(ref)
            spec = _view(spec, rows=ref_scope is not None and scope is not None,
                         gathered=ref_scope is not None and scope is None)  # fmt: skip
            if out is not None and out.datatype != spec.datatype:
                raise w.bad(where, key, f"{text} is {spec.datatype} but {source[0]} is "
                            f"{out.datatype}: the references of one list must agree")  # fmt: skip
            out = out or spec
        return out

    for node in decl.nodes.values():
        where = f"node {node.name!r}"
        given: dict[str, TensorSpec] = {}
        unchecked = False
        for key, source in node.inputs.items():
            if all(ref.node in unknown_from for ref in source):
                unchecked = True
                continue
            spec = resolve(source, node.scope, where, f"inputs.{key}")
            if spec is not None:
                given[key] = TensorSpec(key, spec.datatype, spec.shape)
        if node.when is not None:
            spec = resolve(node.when.source, node.scope, where, "when.source")
            if spec is not None and spec.datatype not in NUMBERS:
                raise w.bad(where, "when.source", f"{show(node.when.source)} is "
                            f"{spec.datatype}: a condition compares numbers")  # fmt: skip
        bound = BoundNode(node, given, {})
        outputs: dict[str, TensorSpec | None] = {}
        if node.model is not None:
            found = lookup(node.model, node.version)
            if found is None:
                if strict:
                    pin = f" version {node.version}" if node.version else ""
                    raise w.bad(where, "model", f"no model {node.model!r}{pin} is served")
                unknown_from.add(node.name)
                nodes[node.name] = bound
                continue
            version, sig = found
            versions.append((node.model, version))
            _check_model_inputs(node, sig, given, w, where, unchecked)
            bound.wanted = sig.input_by_name
            outputs = {t.name: t for t in sig.outputs}
        else:
            assert node.step is not None
            # what is known of its inputs, or nothing (a partial view would refuse a mapped
            # optional input as an extra one)
            ctx = StepContext(
                f"pipeline {decl.name!r} node {node.name!r}", {} if unchecked else given
            )
            try:
                step = parse_step(node.step, ctx)
            except ApplianceError as exc:
                raise ModelError(exc.message if ctx.where in exc.message
                                 else f"{ctx.where}: step: {exc.message}") from None  # fmt: skip
            missing = [r for r in step.reads if r not in node.inputs and r not in step.optional]
            if missing:
                raise w.bad(where, f"inputs.{missing[0]}", f"the {node.step_type!r} step reads "
                            f"{missing[0]!r}: map it to a reference")  # fmt: skip
            extra = sorted(set(node.inputs) - set(step.reads))
            if extra and step.reads:
                raise w.bad(where, f"inputs.{extra[0]}", f"the {node.step_type!r} step reads "
                            f"only {', '.join(step.reads)}")  # fmt: skip
            bound.step = step
            written = step.specs(given) if not unchecked else {}
            outputs = {name: written.get(name) for name in step.writes}
        for own in node.renames:
            if own not in outputs:
                raise w.bad(where, f"outputs.{own}", f"{node.what} has no output {own!r} "
                            f"(it has: {', '.join(outputs) or 'none'})")  # fmt: skip
        for own, spec in outputs.items():
            graph = node.renames.get(own, own)
            bound.produces[graph] = own
            known.add(f"{node.name}.{graph}")
            if spec is not None:
                specs[f"{node.name}.{graph}"] = TensorSpec(graph, spec.datatype, spec.shape)
        nodes[node.name] = bound

    out_specs: list[TensorSpec] = []
    for out, source in decl.outputs.items():
        spec = resolve(source, None, f"output {out!r}", "source")
        if spec is not None:
            out_specs.append(TensorSpec(out, spec.datatype, spec.shape))
    signature = Signature(decl.inputs, tuple(out_specs))
    return Bound(decl, nodes, specs, signature, tuple(versions))


def _check_model_inputs(
    node: Node, sig: Signature, given: Mapping[str, TensorSpec], w: _Where, where: str,
    unchecked: bool,
) -> None:  # fmt: skip
    wanted = sig.input_by_name
    if not wanted:
        return  # a model that publishes no signature (a file served as is): checked per request
    for key in node.inputs:
        if key not in wanted:
            raise w.bad(where, f"inputs.{key}", f"model {node.model!r} has no input {key!r} "
                        f"(inputs: {', '.join(wanted)})")  # fmt: skip
    if not unchecked:
        for key in wanted:
            if key not in node.inputs:
                raise w.bad(where, "inputs", f"model {node.model!r} needs input {key!r}")
    for key, spec in given.items():
        want = wanted[key]
        source = show(node.inputs[key])
        if spec.datatype != want.datatype:
            raise w.bad(where, f"inputs.{key}", f"{source} is {spec.datatype} but model "
                        f"{node.model!r} takes {want.datatype}")  # fmt: skip
        if not _compatible(spec.shape, want.shape):
            raise w.bad(where, f"inputs.{key}", f"{source} has shape {list(spec.shape)} but "
                        f"model {node.model!r} takes {list(want.shape)}")  # fmt: skip
