"""What both HTTP servers share (the aiohttp routes of api/http.py and the fast path of
api/http_server.py): the request headers they read, the error mapping, the infer body's decoding
and the answer's encoding. No aiohttp here: the fast path runs without it (api/app.py)."""

from __future__ import annotations

from typing import Any

import orjson

from ..codec import InferRequest, InferResponse, decode_request, encode_response
from ..engine import Engine, LoadedModel
from ..errors import ApplianceError, InvalidInput, NotReady, PayloadTooLarge
from ..request import Request, RequestPath
from ..routing import Router

_JSON = "application/json"

#: The client's timeout for one request, in milliseconds: a queued request that can no longer
#: finish in time is answered 504 without running. Same effect as Triton's `timeout` request
#: parameter (microseconds); when both are given the shorter one counts.
TIMEOUT_HEADER = "X-Request-Timeout-Ms"
#: The request's priority level (1 = highest), when the body's `parameters.priority` is absent
#: (OpenAI's routes have no such field).
PRIORITY_HEADER = "X-Request-Priority"


def error_parts(exc: ApplianceError, openai: bool = False) -> tuple[bytes, dict[str, str] | None]:
    """The one place errors become HTTP: KServe's `{"error": "..."}`, or OpenAI's shape, and
    the headers that go with the status (for aiohttp's handlers and api/http_server.py)."""
    headers = None
    if exc.retry_after is not None:
        headers = {"Retry-After": str(max(1, round(exc.retry_after)))}
    elif exc.status == 401:
        headers = {"WWW-Authenticate": 'Bearer realm="appliance"'}
    if openai:
        from .openai import openai_error  # the OpenAI routes are aiohttp's: imported by then

        body: Any = openai_error(exc)
    else:
        body = {"error": exc.message}
    return orjson.dumps(body), headers


def begin(path: RequestPath, method: str, target: str, route: str, headers: Any,
          remote: str | None) -> Request:  # fmt: skip
    """An HTTP request into the lifecycle: what its headers carry (both HTTP servers)."""
    return path.begin(
        "http", method, target, route,
        request_id=headers.get("X-Request-Id"),
        traceparent=headers.get("traceparent"),
        remote=remote,
        meta=headers,
        timeout_ms=headers.get(TIMEOUT_HEADER),
        priority=headers.get(PRIORITY_HEADER),
        timeout_name=TIMEOUT_HEADER,
        priority_name=PRIORITY_HEADER,
        accept=headers.get("Accept"),
    )  # fmt: skip


def check_length(content_length: int | None, limit: int) -> None:
    if content_length is not None and content_length > limit:
        raise PayloadTooLarge(
            f"request body of {content_length} bytes is larger than the limit of {limit} bytes"
        )


def encode_answer(
    result: InferResponse, body: InferRequest, name: str
) -> tuple[bytes, str, dict[str, str]]:
    """A KServe v2 answer over HTTP: the body, its content type and the headers saying which
    model answered (both HTTP servers)."""
    payload, json_length = encode_response(result, body)
    out = _served_headers(result, name)
    if json_length is None:
        return payload, _JSON, out
    out["Inference-Header-Content-Length"] = str(json_length)
    return payload, "application/octet-stream", out


async def encode_formatted(
    paths: RequestPath, req: Request, result: InferResponse, body: InferRequest, name: str
) -> tuple[bytes, str, dict[str, str]]:
    """An answer in the format the client chose, not JSON (appliance/formats), with its
    Content-Type among the headers (both HTTP servers)."""
    payload, content_type = await paths.encode(req, result, body)
    out = _served_headers(result, name)
    out["Content-Type"] = content_type
    return payload, content_type, out


def _served_headers(result: InferResponse, name: str) -> dict[str, str]:
    """Which model answered (for a task, the variant or the fallback): also in the body."""
    out = {"X-Model-Name": result.model_name, "X-Model-Version": result.model_version}
    if result.parameters:
        if "task" in result.parameters:
            out["X-Task"] = name
            out["X-Fallback"] = "true" if result.parameters["fallback"] else "false"
        if result.parameters.get("cached"):
            out["X-Cache"] = "hit"
    return out


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


def ready_answer(engine: Engine, router: Router) -> dict[str, Any]:
    """GET /v2/health/ready: the models served and where, or 503 naming those not loaded yet
    (both HTTP servers: readiness probes stay on the fast path)."""
    if not engine.ready:
        waiting = [
            f"{m.name}: {m.status}" + (f" ({m.reason})" if m.reason else "")
            for m in engine.models()
            if m.status != "ready"
        ]
        raise NotReady("not ready: " + ("; ".join(waiting) or "starting"))
    models = {
        m.name: {"version": m.version, "status": m.status, "device": device_of(m)}
        for m in router.models()
    }
    return {"ready": True, "models": models}


def device_of(model: LoadedModel) -> str | None:
    return model.placement.device if model.placement else None
