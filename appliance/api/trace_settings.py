"""Triton's trace setting API over HTTP (appliance/tracing/settings.py holds the rules):
`GET/POST /v2/trace/setting` for the server, `/v2/models/{name}/trace/setting` for one model
or task. With tracing off in the config, GET says so (trace_level ["OFF"]) and POST is refused:
the exporter is set up at start-up, from [tracing]."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from ..errors import InvalidInput
from ..request import RequestPath

_OFF = {
    "trace_level": ["OFF"],
    "trace_rate": "0",
    "trace_count": "0",
    "trace_mode": "opentelemetry",
}


async def trace_setting(request: web.Request, paths: RequestPath) -> dict[str, Any]:
    """The setting (GET) or the setting after the change (POST), as JSON."""
    name = request.match_info.get("name")
    if name is not None and name not in paths.router.tasks:
        paths.engine.model(name)  # 404 for a model or task that does not exist
    tracer = paths.tracer
    if request.method == "GET":
        return dict(_OFF) if tracer is None else tracer.settings.show(name)
    if tracer is None:
        raise InvalidInput(
            "tracing is off: set [tracing] enabled = true (and install the otel extra) to "
            "change trace settings"
        )
    raw = await request.read()
    try:
        update = orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"the trace setting is not valid JSON: {exc}") from None
    return tracer.settings.update(update, name)
