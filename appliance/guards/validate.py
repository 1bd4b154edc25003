"""Checks on what a model answered, before the client sees it.

Text: a JSON Schema (`jsonschema`, the validator built once), a regex the whole text must
match (RE2), or "must parse as JSON / XML". Tensors: a numeric range, finite values, a shape,
labels from an allowed set. A check returns the name of the first rule broken, or None; the
caller acts (reject: a 502 naming the rule; fallback: the task's fallback model answers;
flag: counted and logged).
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from .outcomes import Violation

OutputAction = Literal["reject", "fallback", "flag"]


@dataclass
class TextRules:
    json_schema: dict[str, Any] | None = None
    regex: str = ""
    must_parse: Literal["", "json", "xml"] = ""
    _validator: Any = field(init=False, default=None)
    _regex: Any = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.json_schema is not None:
            import jsonschema

            cls = jsonschema.validators.validator_for(self.json_schema)
            cls.check_schema(self.json_schema)
            self._validator = cls(self.json_schema)
        if self.regex:
            import re2

            self._regex = re2.compile(self.regex)

    @property
    def active(self) -> bool:
        return bool(self._validator is not None or self._regex is not None or self.must_parse)

    def check(self, text: str) -> Violation | None:
        if self._regex is not None and self._regex.fullmatch(text) is None:
            return Violation("regex", "the output does not match the pattern")
        if self.must_parse == "xml":
            try:
                # expat: no external entities fetched, entity expansion bounded (2.4.1+)
                ET.fromstring(text)  # noqa: S314
            except ET.ParseError as exc:
                return Violation("must_parse", f"the output is not XML: {exc}")
        if self.must_parse == "json" or self._validator is not None:
            try:
                value = json.loads(text)
            except ValueError as exc:
                return Violation("must_parse", f"the output is not JSON: {exc}")
            if self._validator is not None:
                error = next(iter(self._validator.iter_errors(value)), None)
                if error is not None:
                    where = "/".join(map(str, error.absolute_path)) or "(root)"
                    return Violation("json_schema", f"at {where}: {error.message[:200]}")
        return None


@dataclass
class TensorRules:
    minimum: float | None = None
    maximum: float | None = None
    finite: bool = False
    #: Expected shape; -1 is any size along that axis.
    shape: Sequence[int] | None = None
    #: Allowed values of a BYTES (string) output.
    labels: Sequence[str] = ()

    def check(self, array: np.ndarray[Any, Any]) -> Violation | None:
        if self.shape is not None:
            ok = len(array.shape) == len(self.shape) and all(
                want < 0 or want == got for want, got in zip(self.shape, array.shape, strict=True)
            )
            if not ok:
                return Violation("shape", f"shape {list(array.shape)}, expected {list(self.shape)}")
        if array.dtype.kind in "fiub" and array.size:
            if self.finite and array.dtype.kind == "f" and not np.isfinite(array).all():
                return Violation("finite", "the output holds NaN or infinity")
            if self.minimum is not None or self.maximum is not None:
                lo, hi = float(np.nanmin(array)), float(np.nanmax(array))
                if self.minimum is not None and lo < self.minimum:
                    return Violation("range", f"value {lo:g} below {self.minimum:g}")
                if self.maximum is not None and hi > self.maximum:
                    return Violation("range", f"value {hi:g} above {self.maximum:g}")
        if self.labels and array.dtype.kind in "OSU":
            allowed = set(self.labels)
            for item in array.reshape(-1):
                text = item.decode("utf-8", "replace") if isinstance(item, bytes) else str(item)
                if text not in allowed:
                    return Violation("labels", f"{text[:40]!r} is not an allowed label")
        return None
