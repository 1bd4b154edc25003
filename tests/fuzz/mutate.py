"""Hypothesis strategies that break a valid JSON request in one place, and what to expect then.

A mutation replaces (or removes) the value at one path of a valid body with a value of the wrong
kind: an object, an array, null, a huge number, a NaN token, deep nesting, a long string. The
body is serialized with the standard library's `json` so that what no strict encoder writes
(NaN, Infinity, integers past 64 bits) still goes on the wire.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

Path = tuple[str | int, ...]


@dataclass(frozen=True)
class Raw:
    """A value given as JSON text: nesting deeper than Python's own recursion limit."""

    text: str


def nested_list(depth: int, leaf: Any = 1) -> Any:
    out: Any = leaf
    for _ in range(depth):
        out = [out]
    return out


def nested_dict(depth: int) -> Any:
    out: Any = {}
    for _ in range(depth):
        out = {"a": out}
    return out


#: Values of every JSON kind, weighted towards the ones a decoder trips on.
NASTY: st.SearchStrategy[Any] = st.one_of(
    st.sampled_from([None, True, False, {}, [], "", 0, -1, 1.5, [[]], [{}], {"": None}]),
    st.sampled_from([2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63) - 1, 2**100, -(2**100)]),
    st.sampled_from([1e308, -1e308, 5e-324, 1e-320]),
    st.sampled_from([math.nan, math.inf, -math.inf]),  # NaN / Infinity tokens on the wire
    st.floats(),
    st.integers(),
    st.text(max_size=12),
    st.sampled_from(["x" * 100_000, "\x00", "FP32", "BYTES", "1", "-1", "true", "null"]),
    st.integers(1, 70).map(nested_list),
    st.sampled_from([nested_list(200), nested_dict(50)]),
    st.sampled_from([Raw("[" * 2000 + "]" * 2000), Raw('{"a":' * 1100 + "{}" + "}" * 1100)]),
    st.lists(st.one_of(st.none(), st.integers(), st.text(max_size=3), st.just({})), max_size=4),
    st.dictionaries(st.text(max_size=6), st.one_of(st.none(), st.integers()), max_size=3),
)


def paths(node: Any, prefix: Path = ()) -> list[Path]:
    """Every path in a JSON tree, the root included (long arrays: their first elements only)."""
    out = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            out += paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node[:4]):
            out += paths(value, (*prefix, i))
    return out


def replaced(body: Any, path: Path, value: Any) -> Any:
    if not path:
        return value
    out = copy.deepcopy(body)
    node = out
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return out


def removed(body: Any, path: Path) -> Any:
    out = copy.deepcopy(body)
    node = out
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    return out


def field_of(path: Path) -> str | None:
    """The name a precise error names for a problem at `path`: the nearest object key."""
    for key in reversed(path):
        if isinstance(key, str):
            return key
    return None


_PLACEHOLDER = "\u0000raw-json-value\u0000"


@dataclass(frozen=True)
class Mutation:
    body: Any
    path: Path
    #: The key whose value changed or went missing (None: the whole body).
    field: str | None
    what: str
    #: The new value, when it is one the server's JSON parser must refuse as a whole (its error
    #: then cannot name a field): NaN, Infinity, or nesting past orjson's limit.
    unparsable: bool = False
    raw: Raw | None = None

    def wire(self) -> bytes:
        if self.raw is None:
            return dumps(self.body)
        text = dumps(replaced(self.body, self.path, _PLACEHOLDER)).decode()
        return text.replace(json.dumps(_PLACEHOLDER), self.raw.text).encode()

    @property
    def null(self) -> bool:
        """The change set an object's field to null."""
        return self.what == "= None" and bool(self.path) and isinstance(self.path[-1], str)

    def without(self) -> Any:
        """The body as parsed, with the changed field left out instead."""
        return parsed_like_server(removed(self.body, self.path))

    def as_parsed(self) -> Any:
        """The body as orjson reads it (integers past 64 bits become floats)."""
        return parsed_like_server(self.body)


def dumps(body: Any) -> bytes:
    """JSON text as a sloppy client writes it (NaN tokens, huge integers allowed)."""
    return json.dumps(body, allow_nan=True).encode("utf-8")


@st.composite
def mutations(draw: st.DrawFn, body: Any, skip: tuple[str, ...] = ()) -> Mutation:
    """`body` broken at one path: a value replaced by a nasty one, or an object key removed.
    Paths through a key in `skip` are left alone (e.g. a model name, which only selects)."""
    candidates = [p for p in paths(body) if not any(k in skip for k in p if isinstance(k, str))]
    path = draw(st.sampled_from(candidates))
    if path and isinstance(path[-1], str) and draw(st.integers(0, 5)) == 0:
        return Mutation(removed(body, path), path, field_of(path), "removed")
    value = draw(NASTY)
    if isinstance(value, Raw):
        return Mutation(replaced(body, path, None), path, field_of(path),
                        f"= <{len(value.text)} characters of nesting>", True, value)  # fmt: skip
    return Mutation(
        replaced(body, path, value), path, field_of(path), f"= {short(value)}", nonfinite(value)
    )


def short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def nonfinite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(nonfinite(v) for v in value.values())
    if isinstance(value, list):
        return any(nonfinite(v) for v in value)
    return False


def parsed_like_server(value: Any) -> Any:
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return value if -(2**63) <= value < 2**64 else float(value)
    if isinstance(value, dict):
        return {k: parsed_like_server(v) for k, v in value.items()}
    if isinstance(value, list):
        return [parsed_like_server(v) for v in value]
    return value
