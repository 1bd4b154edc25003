"""The signed `custom` field of a model target, shared by the hub and the device (light: no
python-tuf, no aiohttp, so the sync agent can import it).

TUF signs canonical JSON, which has no floating-point numbers (tolerances, FP32 acceptance
inputs), so the serving manifest and the acceptance cases travel as JSON text inside it
(HUB-PROTOCOL.md, deviation note at the top).
"""

from __future__ import annotations

from typing import Any

import orjson

from ..errors import InvalidInput


def encode_custom(
    name: str, version: str, backend: str, manifest: dict[str, Any], acceptance: list[Any]
) -> dict[str, Any]:
    """The signed `custom` field of a model target.

    TUF signs canonical JSON, which has no floats (tolerances, FP32 inputs), so the manifest and
    the acceptance cases travel as JSON text inside it (HUB-PROTOCOL.md, deviation note)."""

    def text(obj: Any) -> str:
        return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS).decode()

    return {
        "appliance": {
            "name": name,
            "version": version,
            "backend": backend,
            "manifest": text(manifest),
            "acceptance": text(acceptance),
        }
    }


def decode_custom(custom: Any) -> dict[str, Any]:
    """A target's `custom` field back to objects: manifest a dict, acceptance a list."""
    app = custom.get("appliance") if isinstance(custom, dict) else None
    if not isinstance(app, dict):
        raise InvalidInput("target has no 'appliance' custom field")
    out = dict(app)
    for key, kind in (("manifest", dict), ("acceptance", list)):
        value = app.get(key)
        try:
            decoded = orjson.loads(value) if isinstance(value, str) else value
        except orjson.JSONDecodeError as exc:
            raise InvalidInput(f"target custom field {key!r} is not valid JSON: {exc}") from None
        if not isinstance(decoded, kind):
            raise InvalidInput(f"target custom field {key!r} must hold a JSON {kind.__name__}")
        out[key] = decoded
    return out
