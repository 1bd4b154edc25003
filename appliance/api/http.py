"""The KServe Open Inference Protocol v2 over HTTP (aiohttp), plus Prometheus /metrics.

Errors: every ApplianceError becomes `{"error": "..."}` with its status in one place, the
middleware, so handlers only raise.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import logging
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from .. import __version__
from ..codec import (
    InferRequest,
    decode_request,
    encode_response,
    shorten_deadline,
    timeout_ms,
)
from ..engine import Engine, LoadedModel
from ..errors import (
    ApplianceError,
    InferenceFailed,
    InvalidInput,
    ModelError,
    NotReady,
    Overloaded,
    PayloadTooLarge,
    Unauthorized,
)
from ..logs import request_id, trace_id
from ..metrics import Metrics
from ..registry import Registry, check_name
from .images import image_request, text_parameters
from .openai import add_routes as add_openai_routes
from .openai import openai_error

log = logging.getLogger("appliance.http")
access = logging.getLogger("appliance.access")


@dataclass(frozen=True)
class HttpSettings:
    token: str
    max_body_bytes: int
    access_log: bool
    #: The hot routes answered by api/http_server.py itself (else every request by aiohttp).
    fast_path: bool = True


ENGINE = web.AppKey("engine", Engine)
METRICS = web.AppKey("metrics", Metrics)
SETTINGS = web.AppKey("settings", HttpSettings)
LOADER: web.AppKey[asyncio.Task[None]] = web.AppKey("loader")
#: The model store the server was started from; None when it serves files named on the command line.
STORE: web.AppKey[Registry | None] = web.AppKey("store")

_PUBLIC = frozenset({"/v2/health/live", "/v2/health/ready"})
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_TRACEPARENT_RE = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")
_JSON = "application/json"
#: Status counted (never sent) for a request whose connection closed before it was answered:
#: nginx's "client closed request".
CLIENT_GONE = 499
EXTENSIONS = ["binary_tensor_data", "model_repository"]


def json_response(
    obj: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type=_JSON, headers=headers)


def error_parts(exc: ApplianceError, openai: bool = False) -> tuple[bytes, dict[str, str] | None]:
    """The one place errors become HTTP: KServe's `{"error": "..."}`, or OpenAI's shape, and
    the headers that go with the status (for aiohttp's handlers and api/http_server.py)."""
    headers = None
    if exc.retry_after is not None:
        headers = {"Retry-After": str(max(1, round(exc.retry_after)))}
    elif exc.status == 401:
        headers = {"WWW-Authenticate": 'Bearer realm="appliance"'}
    body = openai_error(exc) if openai else {"error": exc.message}
    return orjson.dumps(body), headers


def error_response(exc: ApplianceError, openai: bool = False) -> web.Response:
    body, headers = error_parts(exc, openai)
    return web.Response(body=body, status=exc.status, content_type=_JSON, headers=headers)


def worth_logging(exc: ApplianceError) -> bool:
    """Server-side failures get a log line; a refusal of a full queue does not (it is counted
    in the metrics): under overload one line per 503 would cost the CPU the 503 is saving."""
    return exc.status >= 500 and not isinstance(exc, Overloaded)


def pick_request_id(header: str | None) -> str:
    """The client's X-Request-Id when it is a sane token, else a new one."""
    if header is None or not _REQUEST_ID_RE.match(header):
        return f"{random.getrandbits(128):032x}"  # an id, not a secret: no syscall per request
    return header


def check_auth(settings: HttpSettings, path: str, authorization: str | None) -> None:
    """Bearer auth on every route but health."""
    if settings.token and path not in _PUBLIC:
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), settings.token.encode()
        ):
            raise Unauthorized("missing or wrong bearer token")


def trace_of(header: str | None) -> str | None:
    if not header:
        return None
    m = _TRACEPARENT_RE.match(header.strip().lower())
    if m is None or m.group(1) == "0" * 32:
        return None
    return m.group(1)


@web.middleware
async def middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Request id and trace id, bearer auth, errors as JSON, the access log and HTTP metrics."""
    settings = request.app[SETTINGS]
    start = time.perf_counter()
    rid = pick_request_id(request.headers.get("X-Request-Id"))
    rid_token = request_id.set(rid)
    tid_token = trace_id.set(trace_of(request.headers.get("traceparent")))
    openai = request.path.startswith("/v1/")
    response: web.StreamResponse
    try:
        check_auth(settings, request.path, request.headers.get("Authorization"))
        response = await handler(request)
    except ApplianceError as exc:
        response = error_response(exc, openai)
        if worth_logging(exc):
            log.warning("%s %s: %s", request.method, request.path, exc.message)
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
        log.exception("unhandled error on %s %s", request.method, request.path)
        response = error_response(InferenceFailed("internal server error"), openai)
    response.headers["X-Request-Id"] = rid
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    request.app[METRICS].http_response(route, response.status)
    if settings.access_log:
        # Formatted once this step ends, after aiohttp has written the response: the client
        # does not wait for its log line.
        asyncio.get_running_loop().call_soon(
            log_access,
            request.method,
            request.path,
            response.status,
            time.perf_counter() - start,
            request.remote,
            rid,
            trace_id.get(),
        )
    trace_id.reset(tid_token)
    request_id.reset(rid_token)
    done = getattr(request.transport, "request_done", None)
    if done is not None:  # handed over by api/http_server.py: tell it when the answer is out
        await response.prepare(request)
        await response.write_eof()
        done(response.keep_alive)
    return response


def log_access(
    method: str,
    path: str,
    status: int,
    seconds: float,
    remote: str | None,
    rid: str,
    tid: str | None,
) -> None:
    access.info(
        "%s %s %d",
        method,
        path,
        status,
        extra={
            "request_id": rid,
            "trace_id": tid,
            "fields": {"status": status, "duration_ms": round(seconds * 1000, 3), "remote": remote},
        },
    )


# -- health and metadata ----------------------------------------------------------------------
async def live(request: web.Request) -> web.Response:
    return json_response({"live": True})


async def ready(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    if not engine.ready:
        waiting = [
            f"{m.name}: {m.status}" + (f" ({m.reason})" if m.reason else "")
            for m in engine.models()
            if m.status != "ready"
        ]
        raise NotReady("not ready: " + ("; ".join(waiting) or "starting"))
    models = {
        m.name: {"version": m.version, "status": m.status, "device": _device(m)}
        for m in engine.models()
    }
    return json_response({"ready": True, "models": models})


def _device(model: LoadedModel) -> str | None:
    return model.placement.device if model.placement else None


async def server_metadata(request: web.Request) -> web.Response:
    return json_response({"name": "appliance", "version": __version__, "extensions": EXTENSIONS})


def _model(request: web.Request) -> LoadedModel:
    engine, name = request.app[ENGINE], request.match_info["name"]
    if name in engine.router.tasks:
        return engine.resolve(name, request.match_info.get("version"))
    return engine.model(name, request.match_info.get("version"))


def _task_parameters(engine: Engine, name: str) -> dict[str, Any]:
    task = engine.router.tasks[name].config
    return {
        "variants": [dataclasses.asdict(v) for v in task.variants],
        "fallback": task.fallback,
        "sticky_key": task.sticky_key,
    }


async def model_metadata(request: web.Request) -> web.Response:
    engine, name = request.app[ENGINE], request.match_info["name"]
    meta = engine.describe(_model(request))
    if name in engine.router.tasks:  # a task: the signature of the first ready model it uses
        meta["name"] = name
        meta["parameters"]["task"] = _task_parameters(engine, name)
    return json_response(meta)


async def model_ready(request: web.Request) -> web.Response:
    model = _model(request)
    request.app[ENGINE].ready_model(model.name, model.version)
    return json_response(
        {"name": request.match_info["name"], "version": model.version, "ready": True,
         "device": _device(model)}
    )  # fmt: skip


async def repository_index(request: web.Request) -> web.Response:
    out = []
    for m in request.app[ENGINE].models():
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
    if body.strip():
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise InvalidInput(f"request body is not valid JSON: {exc}") from None
        params = obj.get("parameters") if isinstance(obj, dict) else None
        if not isinstance(obj, dict) or not isinstance(params or {}, dict):
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
#: The client's timeout for one request, in milliseconds: a queued request that can no longer
#: finish in time is answered 504 without running. Same effect as Triton's `timeout` request
#: parameter (microseconds); when both are given the shorter one counts.
TIMEOUT_HEADER = "X-Request-Timeout-Ms"


async def infer(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    name, version = request.match_info["name"], request.match_info.get("version")
    # 404/503 before reading a body we would discard
    engine.admit(name, version)
    limit = request.app[SETTINGS].max_body_bytes
    check_length(request.content_length, limit)
    ctype = request.content_type.lower()
    if ctype.startswith(("image/", "multipart/")):
        req = await image_request(request, engine.resolve(name, version), ctype, limit)
    else:
        body = await request.read()
        req = tensor_request(body, request.headers.get("Inference-Header-Content-Length"))
    req.parameters.update(_query_parameters(request))
    payload, content_type, headers = await answer(engine, name, version, req, request.headers)
    return web.Response(body=payload, content_type=content_type, headers=headers)


def check_length(content_length: int | None, limit: int) -> None:
    if content_length is not None and content_length > limit:
        raise PayloadTooLarge(
            f"request body of {content_length} bytes is larger than the limit of {limit} bytes"
        )


async def answer(
    engine: Engine,
    name: str,
    version: str | None,
    req: InferRequest,
    headers: Mapping[str, str],
) -> tuple[bytes, str, dict[str, str]]:
    """Run a decoded KServe v2 request: the body, its content type and the headers saying which
    model answered. The one infer path below both HTTP servers (api/http_server.py)."""
    shorten_deadline(req, timeout_ms(headers.get(TIMEOUT_HEADER), TIMEOUT_HEADER))
    key = engine.router.key_for(name, req.parameters, headers)
    result = await engine.infer(name, version, req, key)
    payload, json_length = encode_response(result, req)
    # Which model answered (for a task, the variant or the fallback): also in the body.
    out = {"X-Model-Name": result.model_name, "X-Model-Version": result.model_version}
    if result.parameters:
        if "task" in result.parameters:
            out["X-Task"] = name
            out["X-Fallback"] = "true" if result.parameters["fallback"] else "false"
        if result.parameters.get("cached"):
            out["X-Cache"] = "hit"
    if json_length is None:
        return payload, _JSON, out
    out["Inference-Header-Content-Length"] = str(json_length)
    return payload, "application/octet-stream", out


def tensor_request(body: bytes, header_length: str | None) -> InferRequest:
    """A KServe v2 body: JSON, or JSON followed by binary tensor data."""
    length = None
    if header_length is not None:
        try:
            length = int(header_length)
        except ValueError:
            raise InvalidInput(
                f"Inference-Header-Content-Length must be an integer, got {header_length!r}"
            ) from None
    return decode_request(body, length)


def _query_parameters(request: web.Request) -> dict[str, Any]:
    """Request parameters given in the URL (?top_k=5), for image bodies and JSON alike."""
    return text_parameters(request.query.items()) if request.query else {}


# -- application ------------------------------------------------------------------------------
async def _engine_ctx(app: web.Application) -> AsyncIterator[None]:
    """Load models in the background: health answers at once, readiness once they are loaded."""
    engine = app[ENGINE]
    app[LOADER] = asyncio.create_task(engine.start())
    yield
    loader = app[LOADER]
    if not loader.done():
        loader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loader
    await engine.stop()


def build_app(
    engine: Engine,
    metrics_registry: Metrics,
    settings: HttpSettings,
    store: Registry | None = None,
) -> web.Application:
    # aiohttp's own limit stops chunked bodies; infer checks Content-Length before reading.
    app = web.Application(middlewares=[middleware], client_max_size=settings.max_body_bytes)
    app[ENGINE] = engine
    app[METRICS] = metrics_registry
    app[SETTINGS] = settings
    app[STORE] = store
    r = app.router
    r.add_get("/v2/health/live", live)
    r.add_get("/v2/health/ready", ready)
    r.add_get("/v2", server_metadata)
    for base in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        r.add_get(base, model_metadata)
        r.add_get(base + "/ready", model_ready)
        r.add_post(base + "/infer", infer)
    r.add_post("/v2/repository/index", repository_index)
    r.add_post("/v2/repository/models/{name}/load", repository_load)
    r.add_post("/v2/repository/models/{name}/unload", repository_unload)
    r.add_get("/metrics", metrics)
    add_openai_routes(app, ENGINE)
    app.cleanup_ctx.append(_engine_ctx)
    return app
