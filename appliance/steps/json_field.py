"""`json_field`: one value out of a model's JSON text output.

    {"type": "json_field", "path": "result.items[0].label", "datatype": "FP32",
     "on_error": "fail", "max_bytes": 1048576}

Reads `text` (BYTES, each element a UTF-8 JSON document; a Markdown code fence around it,
as language models write, is removed first) and writes `value`, shaped like `text`: the value
at `path` in each document. A path is keys separated by dots and list indexes in brackets
(`a.b[0].c`, `items[-1]`, `["key.with.dots"]`). Without `datatype` the value is written as
BYTES (a string as its UTF-8, anything else as compact JSON); with a numeric `datatype` it must
be a number or true/false, converted like the cast step does.

A text that is not JSON (or longer than `max_bytes`), or has no such value, is the model's
failure: a 500 naming the step, unless `"on_error": "empty"`, which writes `value` with no rows
instead (shape [0, ...], the rest of `text`'s shape), so a client or a pipeline's `when` sees
that nothing was found.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from ..errors import InvalidInput
from ..tensors import DATATYPES, TensorSpec
from .base import Array, Arrays, Step, StepCall, StepContext, unknown_keys
from .options import (
    NAME_KEYS,
    NUMERIC_TYPES,
    Names,
    cast_to,
    check_spec,
    choice,
    datatype,
    integer,
    names,
    tensor,
)

#: One path part: `.key` (or `key` first), `[3]`, `["any key"]`.
_PART = re.compile(
    r'(?P<dot>\.)?(?P<key>[^.\[\]"]+)|\[(?P<index>-?\d+)\]|\[(?P<quoted>"(?:[^"\\]|\\.)*")\]'
)
_PLAIN = re.compile(r'[^.\[\]"]+')
_FENCE = re.compile(r"\A\s*```[\w+-]*[ \t]*\n(.*?)\n?[ \t]*```\s*\Z", re.DOTALL)

Path = tuple[str | int, ...]


def parse_path(path: str) -> Path:
    """`a.b[0]["c.d"]` -> ("a", "b", 0, "c.d"); ValueError saying where it went wrong."""
    parts: list[str | int] = []
    pos = 0
    while pos < len(path):
        m = _PART.match(path, pos)
        if m is None or (m["key"] is not None and bool(m["dot"]) != (pos > 0)):
            raise ValueError(f"cannot read {path[pos:]!r} (at character {pos})")
        if m["key"] is not None:
            parts.append(m["key"])
        elif m["index"] is not None:
            parts.append(int(m["index"]))
        else:
            parts.append(json.loads(m["quoted"]))
        pos = m.end()
    if not parts:
        raise ValueError("empty")
    return tuple(parts)


def show(path: Path) -> str:
    """A path as it is written (keys needing it in quotes)."""
    out = ""
    for p in path:
        if isinstance(p, int):
            out += f"[{p}]"
        elif _PLAIN.fullmatch(p):
            out += f".{p}" if out else p
        else:
            out += f"[{json.dumps(p)}]"
    return out


def pick(document: Any, path: Path) -> Any:
    """The value at `path`; LookupError naming the first part that is not there."""
    value = document
    for i, part in enumerate(path):
        where = show(path[:i]) or "the top"
        if isinstance(part, int):
            if not isinstance(value, list):
                raise LookupError(f"{where} is not a list")
            if not -len(value) <= part < len(value):
                raise LookupError(f"{where} has {len(value)} items, no [{part}]")
            value = value[part]
        else:
            if not isinstance(value, dict):
                raise LookupError(f"{where} is not an object")
            if part not in value:
                raise LookupError(f"{where} has no key {part!r}")
            value = value[part]
    return value


class JsonFieldStep(Step):
    """A value picked out of JSON text."""

    type: ClassVar[str] = "json_field"
    _keys: ClassVar[frozenset[str]] = NAME_KEYS | {"path", "datatype", "on_error", "max_bytes"}

    def __init__(
        self, names_: Names, path: Path, datatype_: str, on_error: str, max_bytes: int
    ) -> None:
        self.names, self.path, self.datatype = names_, path, datatype_
        self.on_error, self.max_bytes = on_error, max_bytes
        self.reads, self.writes = names_.reads, names_.writes
        self.optional = names_.optional

    @classmethod
    def parse(cls, config: Mapping[str, Any], ctx: StepContext) -> Step:
        unknown_keys(config, cls._keys, ctx)
        raw = config.get("path")
        if not isinstance(raw, str):
            raise ctx.bad("path", f"must be a path like a.b[0].c, got {raw!r}")
        try:
            path = parse_path(raw)
        except ValueError as exc:
            raise ctx.bad("path", f"{raw!r}: {exc}") from None
        target = datatype(config, "datatype", ctx, "BYTES", NUMERIC_TYPES | {"BYTES"})
        on_error = choice(config, "on_error", ctx, "fail", ("fail", "empty"))
        max_bytes = integer(config, "max_bytes", ctx, 1 << 20, 1, 1 << 30)
        n = names(config, ctx, ("text",), ("value",))
        check_spec(ctx, "inputs.text", n.inputs["text"], datatypes=frozenset({"BYTES"}))
        return cls(n, path, target, on_error, max_bytes)

    def specs(self, given: Mapping[str, TensorSpec]) -> dict[str, TensorSpec]:
        spec = given.get(self.names.inputs["text"])
        if spec is None:
            return {}
        name = self.names.outputs["value"]
        shape = spec.shape
        if self.on_error == "empty":  # the first dimension may be 0 instead
            shape = (-1, *shape[1:])
        return {name: TensorSpec(name, self.datatype, shape)}

    def run(self, tensors: Mapping[str, Array], call: StepCall) -> Arrays:
        name = self.names.inputs["text"]
        texts = tensor(tensors, name, "text")
        if texts.dtype.kind not in "OSU":
            raise InvalidInput(f"tensor {name!r} must be BYTES text, got {texts.dtype}")
        out_name = self.names.outputs["value"]
        try:
            values = [self._one(item, i, name) for i, item in enumerate(texts.reshape(-1))]
        except (ValueError, LookupError, RecursionError):
            if self.on_error == "empty":
                empty = (0, *texts.shape[1:])
                return {out_name: np.zeros(empty, DATATYPES[self.datatype])}
            raise
        if self.datatype == "BYTES":
            out = np.empty(len(values), dtype=object)
            out[:] = values
            return {out_name: out.reshape(texts.shape)}
        array = np.array(values)
        if array.dtype.kind not in "biuf":  # integers beyond int64
            array = np.array(values, dtype=np.float64)
        return {out_name: cast_to(array, self.datatype, out_name).reshape(texts.shape)}

    def _one(self, item: Any, i: int, name: str) -> Any:
        if isinstance(item, str):
            data = item.encode()
        elif isinstance(item, (bytes, bytearray)):
            data = bytes(item)
        else:
            raise ValueError(f"tensor {name!r} element {i} is not text: {type(item).__name__}")
        if len(data) > self.max_bytes:
            raise ValueError(
                f"tensor {name!r} element {i} is {len(data)} bytes, more than max_bytes "
                f"{self.max_bytes}"
            )
        text = data.decode("utf-8")
        fenced = _FENCE.match(text)
        if fenced:
            text = fenced.group(1)
        try:
            value = pick(json.loads(text), self.path)
        except json.JSONDecodeError as exc:
            raise ValueError(f"tensor {name!r} element {i} is not JSON: {exc}") from None
        except LookupError as exc:
            raise LookupError(f"tensor {name!r} element {i}: no {show(self.path)}: {exc}") from None
        if self.datatype == "BYTES":
            if isinstance(value, str):
                return value.encode()
            return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()
        if not isinstance(value, (int, float)):
            raise ValueError(
                f"tensor {name!r} element {i}: {show(self.path)} is {json.dumps(value)[:80]}, "
                f"not a number for {self.datatype}"
            )
        return value

    def describe(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "path": show(self.path),
            "datatype": self.datatype,
            "on_error": self.on_error,
            "max_bytes": self.max_bytes,
            **self.names.describe(),
        }
