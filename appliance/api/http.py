"""The KServe Open Inference Protocol v2 over HTTP (aiohttp), plus Prometheus /metrics.

Errors: every ApplianceError becomes `{"error": "..."}` with its status in one place, the
middleware, so handlers only raise.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from .. import __version__
from ..engine import ModelSource
from ..errors import ApplianceError, InferenceFailed, InvalidInput, ModelError
from ..formats import JSON
from ..registry import PIPELINE, Registry, check_name
from ..request import Request, RequestPath
from . import generate as oip_generate
from . import trace_settings

# The state and the parts shared with the fast path live apart, without aiohttp (api/app.py,
# api/http_parts.py); their names stay importable from here.
from .app import ENGINE as ENGINE
from .app import LOADER as LOADER
from .app import METRICS as METRICS
from .app import PATH as PATH
from .app import ROUTER as ROUTER
from .app import SETTINGS as SETTINGS
from .app import STORE as STORE
from .app import App
from .app import HttpSettings as HttpSettings
from .http_parts import PRIORITY_HEADER as PRIORITY_HEADER
from .http_parts import TIMEOUT_HEADER as TIMEOUT_HEADER
from .http_parts import begin as begin
from .http_parts import check_length as check_length
from .http_parts import device_of as device_of
from .http_parts import encode_answer as encode_answer
from .http_parts import encode_formatted as encode_formatted
from .http_parts import error_parts as error_parts
from .http_parts import ready_answer as ready_answer
from .http_parts import tensor_request as tensor_request
from .images import image_request, text_parameters
from .openai import add_routes as add_openai_routes
from .openapi import route_handler as openapi_route
from .routes import KSERVE, OPENAI, STATUS, SYNC, UNDECLARED, UNMATCHED, Scope, scopes
from .status import add_routes as add_status_routes
from .ws import stream as ws_stream

log = logging.getLogger("appliance.http")


#: The lifecycle record of the request being answered (set by the middleware).
REQUEST = web.RequestKey("request", Request)

_JSON = "application/json"
#: Status counted (never sent) for a request whose connection closed before it was answered:
#: nginx's "client closed request".
CLIENT_GONE = 499
EXTENSIONS = ["binary_tensor_data", "model_repository", "generate"]


def json_response(
    obj: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type=_JSON, headers=headers)


def error_response(exc: ApplianceError, openai: bool = False) -> web.Response:
    body, headers = error_parts(exc, openai)
    return web.Response(body=body, status=exc.status, content_type=_JSON, headers=headers)


#: The scope each route pattern needs (api/routes.py declares them).
SCOPES = scopes(KSERVE, OPENAI, SYNC, STATUS)


def route_scope(request: web.Request) -> Scope:
    """The scope of the route `request` matched: unmatched (404/405) needs any token, a route
    added without declaring one (outside api/routes.py's tables) the admin scope."""
    resource = request.match_info.route.resource
    if resource is None or request.match_info.http_exception is not None:
        return UNMATCHED
    return SCOPES.get(resource.canonical, UNDECLARED)


@web.middleware
async def middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every request into the lifecycle; bearer auth; errors as JSON; accounted once."""
    app = request.app
    settings, paths = app[SETTINGS], app[PATH]
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    req = begin(paths, request.method, request.path, route, request.headers, request.remote)
    request[REQUEST] = req
    started = getattr(request.transport, "request_started", None)
    if started is not None:  # api/http_server.py: the head is in, its read timer stops
        started()
    openai = request.path.startswith("/v1/")
    response: web.StreamResponse
    with req.bound():
        try:
            req.token_name = settings.auth.check(
                request.headers.get("Authorization"), route_scope(request), request.remote
            )
            response = await handler(request)
        except ApplianceError as exc:
            paths.failed(req, exc)
            response = error_response(exc, openai)
        except RequestPayloadError as exc:  # a body aiohttp could not decode (gzip, deflate, br)
            request.content.feed_eof()  # so aiohttp closes the connection instead of draining it
            cause = getattr(exc.__cause__, "message", None) or str(exc)
            response = error_response(InvalidInput(f"request body cannot be read: {cause}"), openai)
            response.force_close()
        except ConnectionResetError:  # gone while its body was read: nobody to answer or blame
            response = web.Response(status=CLIENT_GONE)
        except web.HTTPException as exc:
            reason = exc.reason
            if exc.status == 413:
                reason = f"request body is larger than the limit of {settings.max_body_bytes} bytes"
            elif exc.status == 404:
                reason = f"no route for {request.method} {request.path}"
            err = ApplianceError(reason)
            err.status = exc.status
            response = error_response(err, openai)
            for key, value in exc.headers.items():  # e.g. Allow on a 405
                if key.lower() not in ("content-type", "content-length"):
                    response.headers[key] = value
        except Exception:
            paths.crashed(req)
            response = error_response(InferenceFailed("internal server error"), openai)
    response.headers["X-Request-Id"] = req.id
    if req.span is not None:
        response.headers["traceparent"] = paths.reply_traceparent(req) or ""
    paths.finish(req, response.status)
    done = getattr(request.transport, "request_done", None)
    if done is not None:  # handed over by api/http_server.py: tell it when the answer is out
        await response.prepare(request)
        await response.write_eof()
        done(response.keep_alive)
    return response


# -- health and metadata ----------------------------------------------------------------------
async def live(request: web.Request) -> web.Response:
    return json_response({"live": True})


async def ready(request: web.Request) -> web.Response:
    return json_response(ready_answer(request.app[ENGINE], request.app[ROUTER]))


async def server_metadata(request: web.Request) -> web.Response:
    return json_response({"name": "appliance", "version": __version__, "extensions": EXTENSIONS})


async def model_metadata(request: web.Request) -> web.Response:
    name, version = request.match_info["name"], request.match_info.get("version")
    return json_response(request.app[ROUTER].describe(name, version))


async def model_ready(request: web.Request) -> web.Response:
    model = request.app[ROUTER].resolve(
        request.match_info["name"], request.match_info.get("version")
    )
    return json_response(
        {"name": request.match_info["name"], "version": model.version, "ready": True,
         "device": device_of(model)}
    )  # fmt: skip


async def repository_index(request: web.Request) -> web.Response:
    """The models and their state; `{"ready": true}` lists only those that serve (KServe's
    repository extension)."""
    body = await request.read()
    ready = False
    if body:  # only no body at all counts as none: whitespace is no JSON
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise InvalidInput(f"request body is not valid JSON: {exc}") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("ready", False), bool):
            raise InvalidInput('expected {"ready": true or false} or no body')
        ready = obj.get("ready", False)
    out = []
    for m in request.app[ROUTER].models():
        if ready and m.status != "ready":
            continue
        entry = {"name": m.name, "version": m.version, "state": m.status.upper()}
        if m.reason:
            entry["reason"] = m.reason
        out.append(entry)
    return json_response(out)


def _store(request: web.Request) -> Registry:
    store = request.app.get(STORE)
    if store is None:
        raise InvalidInput(
            "this server serves model files named on its command line, not a model store: "
            "there is nothing to load from"
        )
    return store


async def repository_load(request: web.Request) -> web.Response:
    """KServe v2 repository extension: serve a stored version (the active one, or
    `parameters.version`) in place of the one serving, with no gap for clients."""
    store = _store(request)
    version = None
    body = await request.read()
    if body:  # only no body at all counts as none: whitespace is no JSON
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise InvalidInput(f"request body is not valid JSON: {exc}") from None
        params = obj.get("parameters") if isinstance(obj, dict) else None
        if not isinstance(obj, dict) or not isinstance({} if params is None else params, dict):
            raise InvalidInput('expected {"parameters": {"version": "<version>"}} or no body')
        raw = (params or {}).get("version")
        if raw is not None and not isinstance(raw, (str, int)):
            raise InvalidInput(f"parameters.version must be a string, got {raw!r}")
        version = None if raw is None else str(raw)
    name = request.match_info["name"]
    try:
        check_name(name, "model name")
        if version is not None:
            check_name(version, "version")
    except ModelError as exc:
        raise InvalidInput(exc.message) from None
    mv = store.get(name, version) if version is not None else store.active(name)
    if mv.manifest.backend == PIPELINE:  # served by the pipelines layer, not loaded
        model = request.app[ROUTER].pipelines.activate(ModelSource(mv.manifest, mv.file))
        if version is not None:
            store.activate(name, version)
        state = "READY" if model.status == "ready" else model.status.upper()
        return json_response({"name": model.name, "version": model.version, "state": state})
    model = await request.app[ENGINE].activate_stored(store, name, version)
    return json_response({"name": model.name, "version": model.version, "state": "READY"})


async def repository_unload(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    await request.app[ENGINE].unload(name)
    return json_response({"name": name, "state": "UNAVAILABLE"})


async def metrics(request: web.Request) -> web.Response:
    registry = request.app[METRICS]
    return web.Response(body=registry.render(), headers={"Content-Type": registry.content_type})


# -- inference --------------------------------------------------------------------------------
async def infer(request: web.Request) -> web.Response:
    paths, req = request.app[PATH], request[REQUEST]
    name, version = request.match_info["name"], request.match_info.get("version")
    model = paths.admit(req, name, version)  # 404/503 before reading a body we would discard
    limit = request.app[SETTINGS].max_body_bytes
    check_length(request.content_length, limit)
    ctype = request.content_type.lower()
    if ctype.startswith(("image/", "multipart/")):
        body = await image_request(request, model, ctype, limit)
    else:
        raw = await request.read()
        body = tensor_request(raw, request.headers.get("Inference-Header-Content-Length"))
    body.parameters.update(_query_parameters(request))
    result = await paths.infer(req, name, version, body)
    if req.format == JSON:
        payload, content_type, headers = encode_answer(result, body, name)
        return web.Response(body=payload, content_type=content_type, headers=headers)
    payload, content_type, headers = await encode_formatted(paths, req, result, body, name)
    return web.Response(body=payload, headers=headers)


def _query_parameters(request: web.Request) -> dict[str, Any]:
    """Request parameters given in the URL (?top_k=5), for image bodies and JSON alike."""
    return text_parameters(request.query.items()) if request.query else {}


# -- application ------------------------------------------------------------------------------
async def trace_setting(request: web.Request) -> web.Response:
    """Triton's trace setting API (api/trace_settings.py)."""
    return json_response(await trace_settings.trace_setting(request, request.app[PATH]))


HANDLERS: dict[str, Callable[[web.Request], Awaitable[web.StreamResponse]]] = {
    "live": live,
    "ready": ready,
    "server_metadata": server_metadata,
    "model_metadata": model_metadata,
    "model_ready": model_ready,
    "infer": infer,
    "repository_index": repository_index,
    "repository_load": repository_load,
    "repository_unload": repository_unload,
    "metrics": metrics,
    "trace_setting": trace_setting,
}


def _with_path(
    handler: Callable[[web.Request, RequestPath, Request], Awaitable[web.StreamResponse]],
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """A handler of another module (which cannot import this one's keys) bound to them."""

    async def route(request: web.Request) -> web.StreamResponse:
        return await handler(request, request.app[PATH], request[REQUEST])

    return route


async def stream(request: web.Request) -> web.StreamResponse:
    """A WebSocket whose messages are requests; each begins its lifecycle like an HTTP
    request would, from the upgrade request's headers (api/ws.py)."""
    paths, headers = request.app[PATH], request.headers
    route = request.match_info.route.resource
    label = route.canonical if route is not None else request.path

    def begin_message(request_id: str | None) -> Request:
        return paths.begin(
            "ws", "WS", request.path, label,
            request_id=request_id,
            traceparent=headers.get("traceparent"),
            remote=request.remote,
            meta=headers,
            priority=headers.get(PRIORITY_HEADER),
            priority_name=PRIORITY_HEADER,
            accept=None,
        )  # fmt: skip

    settings = request.app[SETTINGS].ws
    return await ws_stream(request, paths, request[REQUEST], settings, begin_message)


HANDLERS.update(
    generate=_with_path(oip_generate.generate),
    generate_stream=_with_path(oip_generate.generate_stream),
    stream=stream,
)


def build_web(app: App) -> web.Application:
    """The aiohttp application of `app` (api/app.py calls this once, at the first request the
    fast path hands over; it shares `app`'s state and lifecycle)."""
    settings, paths = app[SETTINGS], app[PATH]
    # aiohttp's own limit stops chunked bodies; infer checks Content-Length before reading.
    web_app = web.Application(middlewares=[middleware], client_max_size=settings.max_body_bytes)
    handlers = {**HANDLERS, "openapi": openapi_route(settings.auth.enabled, paths.router)}
    for route in KSERVE:
        web_app.router.add_route(route.method, route.path, handlers[route.handler])
    add_openai_routes(web_app, PATH, REQUEST)
    add_status_routes(web_app)
    return web_app
