"""Guardrails as steps, for BYTES (text) tensors and numeric outputs, declared in a model's
manifest or a pipeline node like any other step:

    {"type": "input_rules", "tensors": ["text"], "injection": "reject", "max_chars": 4000}
    {"type": "pii_mask", "tensors": ["answer"], "entities": ["all"], "style": "placeholder"}
    {"type": "validate", "action": "reject",
     "outputs": {"scores": {"minimum": 0, "maximum": 1, "finite": true, "shape": [-1, 3]},
                 "label": {"labels": ["ok", "defect"]}, "report": {"must_parse": "json"}}}

The keys besides `type`, `tensors` and `outputs` are those of the [guards.input] and
[guards.pii] sections (appliance/guards/config.py), checked the same way. A step rewrites the
tensors it names in place (same names, same shapes); `validate` writes nothing and raises
OutputInvalid (502) naming the output and rule, or with action "fallback" lets a task's
fallback model answer (the step runs below the router).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from ..errors import ConfigError, OutputInvalid
from ..guards.config import InputGuardsConfig, PiiGuardsConfig, build_section
from ..guards.outcomes import Hit
from ..guards.pii import ENTITIES, Custom, Masking, PiiMasker
from .base import Array, Arrays, Step, StepCall, StepContext, unknown_keys


def _tensors(config: Mapping[str, Any], ctx: StepContext) -> tuple[str, ...]:
    names = config.get("tensors")
    if names is None:
        found = tuple(n for n, spec in ctx.available.items() if spec.datatype == "BYTES")
        if not found and ctx.available:
            raise ctx.bad("tensors", "no BYTES tensor to read: name the tensors")
        return found
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        raise ctx.bad("tensors", "must be a non-empty list of tensor names")
    for n in names:
        spec = ctx.available.get(n)
        if ctx.available and spec is None:
            raise ctx.bad("tensors", f"no tensor {n!r} (known: {', '.join(ctx.available)})")
        if spec is not None and spec.datatype != "BYTES":
            raise ctx.bad("tensors", f"{n!r} is {spec.datatype}, not BYTES (text)")
    return tuple(names)


def _section(cls: Any, config: Mapping[str, Any], ctx: StepContext) -> Any:
    values = {k: v for k, v in config.items() if k not in ("type", "tensors")}
    try:
        return build_section(cls, values, ctx.where)
    except ConfigError as exc:
        raise ctx.bad("config", exc.message) from None


def _map_text(array: Array, change: Any) -> Array:
    out = np.empty(array.shape, dtype=object)
    flat, dest = array.reshape(-1), out.reshape(-1)
    for i, item in enumerate(flat):
        if isinstance(item, bytes):
            try:
                text = item.decode("utf-8")
            except UnicodeDecodeError:
                dest[i] = item
                continue
            dest[i] = change(text).encode("utf-8")
        elif isinstance(item, str):
            dest[i] = change(item)
        else:
            dest[i] = item
    return out


class InputRulesStep(Step):
    """The input rules (limits, hygiene, deny/allow, prompt injection) on BYTES inputs."""

    type: ClassVar[str] = "input_rules"

    def __init__(self, tensors: tuple[str, ...], rules: Any) -> None:
        self.reads = self.writes = tensors
        self.rules = rules

    @classmethod
    def parse(cls, config: Mapping[str, Any], ctx: StepContext) -> Step:
        from ..guards.policy import input_rules

        section = _section(InputGuardsConfig, config, ctx)
        rules = input_rules(section)
        if rules is None:
            raise ctx.bad("type", "declares no rule (limits, control_chars, injection, rules)")
        return cls(_tensors(config, ctx), rules)

    def run(self, tensors: Mapping[str, Array], call: StepCall) -> Arrays:
        hits: list[Hit] = []
        return {n: _map_text(tensors[n], lambda t: self.rules.check(t, hits)) for n in self.reads}

    def describe(self) -> dict[str, Any]:
        return {"type": self.type, "tensors": list(self.reads)}


class PiiMaskStep(Step):
    """Personal data and secrets masked in BYTES tensors."""

    type: ClassVar[str] = "pii_mask"

    def __init__(self, tensors: tuple[str, ...], masker: PiiMasker) -> None:
        self.reads = self.writes = tensors
        self.masker = masker

    @classmethod
    def parse(cls, config: Mapping[str, Any], ctx: StepContext) -> Step:
        section = _section(PiiGuardsConfig, {"entities": ["all"], **config}, ctx)
        if section.style == "hash" or any(s.style == "hash" for s in section.styles):
            raise ctx.bad("style", "'hash' needs a key file: use the [guards.pii] section")
        wanted = set(section.entities)
        masker = PiiMasker(
            entities=[e for e in ENTITIES if "all" in wanted or e in wanted],
            regions=tuple(section.phone_regions),
            masking={s.entity: Masking(s.style, s.keep_last, section.mask_text)
                     for s in section.styles},
            default=Masking(section.style, section.keep_last, section.mask_text),
            custom=[Custom(c.name, c.regex, c.max_length, c.placeholder) for c in section.custom],
        )  # fmt: skip
        return cls(_tensors(config, ctx), masker)

    def run(self, tensors: Mapping[str, Array], call: StepCall) -> Arrays:
        return {n: _map_text(tensors[n], lambda t: self.masker.mask(t)[0]) for n in self.reads}

    def describe(self) -> dict[str, Any]:
        return {"type": self.type, "tensors": list(self.reads)}


_TENSOR_KEYS = frozenset({"minimum", "maximum", "finite", "shape", "labels"})
_TEXT_KEYS = frozenset({"json_schema", "regex", "must_parse"})


class ValidateStep(Step):
    """Rules per output; a broken one fails the request (or sends it to a task's fallback)."""

    type: ClassVar[str] = "validate"

    def __init__(self, rules: dict[str, tuple[Any, Any]], action: str) -> None:
        self.rules = rules
        self.action = action
        self.reads = tuple(rules)
        self.writes = ()

    @classmethod
    def parse(cls, config: Mapping[str, Any], ctx: StepContext) -> Step:
        from ..guards.validate import TensorRules, TextRules

        unknown_keys(config, frozenset({"outputs", "action"}), ctx)
        action = config.get("action", "reject")
        if action not in ("reject", "fallback", "flag"):
            raise ctx.bad("action", "must be reject, fallback or flag")
        outputs = config.get("outputs")
        if not isinstance(outputs, Mapping) or not outputs:
            raise ctx.bad("outputs", "must be an object: output name -> its rules")
        rules: dict[str, tuple[Any, Any]] = {}
        for name, spec in outputs.items():
            where = f"outputs.{name}"
            if ctx.available and name not in ctx.available:
                raise ctx.bad(where, f"no such tensor (known: {', '.join(ctx.available)})")
            if not isinstance(spec, Mapping):
                raise ctx.bad(where, "must be an object of rules")
            extra = sorted(set(spec) - _TENSOR_KEYS - _TEXT_KEYS)
            if extra:
                raise ctx.bad(f"{where}.{extra[0]}", "unknown rule")
            try:
                tensor = TensorRules(
                    minimum=_number(spec.get("minimum")), maximum=_number(spec.get("maximum")),
                    finite=bool(spec.get("finite", False)), shape=_shape(spec.get("shape")),
                    labels=tuple(_labels(spec.get("labels"))),
                )  # fmt: skip
                schema = spec.get("json_schema")
                if isinstance(schema, str):
                    schema = json.loads(schema)
                text = TextRules(
                    json_schema=schema, regex=str(spec.get("regex", "")),
                    must_parse=spec.get("must_parse", ""),
                )  # fmt: skip
            except Exception as exc:  # jsonschema's, RE2's and our own errors alike
                raise ctx.bad(where, f"{type(exc).__name__}: {exc}") from None
            rules[name] = (tensor, text if text.active else None)
        return cls(rules, action)

    def run(self, tensors: Mapping[str, Array], call: StepCall) -> Arrays:
        for name, (tensor, text) in self.rules.items():
            array = tensors[name]
            violation = tensor.check(array)
            if violation is None and text is not None and array.dtype.kind in "OSU":
                for item in array.reshape(-1):
                    value = item.decode("utf-8", "replace") if isinstance(item, bytes) else item
                    violation = text.check(str(value))
                    if violation is not None:
                        break
            if violation is not None and self.action != "flag":
                raise OutputInvalid(
                    f"output {name!r} breaks rule {violation.rule!r}: {violation.detail}",
                    rule=violation.rule,
                    fallback=self.action == "fallback",
                )
        return {}

    def describe(self) -> dict[str, Any]:
        return {"type": self.type, "outputs": list(self.rules), "action": self.action}


def _number(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"a bound must be a number, got {value!r}")
    return float(value)


def _shape(value: Any) -> list[int] | None:
    if value is None:
        return None
    if not (isinstance(value, list) and all(isinstance(d, int) for d in value)):
        raise ValueError("shape must be a list of integers (-1: any size)")
    return value


def _labels(value: Any) -> list[str]:
    if value is None:
        return []
    if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise ValueError("labels must be a list of strings")
    return value
