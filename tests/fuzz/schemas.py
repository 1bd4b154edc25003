"""The published schemas in tests/schemas/, as jsonschema validators and Hypothesis strategies.

OpenAPI is JSON Schema with a few additions: `nullable: true` (OpenAPI 3.0) is rewritten as
"or null", and `$ref`s point into the document's own `components`, which every schema built here
carries along so that they resolve.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from hypothesis import strategies as st

HERE = Path(__file__).resolve().parent.parent / "schemas"


def _openapi_to_jsonschema(node: Any) -> Any:
    if isinstance(node, dict):
        out = {k: _openapi_to_jsonschema(v) for k, v in node.items() if k != "nullable"}
        if node.get("nullable") is True:
            return {"anyOf": [out, {"type": "null"}]}
        return out
    if isinstance(node, list):
        return [_openapi_to_jsonschema(v) for v in node]
    return node


class Document:
    """One OpenAPI document: `validator(name)` for a component schema, `schema(name)` for a
    self-contained JSON Schema of it (components carried along)."""

    def __init__(self, spec: dict[str, Any], validator: type[Any]) -> None:
        self.spec = spec
        self.components = _openapi_to_jsonschema(spec["components"])
        self._cls = validator

    def schema(self, name: str) -> dict[str, Any]:
        return {"components": self.components, "$ref": f"#/components/schemas/{name}"}

    def subschema(self, name: str, *path: str) -> dict[str, Any]:
        """A schema inside a component (a property's), still resolving against the document."""
        node: Any = self.components["schemas"][name]
        for key in path:
            node = node[key]
        return {"components": self.components, **node}

    def values(self, schema: Any, depth: int = 3) -> st.SearchStrategy[Any]:
        """Instances of `schema` (a component's name, or a schema inside this document).

        A small generator for the keywords these two documents use (hypothesis-jsonschema
        does not run on current Hypothesis). It aims at valid instances without promising
        them: `valid_values` filters with the validator. Recursive `$ref`s stop after
        `depth` levels."""
        if isinstance(schema, str):
            schema = {"$ref": f"#/components/schemas/{schema}"}
        return _strategy(self.components["schemas"], schema, depth, ())

    def properties(self, name: str) -> dict[str, Any]:
        """The top-level properties of an object component, through `allOf` and `$ref`."""
        out: dict[str, Any] = {}

        def walk(node: Any) -> None:
            ref = node.get("$ref")
            if isinstance(ref, str):
                walk(self.components["schemas"][ref.rsplit("/", 1)[-1]])
            for part in node.get("allOf", []):
                walk(part)
            out.update(node.get("properties", {}))

        walk(self.components["schemas"][name])
        return out

    def valid_values(self, name: str, depth: int = 3) -> st.SearchStrategy[Any]:
        """Instances of component `name` that its validator accepts."""
        return self.values(name, depth).filter(lambda v: self.is_valid(name, v))

    @functools.cache  # noqa: B019 (two documents, alive for the session)
    def validator(self, name: str) -> Any:
        return self._cls(self.schema(name))

    def errors(self, name: str, instance: Any) -> list[str]:
        """What is wrong with `instance` as a `name`; empty when it is valid."""
        return [
            f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message[:200]}"
            for e in self.validator(name).iter_errors(instance)
        ]

    def is_valid(self, name: str, instance: Any) -> bool:
        return bool(self.validator(name).is_valid(instance))


@functools.lru_cache(maxsize=1)
def oip() -> Document:
    """KServe Open Inference Protocol v2 REST (OpenAPI 3.0: JSON Schema draft 4 semantics)."""
    spec = yaml.safe_load((HERE / "open_inference_rest.yaml").read_text(encoding="utf-8"))
    return Document(spec, jsonschema.Draft4Validator)


@functools.lru_cache(maxsize=1)
def openai() -> Document:
    """The OpenAI routes the appliance serves (OpenAPI 3.1: JSON Schema 2020-12)."""
    spec = json.loads((HERE / "openai_v1.json").read_text(encoding="utf-8"))
    return Document(spec, jsonschema.Draft202012Validator)


@functools.lru_cache(maxsize=1)
def generate() -> Document:
    """The OIP generate extension (OpenAPI 3.1: JSON Schema 2020-12). Its `GenerateParameters`
    says `allOf: {$ref: itself}`, which is no JSON Schema (allOf is an array) and would refer
    to itself forever: left out, the rest is as published."""
    spec = yaml.safe_load((HERE / "generate_rest.yaml").read_text(encoding="utf-8"))
    del spec["components"]["schemas"]["GenerateParameters"]["allOf"]
    return Document(spec, jsonschema.Draft202012Validator)


_SCALARS: dict[str, st.SearchStrategy[Any]] = {
    "string": st.text(max_size=12),
    "integer": st.integers(-(2**31), 2**31),
    "number": st.floats(allow_nan=False, allow_infinity=False),
    "boolean": st.booleans(),
    "null": st.none(),
}


def _strategy(
    defs: dict[str, Any], node: Any, depth: int, seen: tuple[str, ...]
) -> st.SearchStrategy[Any]:
    if node is True or node == {}:
        return st.one_of(_SCALARS["string"], _SCALARS["integer"], _SCALARS["boolean"])
    if node is False:
        return st.nothing()
    ref = node.get("$ref")
    if isinstance(ref, str):
        target = ref.rsplit("/", 1)[-1]
        if seen.count(target) >= depth:
            return st.nothing()
        return st.deferred(lambda: _strategy(defs, defs[target], depth, (*seen, target)))
    if "const" in node:
        return st.just(node["const"])
    if "enum" in node:
        return st.sampled_from(node["enum"])
    for key in ("anyOf", "oneOf"):
        if key in node:
            rest = {k: v for k, v in node.items() if k != key}
            return st.one_of(
                [_strategy(defs, {**rest, **branch}, depth, seen) for branch in node[key]]
            )
    if "allOf" in node:
        merged = {k: v for k, v in node.items() if k != "allOf"}
        for part in node["allOf"]:
            while "$ref" in part:
                part = defs[part["$ref"].rsplit("/", 1)[-1]]
            merged = _merge(merged, part)
        return _strategy(defs, merged, depth, seen)
    kind = node.get("type")
    if isinstance(kind, list):
        return st.one_of([_strategy(defs, {**node, "type": k}, depth, seen) for k in kind])
    if kind == "object" or "properties" in node:
        return _object(defs, node, depth, seen)
    if kind == "array":
        items = node.get("items", {})
        return st.lists(
            _strategy(defs, items, depth, seen),
            min_size=node.get("minItems", 0),
            max_size=min(node.get("maxItems", 3), max(3, node.get("minItems", 0))),
        )
    if kind == "string":
        return st.text(min_size=node.get("minLength", 0), max_size=node.get("maxLength", 12))
    if kind in ("integer", "number"):
        lo, hi = node.get("minimum"), node.get("maximum")
        if kind == "integer":
            return st.integers(
                None if lo is None else int(lo), None if hi is None else min(int(hi), 2**63 - 1)
            )
        return st.floats(lo, hi, allow_nan=False, allow_infinity=False)
    if kind in _SCALARS:
        return _SCALARS[kind]
    return _strategy(defs, True, depth, seen)


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = {**a, **{k: v for k, v in b.items() if k not in ("properties", "required")}}
    out["properties"] = {**a.get("properties", {}), **b.get("properties", {})}
    out["required"] = sorted(set(a.get("required", [])) | set(b.get("required", [])))
    return out


def _object(
    defs: dict[str, Any], node: dict[str, Any], depth: int, seen: tuple[str, ...]
) -> st.SearchStrategy[Any]:
    props = node.get("properties", {})
    required = [k for k in node.get("required", []) if k in props]
    optional = [k for k in props if k not in required]

    @st.composite
    def build(draw: st.DrawFn) -> dict[str, Any]:
        out = {k: draw(_strategy(defs, props[k], depth, seen)) for k in required}
        for k in (
            draw(st.lists(st.sampled_from(optional), unique=True, max_size=4)) if optional else []
        ):
            out[k] = draw(_strategy(defs, props[k], depth, seen))
        return out

    return build()
