"""OpenAPI 3.1 documents made from an aiohttp application's own router (the device's and the
hub's `/openapi.json`).

The paths come from the routes registered at the time of the request, so the document cannot
list a route that does not exist nor miss one that does; what each one takes and answers comes
from a table of `Operation`s declared beside the routes. A route with no declaration still
appears, marked `x-undeclared` (tests/api/test_openapi.py names it), and a declaration with no
route is left out (the same test names it).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Protocol

import orjson
from aiohttp import web

Schema = dict[str, Any]
_PARAM = re.compile(r"\{([^}:]+)(?::[^}]*)?\}")


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


@dataclass(frozen=True)
class Operation:
    """What one method of one route takes and answers (for the document only: the handler
    checks the request itself)."""

    summary: str
    tag: str
    #: The request body by media type (None: no body).
    body: Mapping[str, Schema] | None = None
    body_required: bool = True
    #: The answer of a success by media type; `status` its code.
    answer: Mapping[str, Schema] = field(default_factory=dict)
    status: str = "200"
    #: Other answers: code -> (description, body by media type).
    more: Mapping[str, tuple[str, Mapping[str, Schema]]] = field(default_factory=dict)
    #: Query parameters: name -> schema.
    query: Mapping[str, Schema] = field(default_factory=dict)
    #: Path parameters' schemas where more precise than a string (name -> schema).
    path: Mapping[str, Schema] = field(default_factory=dict)
    #: Answered without a token.
    public: bool = False
    #: Errors in OpenAI's shape instead of `{"error": "..."}`.
    openai: bool = False
    description: str = ""


@dataclass(frozen=True)
class Api:
    """One application's document: its title, version and the declarations of its routes by
    (METHOD, path as aiohttp spells it)."""

    title: str
    version: str
    description: str
    operations: Mapping[tuple[str, str], Operation]
    #: Whether a bearer token guards the routes that are not public.
    token: bool


ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "string"}},
}
OPENAI_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}


def published_components() -> dict[str, Any]:
    """The component schemas of the published KServe OIP (REST, generate) and OpenAI documents
    (appliance/data/openapi_components.json, written by build/make_openapi_components.py):
    read when a document is made, not kept (about 270 kB as Python objects)."""
    data = resources.files("appliance") / "data" / "openapi_components.json"
    out: dict[str, Any] = orjson.loads(data.read_bytes())
    return out


class Routed(Protocol):
    """An aiohttp application, or the device's (api/app.py), whose router makes it."""

    @property
    def router(self) -> web.UrlDispatcher: ...


def registered(app: Routed) -> list[tuple[str, str]]:
    """(METHOD, path) of every route of `app`, but the HEAD that aiohttp adds beside a GET."""
    out = [
        (route.method.upper(), route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None
    ]
    return [(m, p) for m, p in dict.fromkeys(out) if m != "HEAD" or ("GET", p) not in out]


#: Values of path parameters by name (the models served), given as their schemas' `examples`
#: so that a client or a fuzzer reaches real ones.
Examples = Mapping[str, list[str]]


def document(
    app: Routed, api: Api, schemas: Mapping[str, Schema], examples: Examples | None = None
) -> dict[str, Any]:
    """The OpenAPI 3.1 document of `app`'s routes as registered now."""
    paths: dict[str, dict[str, Any]] = {}
    for method, path in sorted(registered(app), key=lambda r: (r[1], r[0])):
        declared = api.operations.get((method, path))
        paths.setdefault(_openapi_path(path), {})[method.lower()] = _operation(
            method, path, declared, api.token, examples or {}
        )
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": api.title, "version": api.version, "description": api.description},
        "paths": paths,
        "components": {
            "schemas": {"Error": ERROR, "OpenAIError": OPENAI_ERROR, **schemas},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
    if api.token:
        doc["security"] = [{"bearer": []}]
    return doc


def _openapi_path(path: str) -> str:
    return _PARAM.sub(lambda m: "{" + m.group(1) + "}", path)


def _content(media: Mapping[str, Schema]) -> dict[str, Any]:
    return {kind: {"schema": schema} for kind, schema in media.items()}


def _operation(
    method: str, path: str, op: Operation | None, token: bool, examples: Examples
) -> dict[str, Any]:
    if op is None:  # a route nobody declared: listed, and marked so (tests name it)
        op = Operation(summary=f"{method} {path}", tag="undeclared")
        undeclared = True
    else:
        undeclared = False
    error = {"application/json": ref("OpenAIError" if op.openai else "Error")}
    responses: dict[str, Any] = {
        op.status: {"description": op.summary, **({"content": _content(op.answer)} if op.answer
                                                  else {})},
        "4XX": {"description": "the request is wrong (the message says what)",
                "content": _content(error)},
    }  # fmt: skip
    if token and not op.public:
        responses["401"] = {
            "description": "missing or wrong bearer token",
            "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}},
            "content": _content(error),
        }
    for code, (text, media) in op.more.items():
        responses[code] = {"description": text, **({"content": _content(media)} if media else {})}
    out: dict[str, Any] = {
        "operationId": _operation_id(method, path),
        "summary": op.summary,
        "tags": [op.tag],
        "responses": responses,
    }
    if op.description:
        out["description"] = op.description
    params = [
        {"name": name, "in": "path", "required": True,
         "schema": _with_examples(op.path.get(name, {"type": "string"}), examples.get(name))}
        for name in _PARAM.findall(path)
    ] + [
        {"name": name, "in": "query", "required": False, "schema": schema}
        for name, schema in op.query.items()
    ]  # fmt: skip
    if params:
        out["parameters"] = params
    if op.body is not None:
        out["requestBody"] = {"required": op.body_required, "content": _content(op.body)}
    if op.public:
        out["security"] = []
    if undeclared:
        out["x-undeclared"] = True
    return out


def _with_examples(schema: Schema, values: list[str] | None) -> Schema:
    """`values` as examples, but where the schema lists the only values itself (a parameter's
    name is shared by routes that take different things: the hub's `name`)."""
    return {**schema, "examples": values} if values and "enum" not in schema else schema


def _operation_id(method: str, path: str) -> str:
    words = re.sub(r"[^A-Za-z0-9]+", "_", _PARAM.sub(lambda m: "by_" + m.group(1), path))
    return f"{method.lower()}{words}".rstrip("_")


def handler(
    api: Api,
    schemas: Callable[[], Mapping[str, Schema]],
    examples: Callable[[web.Application], Examples] | None = None,
) -> Any:
    """A GET handler serving `api`'s document, made at the first request (every route is
    registered by then; `schemas` are read only then) and kept as bytes while `examples` says
    the same: one handler per application."""
    made: dict[str, Any] = {}

    async def openapi(request: web.Request) -> web.Response:
        # in a thread: the hub's come from its database
        now = await asyncio.to_thread(examples, request.app) if examples is not None else {}
        if made.get("examples") != now:
            made["body"] = orjson.dumps(document(request.app, api, schemas(), now))
            made["examples"] = now
        return web.Response(body=made["body"], content_type="application/json")

    return openapi
