"""Triton's trace setting API, at run time: `GET/POST /v2/trace/setting` and
`/v2/models/{name}/trace/setting` (api/trace_settings.py serves them).

    {"trace_level": ["TIMESTAMPS"], "trace_rate": "1000", "trace_count": "-1",
     "trace_mode": "opentelemetry"}

`trace_level` ["OFF"] stops tracing (for one model: even requests with a sampled
traceparent), ["TIMESTAMPS"] traces; `trace_rate` N traces one request in N of those that arrive
without a traceparent (the sampling ratio 1/N); `trace_count` N traces N more requests, then
none (-1: no limit). Values are strings as Triton writes them (numbers are taken too); a model's
setting overrides the server's key by key, and `null` puts a key back to the server's (for the
server: to the config's).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidInput

LEVELS = ("OFF", "TIMESTAMPS")
#: The keys a POST may carry.
KEYS = ("trace_level", "trace_rate", "trace_count")


@dataclass
class Setting:
    """One scope's values; None: inherited (a model's from the server's)."""

    on: bool | None = None
    ratio: float | None = None
    count: int | None = None


def _rate(ratio: float) -> str:
    return "0" if ratio <= 0 else str(max(1, round(1 / ratio)))


class TraceSettings:
    """The server's setting and the models' overrides; `decide` is asked once per request."""

    def __init__(self, ratio: float) -> None:
        self._default = Setting(True, ratio, -1)
        self.server = Setting(True, ratio, -1)
        self.models: dict[str, Setting] = {}

    def decide(self, model: str | None, sampled: bool | None) -> bool:
        """Whether to trace a request for `model`; `sampled` is its traceparent's flag (None:
        no traceparent): parent-based, so a sampled parent is traced and an unsampled one not."""
        server, own = self.server, self.models.get(model) if model and self.models else None
        on = own.on if own is not None and own.on is not None else server.on
        if not on or sampled is False:
            return False
        if sampled is None:
            ratio = own.ratio if own is not None and own.ratio is not None else server.ratio
            assert ratio is not None
            if ratio < 1.0 and random.random() >= ratio:  # noqa: S311 - sampling, not a secret
                return False
        scope = own if own is not None and own.count is not None else server
        if scope.count == 0:
            return False
        if scope.count is not None and scope.count > 0:
            scope.count -= 1
        return True

    def show(self, model: str | None = None) -> dict[str, Any]:
        """The effective setting (of a model: with what it inherits), as Triton writes it."""
        own = self.models.get(model, Setting()) if model else Setting()
        server = self.server
        on = own.on if own.on is not None else server.on
        ratio = own.ratio if own.ratio is not None else server.ratio
        count = own.count if own.count is not None else server.count
        assert ratio is not None
        return {
            "trace_level": ["TIMESTAMPS" if on else "OFF"],
            "trace_rate": _rate(ratio),
            "trace_count": str(count),
            "trace_mode": "opentelemetry",
        }

    def update(self, body: Any, model: str | None = None) -> dict[str, Any]:
        """Apply a POST body (checked whole before anything changes); the new setting."""
        if not isinstance(body, dict):
            raise InvalidInput("the trace setting must be a JSON object")
        for key in body:
            if key not in KEYS:
                raise InvalidInput(
                    f"{key}: not a trace setting here (known: {', '.join(KEYS)}; spans are "
                    "exported over OTLP as [tracing] says)"
                )
        default = self._default if model is None else Setting()
        target = self.server if model is None else self.models.get(model, Setting())
        new = Setting(target.on, target.ratio, target.count)
        if "trace_level" in body:
            new.on = default.on if body["trace_level"] is None else _level(body["trace_level"])
        if "trace_rate" in body:
            raw = body["trace_rate"]
            new.ratio = default.ratio if raw is None else 1 / _integer("trace_rate", raw, 1)
        if "trace_count" in body:
            raw = body["trace_count"]
            new.count = default.count if raw is None else _integer("trace_count", raw, -1)
        if model is None:
            self.server = new
        elif new == Setting():
            self.models.pop(model, None)
        else:
            self.models[model] = new
        return self.show(model)


def _level(value: Any) -> bool:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise InvalidInput('trace_level: must be a list of levels, such as ["TIMESTAMPS"]')
    for v in value:
        if v not in LEVELS:
            raise InvalidInput(
                f"trace_level: {v[:40]!r} is not a level here (one of {', '.join(LEVELS)}; "
                "tensors are not recorded)"
            )
    if "OFF" in value and len(set(value)) > 1:
        raise InvalidInput("trace_level: OFF cannot be combined with another level")
    return value != ["OFF"] and "OFF" not in value


def _integer(key: str, raw: Any, low: int) -> int:
    text = str(raw) if isinstance(raw, int) and not isinstance(raw, bool) else raw
    if not isinstance(text, str) or not text.strip().lstrip("-").isdigit():
        raise InvalidInput(f"{key}: must be an integer (as a string), got {str(raw)[:40]!r}")
    value = int(text)
    if value < low or value > 1 << 62:
        raise InvalidInput(f"{key}: must be an integer from {low}, got {value}")
    return value
