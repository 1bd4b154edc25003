"""`GET /api/status`: one summary of the device for the status page, `appliance status` and
scripts; `GET /api/models/{name}`: a model's manifest and stored versions; and the admin routes
`POST /api/models/{name}/activate` {"version"} and `.../rollback` (the gap-free switch that
SIGHUP and sync use). Everything here reads state the server keeps anyway: nothing is sampled
in the background (the request series come from RequestPath.finish, appliance/timeseries.py).
"""

from __future__ import annotations

import functools
import os
import platform
import re
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import orjson
from aiohttp import web

from .. import __version__
from ..engine import Engine, LoadedModel, ModelSource
from ..errors import ApplianceError, InvalidInput, ModelError
from ..registry import PIPELINE, Registry, check_name
from ..request import RequestPath
from .app import STARTED  # (wall clock, monotonic): uptime is measured on the second, so a
from .routes import STATUS  # clock step (NTP after boot without an RTC) does not change it

#: What `GET /v2/sync` answers, when the device syncs with a hub (set by appliance/server.py).
SYNC_STATUS: web.AppKey[Callable[[], dict[str, Any]]] = web.AppKey("sync_status")
#: Points per series at most in one answer (an hour of 10 s buckets).
MAX_POINTS = 360
#: The window of the summary's numbers (rate, p50/p99, error rate).
WINDOW_S = 300.0


def status(app: web.Application, points: int = 0) -> dict[str, Any]:
    """The summary (README: "Status page and /api/status"); `points` > 0 adds each name's
    last `points` buckets of request rate, error rate and latency."""
    from .http import ENGINE, METRICS, PATH, STORE

    paths, engine, store = app[PATH], app[ENGINE], app[STORE]
    router = paths.router
    gauges = {g.name: g for g in app[METRICS].gauge_source()}
    now, (started, started_mono) = time.time(), app[STARTED]
    models = []
    for model in router.models():
        entry = _model(paths, engine, model, gauges.get(model.name), store, points)
        models.append(entry)
    tasks = []
    for name, task in router.tasks.items():
        cfg = task.config
        tasks.append(
            {
                "name": name,
                "variants": [
                    {"model": v.model, "version": v.version or None, "weight": v.weight}
                    for v in cfg.variants
                ],
                "fallback": cfg.fallback,
                "serving": _serving(router, name),
                "last_5m": paths.series.window(name, WINDOW_S),
                **({"series": paths.series.series(name, points)} if points else {}),
            }
        )
    on_gpu = [m["name"] for m in models if m.get("device") not in (None, "cpu")]
    sync = app.get(SYNC_STATUS)
    return {
        "appliance": {
            "version": __version__,
            "revision": _revision(),
            "python": platform.python_version(),
            "platform": f"{platform.system()} {platform.machine()}",
            "hostname": platform.node(),
            "pid": os.getpid(),
            "started_at": round(started, 3),
            "uptime_s": round(time.monotonic() - started_mono, 1),
            "ready": engine.ready,
        },
        "device": {
            "accelerated": bool(on_gpu),
            "models_on_accelerator": on_gpu,
            "fallbacks": [
                {"model": m["name"], "reason": m["fallback_reason"]}
                for m in models
                if m.get("fallback_reason")
            ],
        },
        "models": models,
        "tasks": tasks,
        "errors": _errors(paths),
        "mqtt": _mqtt(app),
        "sync": sync() if sync is not None else None,
        "window_s": WINDOW_S,
        "bucket_s": paths.series.bucket_s,
        "time": round(now, 3),
    }


@functools.cache
def _revision() -> str:
    """Asked once (a source checkout runs git for it), when the summary is first read."""
    from ..version import git_revision

    return git_revision()


def _serving(router: Any, name: str) -> str | None:
    try:
        model = router.resolve(name)
    except ApplianceError:
        return None
    return f"{model.name}/{model.version}"


def _model(
    paths: RequestPath,
    engine: Engine,
    model: LoadedModel,
    gauge: Any,
    store: Registry | None,
    points: int,
) -> dict[str, Any]:
    placement = model.placement
    backend = model.source.manifest.backend
    out: dict[str, Any] = {
        "name": model.name,
        "kind": "pipeline" if backend == PIPELINE else "model",
        "version": model.version,
        "backend": backend,
        "platform": model.platform,
        "status": model.status,
        "reason": model.reason,
        "device": placement.device if placement else None,
        "runtime_detail": placement.detail if placement else None,
        "fallback_reason": placement.fallback_reason if placement else None,
        "queue_depth": gauge.queue_depth if gauge else 0,
        "inflight": gauge.inflight if gauge else 0,
        "load_seconds": round(model.load_seconds, 3),
        "batch": _batch(paths, model),
        "last_5m": paths.series.window(model.name, WINDOW_S),
    }
    if points:
        out["series"] = paths.series.series(model.name, points)
    if store is not None:
        try:
            entry = store.entry(model.name)
        except ApplianceError:
            pass
        else:
            out["stored"] = {
                "active": entry.active,
                "history": list(entry.history),
                "versions": list(entry.versions),
            }
    return out


def _batch(paths: RequestPath, model: LoadedModel) -> dict[str, Any] | None:
    """Requests per runtime call since start: the sizes seen and their mean."""
    stats = paths.metrics.stats_of(model.name, model.version)
    if stats is None:
        return None
    hist = stats.batch
    calls = sum(hist.counts)
    if not calls:
        return {"calls": 0, "mean": None, "sizes": {}}
    bounds = [*(str(int(b)) for b in hist.bounds), "more"]
    return {
        "calls": calls,
        "mean": round(hist.sum / calls, 3),
        "sizes": {b: n for b, n in zip(bounds, hist.counts, strict=True) if n},
    }


def _errors(paths: RequestPath) -> list[dict[str, Any]]:
    """The last failed requests, newest first, masked by the guards' PII rules when they are on
    (the model's own, else the default)."""
    out = []
    book = paths.guards
    for e in reversed(paths.errors.items()):
        message = e.message
        if book is not None:
            guards = book.get(e.name or "")
            if guards is not None and guards.pii is not None:
                message = guards.pii.mask(message)[0]
        out.append(
            {
                "time": round(e.at, 3),
                "status": e.status,
                "name": e.name,
                "path": e.path,
                "message": message,
                "request_id": e.request_id,
            }
        )
    return out


def _mqtt(app: web.Application) -> dict[str, Any]:
    from .http import METRICS, PATH

    cfg = app[PATH].engine.config.mqtt
    if not cfg.url:
        return {"enabled": False}
    from .mqtt import device_id

    parts = urlsplit(cfg.url)  # without user and password
    base = f"{cfg.topic_prefix}/{device_id(cfg)}"
    topics = [f"{base}/infer/#"]
    if cfg.shared_group:
        group = f"{cfg.topic_prefix}/groups/{cfg.shared_group}"
        topics.append(f"$share/{cfg.shared_group}/{group}/infer/#")
    return {
        "enabled": True,
        "broker": f"{parts.scheme}://{parts.hostname}:{parts.port or ''}".rstrip(":"),
        "connected": bool(app[METRICS].mqtt_connected),
        "protocol": cfg.protocol,
        "subscriptions": topics,
        "status_topic": f"{base}/status",
        "messages": dict(app[METRICS].mqtt_messages),
    }


# -- handlers ---------------------------------------------------------------------------------
async def get_status(request: web.Request) -> web.Response:
    from .http import json_response

    raw = request.query.get("series", "0")
    if not raw.isdigit() or not raw.isascii():
        raise InvalidInput(f"series must be a number of points (0 to {MAX_POINTS}), got {raw!r}")
    # (more digits than any count needs: int() refuses over 4300, and it is capped anyway)
    digits = raw.lstrip("0")
    points = MAX_POINTS if len(digits) > len(str(MAX_POINTS)) else int(digits or "0")
    return json_response(status(request.app, min(points, MAX_POINTS)))


def _name(request: web.Request) -> str:
    name = request.match_info["name"]
    try:
        return check_name(name, "model name")
    except ModelError as exc:
        raise InvalidInput(exc.message) from None


def _store(request: web.Request) -> Registry:
    from .http import STORE

    store = request.app[STORE]
    if store is None:
        raise InvalidInput(
            "this server serves model files named on its command line, not a model store: "
            "it has no versions to switch between"
        )
    return store


async def get_model(request: web.Request) -> web.Response:
    """A stored model's active manifest and its versions (the model page)."""
    from .http import json_response

    name = _name(request)
    store = _store(request)
    entry = store.entry(name)
    mv = store.active(name)
    return json_response(
        {
            "name": name,
            "active": entry.active,
            "history": list(entry.history),
            "versions": list(entry.versions),
            "manifest": mv.manifest.to_json(),
        }
    )


_VERSION_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


async def activate(request: web.Request) -> web.Response:
    """Serve a stored version with no gap (loaded and checked first), then make it the store's
    active one: `{"version": "2"}`."""
    from .http import json_response

    name, store = _name(request), _store(request)
    try:
        body = orjson.loads(await request.read() or b"null")
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict) or "version" not in body:
        raise InvalidInput('expected {"version": "<version>"}')
    raw = body["version"]
    if isinstance(raw, bool) or not isinstance(raw, (str, int)):
        raise InvalidInput(f"version must be a string, got {raw!r}")
    version = str(raw)
    if not _VERSION_RE.match(version):
        raise InvalidInput(f"version {version[:40]!r} is not a valid version name")
    try:  # the store's own rule too ("-1", "..."): its refusal is a ModelError, a 500
        check_name(version, "version")
    except ModelError as exc:
        raise InvalidInput(exc.message) from None
    return json_response(await _switch(request, store, name, version))


async def rollback(request: web.Request) -> web.Response:
    """Serve the version that was active before the current one, then record the rollback."""
    from .http import json_response

    name, store = _name(request), _store(request)
    entry = store.entry(name)
    existing = set(entry.versions)
    previous = [v for v in entry.history if v in existing]
    if not previous:
        raise InvalidInput(f"model {name!r}: no earlier version to roll back to")
    result = await _switch(request, store, name, previous[0], rollback=True)
    return json_response(result)


async def _switch(
    request: web.Request, store: Registry, name: str, version: str, rollback: bool = False
) -> dict[str, Any]:
    from .http import ENGINE, ROUTER

    mv = store.get(name, version)
    source = ModelSource(mv.manifest, mv.file)
    if mv.manifest.backend == PIPELINE:
        model = request.app[ROUTER].pipelines.activate(source)
    else:
        model = await request.app[ENGINE].activate(source)
    if rollback:
        store.rollback(name)
    else:
        store.activate(name, version)
    entry = store.entry(name)
    return {
        "name": model.name,
        "version": model.version,
        "status": model.status,
        "active": entry.active,
        "history": list(entry.history),
    }


def add_routes(app: web.Application) -> None:
    """The summary, the admin routes and the page's static files (api/ui.py)."""
    from . import ui

    handlers = {
        **ui.handlers(),
        "status": get_status,
        "model": get_model,
        "activate": activate,
        "rollback": rollback,
    }
    for route in STATUS:  # declared once, with their scopes
        app.router.add_route(route.method, route.path, handlers[route.handler])
