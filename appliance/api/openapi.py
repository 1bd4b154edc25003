"""The device's `/openapi.json`: what each of its HTTP routes takes and answers.

The routes themselves come from the running application (appliance/openapi.py reads its
router), so a route added to api/routes.py's table, the OpenAI routes or elsewhere is listed at
once; its declaration belongs here: KServe routes by their handler's name in api/routes.py,
the others by (METHOD, path). tests/api/test_openapi.py names any route without one.

Public, like health: the document describes this version's routes, which the source already
tells anyone; it names no model, token or setting, and a client or a fuzzer needs it before it
holds a token.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from .. import __version__
from ..formats import CONTENT_TYPES
from ..openapi import Api, Examples, Operation, Schema, handler, published_components, ref
from ..routing import Router
from .routes import KSERVE, PUBLIC, STATUS
from .status import MAX_POINTS
from .ui import read_files

_JSON = "application/json"
_PATTERN = re.compile(r"\{(\w+):[^}]*\}")
#: The store's name rule (appliance/names.py) without its look-aheads (which JSON Schema
#: generators do not all take): names this pattern allows and the store refuses are a 4xx.
_NAME = {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"}
_OBJECT: Schema = {"type": "object"}
_TEXT = {"type": "string"}
_BYTES = {"type": "string", "format": "binary"}
_BUSY = {
    "503": ("not ready, or overloaded (Retry-After says when to try again)", {_JSON: ref("Error")}),
    "504": ("the request's deadline passed before it ran", {_JSON: ref("Error")}),
}
_OPENAI_BUSY = {code: (text, {_JSON: ref("OpenAIError")}) for code, (text, _) in _BUSY.items()}


def _events(data: Schema | None = None) -> Schema:
    """Server-sent events, each as schemathesis and OpenAPI 3.2 read them: an object whose
    `data` is text (JSON of `data`'s schema, or OpenAI's final `[DONE]`)."""
    text: Schema = {"type": "string"}
    if data is not None:
        text = {**text, "contentMediaType": "application/json", "contentSchema": data}
    return {
        "type": "object",
        "properties": {"data": text, "event": _TEXT, "id": _TEXT, "retry": {"type": "integer"}},
    }


SCHEMAS: dict[str, Schema] = {
    "Live": {"type": "object", "required": ["live"], "properties": {"live": {"type": "boolean"}}},
    "Ready": {
        "type": "object",
        "required": ["ready"],
        "properties": {
            "ready": {"type": "boolean"},
            "models": {
                "type": "object",
                "additionalProperties": {
                    "type": "object",
                    "properties": {
                        "version": _TEXT,
                        "status": _TEXT,
                        "device": {"type": ["string", "null"]},
                    },
                },
            },
        },
    },
    "ModelReady": {
        "type": "object",
        "required": ["name", "ready"],
        "properties": {
            "name": _TEXT,
            "version": _TEXT,
            "ready": {"type": "boolean"},
            "device": {"type": ["string", "null"]},
        },
    },
    "RepositoryIndexRequest": {
        "type": "object",
        "properties": {"ready": {"type": "boolean"}},
    },
    "RepositoryIndex": {
        "type": "array",
        "items": {
            "type": "object",
            "required": ["name", "state"],
            "properties": {"name": _TEXT, "version": _TEXT, "state": _TEXT, "reason": _TEXT},
        },
    },
    "RepositoryLoadRequest": {
        "type": "object",
        "properties": {
            "parameters": {
                "type": ["object", "null"],
                "properties": {
                    "version": {
                        "anyOf": [_NAME, {"type": "integer", "minimum": 0}, {"type": "null"}]
                    }
                },
            }
        },
    },
    "RepositoryState": {
        "type": "object",
        "required": ["name", "state"],
        "properties": {"name": _TEXT, "version": _TEXT, "state": _TEXT},
    },
    "TraceSetting": {
        "type": "object",
        "additionalProperties": {"type": ["string", "array", "null"]},
    },
}


_NUMBER = {"type": "number"}
_COUNT = {"type": "integer", "minimum": 0}
_MAYBE_TEXT = {"type": ["string", "null"]}
_MAYBE_NUMBER = {"type": ["number", "null"]}
_NAMES = {"type": "array", "items": _TEXT}


def _props(required: list[str], **props: Schema) -> Schema:
    """An object with `props`, those named in `required` present."""
    return {"type": "object", "required": required, "properties": props}


def _all(**props: Schema) -> Schema:
    return _props(list(props), **props)


#: api/status.py's answers (README: "Status page and /api/status"); every key it writes is
#: required, so a key dropped there fails the fuzz tests' response check.
STATUS_SCHEMAS: dict[str, Schema] = {
    "Window": _all(
        seconds=_NUMBER, requests=_COUNT, errors=_COUNT, client_errors=_COUNT, rate=_NUMBER,
        error_rate=_NUMBER, p50_ms=_MAYBE_NUMBER, p99_ms=_MAYBE_NUMBER,
    ),
    "Series": _all(
        bucket_s=_NUMBER, requests=_COUNT, errors=_COUNT, client_errors=_COUNT,
        rate={"type": "array", "items": _NUMBER},
        error_rate={"type": "array", "items": _MAYBE_NUMBER},
        p50_ms={"type": "array", "items": _MAYBE_NUMBER},
        p99_ms={"type": "array", "items": _MAYBE_NUMBER},
    ),
    "Stored": _all(active=_MAYBE_TEXT, history=_NAMES, versions=_NAMES),
    "StatusModel": _props(
        ["name", "kind", "version", "backend", "platform", "status", "reason", "device",
         "runtime_detail", "fallback_reason", "queue_depth", "inflight", "load_seconds",
         "batch", "last_5m"],
        name=_TEXT, kind={"enum": ["model", "pipeline"]}, version=_TEXT, backend=_TEXT,
        platform=_MAYBE_TEXT, status=_TEXT, reason=_MAYBE_TEXT, device=_MAYBE_TEXT,
        runtime_detail=_MAYBE_TEXT, fallback_reason=_MAYBE_TEXT, queue_depth=_COUNT,
        inflight=_COUNT, load_seconds=_NUMBER,
        batch={"anyOf": [{"type": "null"}, _all(
            calls=_COUNT, mean=_MAYBE_NUMBER,
            sizes={"type": "object", "additionalProperties": _COUNT})]},
        last_5m=ref("Window"), series=ref("Series"), stored=ref("Stored"),
    ),
    "StatusTask": _props(
        ["name", "variants", "fallback", "serving", "last_5m"],
        name=_TEXT,
        variants={"type": "array", "items": _all(
            model=_TEXT, version=_MAYBE_TEXT, weight=_NUMBER)},
        fallback=_MAYBE_TEXT, serving=_MAYBE_TEXT, last_5m=ref("Window"), series=ref("Series"),
    ),
    "Status": _all(
        appliance=_all(
            version=_TEXT, revision=_TEXT, python=_TEXT, platform=_TEXT, hostname=_TEXT,
            pid=_COUNT, started_at=_NUMBER, uptime_s=_NUMBER, ready={"type": "boolean"},
        ),
        device=_all(
            accelerated={"type": "boolean"}, models_on_accelerator=_NAMES,
            fallbacks={"type": "array", "items": _all(model=_TEXT, reason=_TEXT)},
        ),
        models={"type": "array", "items": ref("StatusModel")},
        tasks={"type": "array", "items": ref("StatusTask")},
        errors={"type": "array", "items": _all(
            time=_NUMBER, status={"type": "integer"}, name=_MAYBE_TEXT, path=_TEXT,
            message=_TEXT, request_id=_MAYBE_TEXT)},
        mqtt={"anyOf": [
            {"type": "object", "required": ["enabled"],
             "properties": {"enabled": {"const": False}}},
            _all(enabled={"const": True}, broker=_TEXT, connected={"type": "boolean"},
                 protocol=_TEXT, subscriptions=_NAMES, status_topic=_TEXT,
                 messages={"type": "object", "additionalProperties": _COUNT}),
        ]},
        sync={"type": ["object", "null"], "description": "GET /v2/sync's answer"},
        window_s=_NUMBER, bucket_s=_NUMBER, time=_NUMBER,
    ),
    "StoredModel": _all(
        name=_TEXT, active=_MAYBE_TEXT, history=_NAMES, versions=_NAMES,
        manifest={"type": "object", "description": "the active version's manifest"},
    ),
    "Activate": {
        "type": "object",
        "required": ["version"],
        "properties": {"version": {"anyOf": [
            {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"},
            {"type": "integer", "minimum": 0}]}},
    },
    "Switched": _all(
        name=_TEXT, version=_TEXT, status=_TEXT, active=_MAYBE_TEXT, history=_NAMES,
    ),
}  # fmt: skip
SCHEMAS.update(STATUS_SCHEMAS)

#: The status page's files (api/ui.py), by content type.
_PAGE_TYPES = ("text/html", "text/javascript", "text/css", "image/svg+xml")


def _status() -> dict[str, Operation]:
    """Declarations of api/routes.py's STATUS table (api/status.py, api/ui.py)."""
    tag, admin = "status page", "needs the admin scope"
    files = sorted(p.removeprefix("/ui/") for p in read_files())
    missing = {"404": ("no such model, or version not stored", {_JSON: ref("Error")})}
    return {
        "page": Operation("the status page", tag, answer={"text/html": _TEXT},
                          description="Behind Home Assistant's ingress, `X-Ingress-Path` "
                          "becomes the page's `<base>`."),
        "static": Operation("a file of the status page", tag,
                            answer={kind: _TEXT for kind in _PAGE_TYPES},
                            path={"path": {"type": "string", "enum": files}}),
        "status": Operation(
            "the device's summary", tag, answer={_JSON: ref("Status")}, description=admin,
            query={"series": {"type": "integer", "minimum": 0, "description":
                              f"adds each name's last N 10 s buckets (at most {MAX_POINTS})"}},
        ),
        "model": Operation("a stored model's manifest and versions", tag, description=admin,
                           answer={_JSON: ref("StoredModel")}, more=missing),
        "activate": Operation(
            "serve a stored version (loaded and checked first), then make it active", tag,
            body={_JSON: ref("Activate")}, answer={_JSON: ref("Switched")}, more=missing,
            description=admin,
        ),
        "rollback": Operation(
            "serve the version active before the current one, then record the rollback", tag,
            answer={_JSON: ref("Switched")}, more=missing, description=admin,
        ),
    }  # fmt: skip


def _kserve() -> dict[str, Operation]:
    """Declarations of api/routes.py's handlers."""
    tensors = {
        _JSON: ref("inference_request"),
        # JSON then binary tensor data (Inference-Header-Content-Length), a picture, a form
        "application/octet-stream": _BYTES,
        "image/png": _BYTES,
        "image/jpeg": _BYTES,
        "multipart/form-data": {
            "type": "object",
            "properties": {"file": _BYTES, "parameters": _TEXT},
        },
    }
    answers: dict[str, Schema] = {_JSON: ref("inference_response"),
                                  "application/octet-stream": _BYTES}  # fmt: skip
    for kind, ctype in CONTENT_TYPES.items():
        if kind != "json":
            answers[ctype.split(";")[0]] = _TEXT
    kserve = "KServe v2"
    return {
        "live": Operation("the process answers", "health", answer={_JSON: ref("Live")},
                          ),
        "ready": Operation("every model is loaded", "health", answer={_JSON: ref("Ready")},
                           more={"503": _BUSY["503"]}),
        "server_metadata": Operation("server name, version and extensions", kserve,
                                     answer={_JSON: ref("metadata_server_response")}),
        "model_metadata": Operation("a model's (or task's) inputs and outputs", kserve,
                                    answer={_JSON: ref("metadata_model_response")}),
        "model_ready": Operation("whether a model serves", kserve,
                                 answer={_JSON: ref("ModelReady")}, more={"503": _BUSY["503"]}),
        "infer": Operation(
            "run a model (or task, or pipeline)", kserve, body=tensors, answer=answers,
            more=_BUSY, query={"top_k": {"type": "integer", "minimum": 1}},
            description="JSON tensors (binary tensor data extension too), or a picture as "
            "the body or a form's `file` for models that declare image pre-processing.",
        ),
        "generate": Operation(
            "generate text (KServe generate extension)", kserve,
            body={_JSON: ref("GenerateRequest")}, answer={_JSON: ref("GenerateResponse")},
            more=_BUSY,
        ),
        "generate_stream": Operation(
            "generate text, streamed as server-sent events", kserve,
            body={_JSON: ref("GenerateRequest")},
            answer={"text/event-stream": _events(
                {"anyOf": [ref("GenerateStreamResponse"), ref("Error")]})},
            more=_BUSY,
        ),
        "stream": Operation(
            "a WebSocket whose messages are infer requests (api/ws.py)", kserve,
            status="101", description="Send GET with `Upgrade: websocket`; each text or "
            "binary message is one infer request, each answer carries its request's id.",
        ),
        "repository_index": Operation(
            "the models and their state", "repository",
            body={_JSON: ref("RepositoryIndexRequest")}, body_required=False,
            answer={_JSON: ref("RepositoryIndex")},
        ),
        "repository_load": Operation(
            "serve a stored version (the active one, or parameters.version)", "repository",
            body={_JSON: ref("RepositoryLoadRequest")}, body_required=False,
            answer={_JSON: ref("RepositoryState")}, more={"503": _BUSY["503"]},
        ),
        "repository_unload": Operation(
            "stop serving a model", "repository", answer={_JSON: ref("RepositoryState")},
        ),
        "metrics": Operation("Prometheus metrics", "metrics",
                             answer={"text/plain": _TEXT}),
        "trace_setting": Operation("Triton's trace settings", "tracing",
                                   answer={_JSON: ref("TraceSetting")}),
        "openapi": Operation("this document", "meta", answer={_JSON: _OBJECT}),
    }  # fmt: skip


def _trace_post() -> Operation:
    return Operation(
        "change Triton's trace settings", "tracing",
        body={_JSON: ref("TraceSetting")}, body_required=False,
        answer={_JSON: ref("TraceSetting")},
    )  # fmt: skip


def _openai() -> dict[tuple[str, str], Operation]:
    tag, busy = "OpenAI", _OPENAI_BUSY
    return {
        ("GET", "/v1/models"): Operation("the language and embedding models", tag,
                                         answer={_JSON: ref("ListModelsResponse")}, openai=True),
        ("GET", "/v1/models/{model}"): Operation("one model", tag, answer={_JSON: ref("Model")},
                                                 openai=True),
        ("POST", "/v1/chat/completions"): Operation(
            "chat", tag, body={_JSON: ref("CreateChatCompletionRequest")},
            answer={_JSON: ref("CreateChatCompletionResponse"),
                    "text/event-stream": _events(ref("CreateChatCompletionStreamResponse"))},
            more=busy, openai=True,
        ),
        ("POST", "/v1/completions"): Operation(
            "complete a prompt", tag, body={_JSON: ref("CreateCompletionRequest")},
            answer={_JSON: ref("CreateCompletionResponse"), "text/event-stream": _events()},
            more=busy, openai=True,
        ),
        ("POST", "/v1/embeddings"): Operation(
            "embed texts", tag, body={_JSON: ref("CreateEmbeddingRequest")},
            answer={_JSON: ref("CreateEmbeddingResponse")}, more=busy, openai=True,
        ),
    }  # fmt: skip


def operations() -> dict[tuple[str, str], Operation]:
    """Every declaration, by (METHOD, path as aiohttp spells it)."""
    by_handler = _kserve()
    out: dict[tuple[str, str], Operation] = {}
    for route in KSERVE:
        op = by_handler.get(route.handler)
        if route.handler == "trace_setting" and route.method == "POST":
            op = _trace_post()
        if op is not None:  # public exactly when the server lets it through without a token
            out[(route.method, route.path)] = replace(op, public=route.path in PUBLIC)
    out.update(_openai())
    status = _status()
    for route in STATUS:
        path = _PATTERN.sub(r"{\1}", route.path)  # as aiohttp spells it: "{path:.+}" -> "{path}"
        out[(route.method, path)] = replace(status[route.handler], public=route.scope == "public")
    out[("GET", "/v2/sync")] = Operation(
        "what the hub sync agent is doing (with [hub] url only)", "sync",
        answer={_JSON: _OBJECT},
    )  # fmt: skip
    return out


def path_schemas() -> Mapping[str, Schema]:
    return {"name": _NAME, "version": _NAME}


def api(token: bool) -> Api:
    ops = {key: op if op.path else _with_names(op, key[1]) for key, op in operations().items()}
    return Api(
        title="appliance",
        version=__version__,
        description="An edge inference server: KServe v2 (REST, generate extension, "
        "repository), OpenAI-compatible /v1, Prometheus metrics. A route not marked public "
        "takes `Authorization: Bearer <token>` when the device has a token.",
        operations=ops,
        token=token,
    )


def _with_names(op: Operation, path: str) -> Operation:
    names = {k: v for k, v in path_schemas().items() if "{" + k + "}" in path}
    return replace(op, path=names) if names else op


def served(router: Router) -> Examples:
    """The names and versions served now: examples of the path parameters."""
    models = router.models()
    names = sorted({m.name for m in models} | set(router.tasks))
    versions = sorted({m.version for m in models})
    return {"name": names, "model": names, "version": versions}


def route_handler(token: bool, router: Router) -> Any:
    """The GET /openapi.json handler of one application."""
    return handler(api(token), schemas, lambda app: served(router))


def schemas() -> dict[str, Schema]:
    """The component schemas the device's document refers to."""
    return {**published_components()["schemas"], **SCHEMAS}


__all__ = ["SCHEMAS", "api", "operations", "route_handler"]
