"""OpenAI-compatible routes for language and embedding models: /v1/models, /v1/chat/completions
(streaming too), /v1/completions and /v1/embeddings.

Only protocol code lives here: requests are checked field by field and decoded into
`appliance.llm` objects, the engine runs them, and errors leave in OpenAI's shape
(`{"error": {"message", "type", "param", "code"}}`, mapped in http.py's middleware).
"""

from __future__ import annotations

import asyncio
import base64
import random
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from .. import __version__
from ..codec import json_object
from ..engine import LoadedModel
from ..errors import ApplianceError, InvalidInput, NotFound
from ..llm import Generation, GenerationResult, Sampling, TextModel
from ..request import Request, RequestPath
from ..routing import Router
from .openai_structured import BadField, Streamer, Structure, message_fields
from .routes import OPENAI
from .stream_pieces import Pieces

MAX_EMBEDDING_INPUTS = 2048
_FINGERPRINT = f"appliance-{__version__}"
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no"}  # fmt: skip
_UNSUPPORTED = ("functions", "function_call", "logprobs", "top_logprobs", "logit_bias", "audio",
                "modalities", "prediction")  # fmt: skip
#: Chat-only fields (openai_structured.py), refused on /v1/completions.
_CHAT_ONLY = ("tools", "tool_choice", "parallel_tool_calls")
#: Fields of OpenAI's schema that change nothing here: accepted, their JSON type still checked.
_IGNORED: dict[str, tuple[type, ...]] = {
    "user": (str,), "metadata": (dict, type(None)), "store": (bool, type(None)),
    "service_tier": (str, type(None)), "safety_identifier": (str, type(None)),
    "prompt_cache_key": (str, type(None)),
}  # fmt: skip
_JSON_TYPES = {str: "a string", dict: "an object", bool: "true or false", type(None): "null"}
_SERVICE_TIERS = (None, "auto", "default", "flex", "scale", "priority", "fast")


def openai_error(exc: ApplianceError) -> dict[str, Any]:
    kind = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
            404: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
            503: "server_error", 504: "timeout"}  # fmt: skip
    code = {401: "invalid_api_key", 404: "model_not_found", 413: "request_too_large",
            503: "overloaded", 504: "timeout"}  # fmt: skip
    return {
        "error": {
            "message": exc.message,
            "type": kind.get(exc.status, "server_error"),
            "param": getattr(exc, "param", None),
            "code": code.get(exc.status),
        }
    }


def _json(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(obj), status=status, content_type="application/json", headers=headers
    )


async def _body(request: web.Request) -> dict[str, Any]:
    body = json_object(await request.read())
    _check_ignored(body)
    return body


def _number(body: dict[str, Any], key: str, lo: float, hi: float) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise BadField(key, f"must be a number between {lo:g} and {hi:g}, got {value!r}")
    return float(value)


def _int(body: dict[str, Any], key: str, lo: int, hi: int | None = None) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi and value > hi):
        limit = f"between {lo} and {hi}" if hi else f"at least {lo}"
        raise BadField(key, f"must be an integer {limit}, got {value!r}")
    return value


def _model_name(body: dict[str, Any]) -> str:
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise BadField("model", "a model name (string) is required")
    return name


def _check_ignored(body: dict[str, Any]) -> None:
    """The fields this server ignores still have to be what OpenAI's schema says."""
    for key, types in _IGNORED.items():
        if key in body and not isinstance(body[key], types):
            raise BadField(key, f"must be {' or '.join(_JSON_TYPES[t] for t in types)}")
    for key, value in (body.get("metadata") or {}).items():
        if not isinstance(value, str):
            raise BadField(f"metadata.{key}", "must be a string")
    if body.get("service_tier") not in _SERVICE_TIERS:
        raise BadField("service_tier", f"must be one of {', '.join(map(str, _SERVICE_TIERS))}")
    if len(body.get("safety_identifier") or "") > 64:
        raise BadField("safety_identifier", "must be at most 64 characters")


def _absent(value: Any) -> bool:
    """An unsupported feature left off: missing, null, false or empty (not 0, which is no bool)."""
    return value is None or value is False or (isinstance(value, (list, dict)) and not value)


def _sampling(body: dict[str, Any], n_ctx: int, chat: bool = False) -> Sampling:
    for key in _UNSUPPORTED if chat else _UNSUPPORTED + _CHAT_ONLY:
        if not _absent(body.get(key)):
            raise BadField(key, "is not supported by this server")
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise BadField("n", "only n = 1 is supported")
    fmt = body.get("response_format")
    if not chat and fmt is not None and fmt != {"type": "text"}:
        raise BadField("response_format", "only {'type': 'text'} is supported")
    stop = body.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) and s for s in stop):
        stops = list(stop)
    else:
        raise BadField("stop", "must be a string or a list of up to 4 non-empty strings")
    max_tokens = _int(body, "max_completion_tokens", 1, n_ctx)
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", 1, n_ctx)
    return Sampling(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 0, 2),
        top_p=_number(body, "top_p", 0, 1),
        top_k=_int(body, "top_k", 0),
        stop=stops,
        seed=_int(body, "seed", -(2**63)),
        repeat_penalty=_number(body, "repeat_penalty", 0, 10),
        presence_penalty=_number(body, "presence_penalty", -2, 2),
        frequency_penalty=_number(body, "frequency_penalty", -2, 2),
    )


def _template(router: Router, name: str, body: dict[str, Any]) -> str | None:
    """A task's prompt template filled from the request's `fields` (None: the task has none)."""
    task = router.tasks.get(name)
    if task is None or not task.config.prompt_template:
        if body.get("fields") is not None:
            raise BadField("fields", f"'{name}' is not a task with a prompt template")
        return None
    try:
        return task.render(body.get("fields"))
    except InvalidInput as exc:
        raise BadField("fields", exc.message) from None


def _messages(body: dict[str, Any], prompt: str | None = None) -> list[dict[str, Any]]:
    """The chat's messages; a task's filled-in template is appended as the user's turn."""
    messages = body.get("messages")
    if prompt is not None:
        if messages is None:
            messages = []
        elif not isinstance(messages, list):
            raise BadField("messages", "must be a list")
        messages = [*messages, {"role": "user", "content": prompt}]
    if not isinstance(messages, list) or not messages:
        raise BadField("messages", "must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise BadField(where, "must be an object with 'role' and 'content'")
        role = m.get("role")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant", "tool"):
            raise BadField(
                f"{where}.role", f"must be system, user, assistant or tool, got {role!r}"
            )
        extra = message_fields(m, where, role)
        content = m.get("content")
        if content is None and "tool_calls" in extra:
            content = ""
        if isinstance(content, list):
            if not content:  # the published schema's minItems: 1, for every role
                raise BadField(f"{where}.content", "must be a string or a non-empty list of parts")
            parts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict):
                    raise BadField(f"{where}.content[{j}]", "must be an object (a text part)")
                if part.get("type") != "text":
                    raise BadField(f"{where}.content[{j}].type", "only text parts are supported")
                if not isinstance(part.get("text"), str):
                    raise BadField(f"{where}.content[{j}].text", "must be a string")
                parts.append(part["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise BadField(f"{where}.content", "must be a string or a list of text parts")
        out.append({"role": role, "content": content, **extra})
    return out


def _stream_flags(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = body.get("stream")
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise BadField("stream", "must be true or false")
    options = body.get("stream_options")
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise BadField("stream_options", "must be an object")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise BadField("stream_options.include_usage", "must be true or false")
    return stream, include_usage


def _usage(result: GenerationResult) -> dict[str, int]:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def _text_model(router: Router, name: str, mode: str) -> tuple[LoadedModel, TextModel]:
    try:
        return router.text_model(name, mode)
    except NotFound:
        raise NotFound(f"the model '{name}' does not exist") from None


# -- routes -----------------------------------------------------------------------------------
def _model_entry(model: LoadedModel) -> dict[str, Any]:
    created = int(model.loaded_at) if model.loaded_at else 0
    return {"id": model.name, "object": "model", "created": created, "owned_by": "appliance"}


def _text_models(router: Router) -> list[LoadedModel]:
    """Language and embedding models, and the pipelines that serve as one."""
    models = [m for m in router.engine.models() if isinstance(m.backend, TextModel)]
    return models + router.pipelines.text_models()


def _text_tasks(router: Router) -> list[dict[str, Any]]:
    """Tasks whose models are language or embedding models, listed under the task's name."""
    out = []
    for name in router.tasks:
        for mode in ("chat", "embedding"):
            try:
                model, _ = router.text_model(name, mode)
            except ApplianceError:
                continue
            out.append({**_model_entry(model), "id": name})
            break
    return out


async def list_models(request: web.Request, paths: RequestPath, req: Request) -> web.Response:
    data = [_model_entry(m) for m in _text_models(paths.router)] + _text_tasks(paths.router)
    return _json({"object": "list", "data": data})


async def get_model(request: web.Request, paths: RequestPath, req: Request) -> web.Response:
    name = request.match_info["model"]
    for m in _text_models(paths.router):
        if m.name == name:
            return _json(_model_entry(m))
    for entry in _text_tasks(paths.router):
        if entry["id"] == name:
            return _json(entry)
    raise NotFound(f"the model '{name}' does not exist")


async def chat_completions(
    request: web.Request, paths: RequestPath, req: Request
) -> web.StreamResponse:
    body = await _body(request)
    name = _model_name(body)
    _, backend = _text_model(paths.router, name, "chat")
    messages = _messages(body, _template(paths.router, name, body))
    structure = Structure.of(body)
    sampling = _sampling(body, _n_ctx(backend), chat=True)
    gen = Generation("chat", messages=messages, sampling=sampling, **structure.fields())
    stream, include_usage = _stream_flags(body)
    cid, created = f"chatcmpl-{random.getrandbits(96):024x}", int(time.time())

    def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": name,
                "system_fingerprint": _FINGERPRINT,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}  # fmt: skip

    if stream:
        out: Streamer = structure.streamer()
        if out.parser is None:  # plain text: one content delta per piece, from a template
            keep, content = out.text.append, sse_template(chunk({"content": PIECE}, None))

            def piece(text: str) -> bytes:
                keep(text)
                return content(text)
        else:

            def piece(text: str) -> bytes:
                return b"".join(_sse(chunk(delta, None)) for delta in out.deltas(text))

        return await _stream(
            request, paths, req, name, gen, body, include_usage,
            first=chunk({"role": "assistant", "content": ""}, None),
            piece=piece,
            last=lambda result: chunk({}, out.finish(result)),
            usage_chunk=lambda usage: {**chunk({}, None), "choices": [], "usage": usage},
        )  # fmt: skip
    _, result = await paths.generate(req, name, gen, body)
    message, finish = structure.message(result)
    return _json({
        "id": cid, "object": "chat.completion", "created": created, "model": name,
        "system_fingerprint": _FINGERPRINT,
        "choices": [{"index": 0, "message": message, "finish_reason": finish,
                     "logprobs": None}],
        "usage": _usage(result),
    }, headers=req.served.headers())  # fmt: skip


async def completions(request: web.Request, paths: RequestPath, req: Request) -> web.StreamResponse:
    body = await _body(request)
    name = _model_name(body)
    _, backend = _text_model(paths.router, name, "chat")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    filled = _template(paths.router, name, body)
    if filled is not None and prompt is None:
        prompt = filled
    elif filled is not None and isinstance(prompt, str):
        prompt += filled  # the task's template follows what the client sent
    if not isinstance(prompt, str):
        raise BadField("prompt", "must be a string (or a list holding one string)")
    for key, off in (("echo", False), ("best_of", 1), ("suffix", "")):
        value = body.get(key)
        if value is not None and (type(value) is not type(off) or value != off):
            raise BadField(key, "is not supported by this server")
    gen = Generation("completion", prompt=prompt, sampling=_sampling(body, _n_ctx(backend)))
    stream, include_usage = _stream_flags(body)
    cid, created = f"cmpl-{random.getrandbits(96):024x}", int(time.time())

    def chunk(text: str, finish: str | None) -> dict[str, Any]:
        return {"id": cid, "object": "text_completion", "created": created, "model": name,
                "system_fingerprint": _FINGERPRINT,
                "choices": [{"index": 0, "text": text, "finish_reason": finish,
                             "logprobs": None}]}  # fmt: skip

    if stream:
        return await _stream(
            request, paths, req, name, gen, body, include_usage,
            first=None,
            piece=sse_template(chunk(PIECE, None)),
            last=lambda result: chunk("", _finish(result.finish_reason)),
            usage_chunk=lambda usage: {**chunk("", None), "choices": [], "usage": usage},
        )  # fmt: skip
    _, result = await paths.generate(req, name, gen, body)
    out = chunk(result.text, _finish(result.finish_reason))
    out["usage"] = _usage(result)
    return _json(out, headers=req.served.headers())


async def embeddings(request: web.Request, paths: RequestPath, req: Request) -> web.Response:
    body = await _body(request)
    name = _model_name(body)
    _text_model(paths.router, name, "embedding")
    raw = body.get("input")
    texts = [raw] if isinstance(raw, str) else raw
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise BadField("input", "must be a string or a non-empty list of strings")
    if len(texts) > MAX_EMBEDDING_INPUTS:
        raise BadField("input", f"at most {MAX_EMBEDDING_INPUTS} inputs per request")
    if any(not t for t in texts):
        raise BadField("input", "inputs must not be empty strings")
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise BadField("encoding_format", "must be 'float' or 'base64'")
    _, result = await paths.embed(req, name, texts, body)
    dims = body.get("dimensions")
    if dims is not None and dims != result.vectors.shape[1]:
        raise BadField("dimensions", f"this model gives {result.vectors.shape[1]} dimensions")
    data = []
    for i, vector in enumerate(result.vectors):
        if encoding == "base64":
            value: Any = base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
        else:
            value = vector
        data.append({"object": "embedding", "index": i, "embedding": value})
    usage = {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}
    payload = {"object": "list", "data": data, "model": name, "usage": usage}
    return web.Response(
        body=orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY),
        content_type="application/json",
        headers=req.served.headers(),
    )


def _n_ctx(backend: TextModel) -> int:
    return int(getattr(backend, "n_ctx", 1 << 20))


def _sse(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


#: Where the piece of text goes in a chunk template (`sse_template`); no generated text can
#: hold it, since the template is filled with the JSON string of the text, never searched.
PIECE = "\x00piece\x00"


def sse_template(chunk: dict[str, Any]) -> Callable[[str], bytes]:
    """The event of `chunk` (which holds `PIECE` once) as a function of the piece of text:
    everything but the piece is encoded once per stream, so each token costs one small
    orjson call and a join, not a whole chunk (ids, model, choices) encoded again."""
    encoded = _sse(chunk)
    head, mark, tail = encoded.partition(orjson.dumps(PIECE))
    if not mark or mark in tail:
        raise ValueError("a chunk template holds the piece exactly once")
    dumps, join = orjson.dumps, b"".join
    return lambda text: join((head, dumps(text), tail))


async def _stream(
    request: web.Request,
    paths: RequestPath,
    req: Request,
    name: str,
    gen: Generation,
    body: dict[str, Any],
    include_usage: bool,
    first: dict[str, Any] | None,
    piece: Callable[[str], bytes],
    last: Callable[[GenerationResult], dict[str, Any]],
    usage_chunk: Callable[[dict[str, int]], dict[str, Any]],
    error: Callable[[ApplianceError], dict[str, Any]] = openai_error,
    done: bytes | None = b"data: [DONE]\n\n",
) -> web.StreamResponse:
    """Server-sent events, one per piece of text (`piece` encodes its events: none, one or
    more), ending with `done` (OpenAI's `data: [DONE]`; the OIP generate extension has none:
    its last event says `"done": true`).

    The response starts with the first piece (or the end), so a request refused at once (queue
    full, bad prompt) still gets a plain HTTP error; an error after that is an event `error`
    makes. A client that goes away stops the generation: the worker polls `stop` between
    tokens.

    Each piece is written as soon as it is made: no timer holds one back. The response head
    goes with the first piece, written by the loop; after that the generating thread writes
    each piece's event itself while the socket takes it whole (stream_pieces.py: no wake-up of
    the loop per token), else the loop does, pieces that arrived meanwhile together in one
    write. The last events go with the end of the body."""
    gone = threading.Event()
    served = req.served
    pieces = Pieces(asyncio.get_running_loop(), piece, gone)
    task = asyncio.ensure_future(paths.generate(req, name, gen, body, pieces, gone.is_set))
    task.add_done_callback(lambda _t: pieces.wake())
    response: web.StreamResponse | None = None
    transport = request.transport
    try:
        batch = await pieces.take(task.done)
        if batch is None and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]  # refused before any text: plain error
        response = web.StreamResponse(headers={**_SSE_HEADERS, **served.headers()})
        await response.prepare(request)
        # the thread frames its pieces as HTTP/1.1 chunks (aiohttp chose them: no length)
        chunked = response.headers.get("Transfer-Encoding", "").lower() == "chunked"
        direct = chunked and not response.compression
        data = _sse(first) if first is not None else b""
        head_out = False  # aiohttp sends the head with the first bytes of the body
        while batch is not None:
            for item in batch:
                if isinstance(item, bytes):  # what a direct write left: framed, goes next
                    if data:
                        await response.write(data)
                        data = b""
                    assert transport is not None
                    transport.write(item)
                else:
                    data += piece(item)
            if data:
                await response.write(data)  # the head goes with the first one
                data, head_out = b"", True
            pieces.written()
            if direct and head_out:
                pieces.go_direct(transport)
            batch = await pieces.take(task.done)
        try:
            _, result = task.result()
            end = _sse(last(result))
        except ApplianceError as exc:
            end = _sse(error(exc))
        else:
            if include_usage:
                end += _sse(usage_chunk(_usage(result)))
        if done is not None:
            end += done
        await response.write_eof(data + end)
        return response
    except (ConnectionResetError, asyncio.CancelledError):
        gone.set()
        raise
    finally:
        pieces.close()
        if not task.done():
            gone.set()


def stream_generation(
    request: web.Request,
    paths: RequestPath,
    req: Request,
    name: str,
    gen: Generation,
    body: dict[str, Any],
    include_usage: bool,
    first: dict[str, Any] | None,
    piece: Callable[[str], list[dict[str, Any]]],
    last: Callable[[GenerationResult], dict[str, Any]],
    usage_chunk: Callable[[dict[str, int]], dict[str, Any]],
    error: Callable[[ApplianceError], dict[str, Any]] = openai_error,
    done: bytes | None = b"data: [DONE]\n\n",
) -> Awaitable[web.StreamResponse]:
    """For the other fronts that stream text as server-sent events (api/generate.py): `piece`
    gives each piece's events as objects."""

    def events(text: str) -> bytes:
        return b"".join(map(_sse, piece(text)))

    return _stream(request, paths, req, name, gen, body, include_usage, first, events, last,
                   usage_chunk, error, done)  # fmt: skip


def add_routes(
    app: web.Application, path_key: web.AppKey[RequestPath], request_key: web.RequestKey[Request]
) -> None:
    """The OpenAI routes, run through the request lifecycle (`request_key`: where the middleware
    keeps each request's lifecycle record)."""

    def bind(
        handler: Callable[[web.Request, RequestPath, Request], Any],
    ) -> Callable[[web.Request], Any]:
        async def route(request: web.Request) -> Any:
            return await handler(request, request.app[path_key], request[request_key])

        return route

    handlers = {
        "list_models": list_models,
        "get_model": get_model,
        "chat_completions": chat_completions,
        "completions": completions,
        "embeddings": embeddings,
    }
    for route in OPENAI:  # declared with their scope in api/routes.py
        app.router.add_route(route.method, route.path, bind(handlers[route.handler]))


__all__ = ["add_routes", "openai_error", "sse_template", "stream_generation"]
