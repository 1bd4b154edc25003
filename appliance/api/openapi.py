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

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from .. import __version__
from ..formats import CONTENT_TYPES
from ..openapi import Api, Examples, Operation, Schema, handler, published_components, ref
from ..routing import Router
from .routes import KSERVE, PUBLIC

_JSON = "application/json"
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
