"""The protocol-neutral request and its lifecycle: the one path every front takes.

A front (the HTTP fast path, the aiohttp routes, OpenAI's routes, MQTT) only translates its wire
format: it calls `RequestPath.begin` with what its wire carries (the client's request id, the
W3C traceparent, a timeout, a priority, the metadata a task's sticky key may travel in), decodes
the body with its codec, runs it with `infer`/`generate`/`embed`, encodes the answer and maps
errors to its statuses. Everything else is done here, once, in the same order for every front:

    begin (id, trace) -> admit -> deadline, priority, sticky key -> router -> finish (account)

Accounting is one call, `finish`: the per-protocol response counters and the access log line.

Traces (appliance/tracing/): when tracing is on, `infer`/`generate`/`embed` decide whether the
request is traced (the client's traceparent, the sampling ratio, the model's trace setting) and
open its span from `begin`'s time; `finish` ends it; `reply_traceparent` is what the front's
answer carries back. A front gets its spans by passing `traceparent`/`tracestate` to `begin`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from . import tracing
from .codec import InferRequest, InferResponse, shorten_deadline, timeout_ms
from .engine import LoadedModel
from .errors import ApplianceError, InvalidInput, Overloaded
from .formats import JSON, encode
from .formats import available as formats_of
from .formats.negotiate import choose, is_plain
from .guards.policy import GuardBook, Guards
from .llm import EmbeddingResult, Generation, GenerationResult
from .logs import direct, request_id, trace_id
from .metrics import Metrics
from .routing import Router, Served
from .timeseries import RecentErrors, RequestSeries

if TYPE_CHECKING:
    from .tracing.otel import Tracer

log = logging.getLogger("appliance.request")
access = logging.getLogger("appliance.access")

Protocol = Literal["http", "mqtt", "ws", "grpc"]

_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_TRACEPARENT_RE = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")
#: Above any level a model may have (Triton's `priority` is a uint64; 0 = the default).
MAX_PRIORITY = 1 << 32


def pick_request_id(given: str | None) -> str:
    """The client's request id when it is a sane token, else a new one."""
    if given is None or not _REQUEST_ID_RE.match(given):
        return random.randbytes(16).hex()  # noqa: S311 - 32 hex digits; an id, not a secret: no syscall
    return given


def trace_of(traceparent: str | None) -> str | None:
    """The trace id of a W3C traceparent, or None when there is none or it is malformed."""
    if not traceparent:
        return None
    m = _TRACEPARENT_RE.match(traceparent.strip().lower())
    if m is None or m.group(1) == "0" * 32:
        return None
    return m.group(1)


def priority_of(raw: str | None, what: str) -> int | None:
    """A request's priority level from a header or a user property (1 = highest; 0 = the
    model's default), as the digits of a non-negative integer."""
    if raw is None:
        return None
    text = raw.strip()
    if not text.isdigit() or not text.isascii():
        raise InvalidInput(f"{what} must be a non-negative integer, got {raw[:40]!r}")
    return min(int(text), MAX_PRIORITY) or None


def worth_logging(exc: ApplianceError) -> bool:
    """Server-side failures get a log line; a refusal of a full queue does not (it is counted
    in the metrics): under overload one line per 503 would cost the CPU the 503 is saving."""
    return exc.status >= 500 and not isinstance(exc, Overloaded)


@dataclass(eq=False, slots=True)
class Request:
    """One request, whatever protocol it came on: who sent it, where it goes, how it ended."""

    protocol: Protocol
    #: The HTTP method, PUBLISH for MQTT, RPC for gRPC (the access log).
    method: str
    #: The URL path, the MQTT topic, or the gRPC method and model (the access log).
    path: str
    #: The route template (the gRPC method), the label of the response counters.
    route: str
    id: str
    trace_id: str | None
    remote: str | None
    start: float
    #: Where a sticky key may travel besides the body's parameters: HTTP headers, MQTT 5 user
    #: properties (case-insensitive lookups are the front's business).
    meta: Mapping[str, str] = field(default_factory=dict)
    #: The client's timeout on the wire (header, user property), in milliseconds, unparsed.
    timeout_ms: str | None = None
    #: Seconds from the transport itself (an MQTT message's expiry interval).
    expiry_s: float | None = None
    #: The priority on the wire (header, user property), unparsed.
    priority: str | None = None
    #: Its name on the wire, for error messages.
    timeout_name: str = "timeout"
    priority_name: str = "priority"
    #: The HTTP Accept header, unparsed (None: none, or not HTTP).
    accept: str | None = None
    #: A format named on the wire outside the body (an MQTT user property), unparsed; the
    #: body's `parameters.format` wins over it.
    format_asked: str | None = None
    format_name: str = "parameters.format"
    #: The format the answer takes, chosen by `RequestPath.infer` (appliance/formats); the
    #: front encodes in it.
    format: str = JSON
    #: Which model answered (filled in by the router).
    served: Served = field(default_factory=Served)
    status: int = 0
    #: The W3C trace context as it arrived (checked: `trace_id` is None when it is malformed).
    traceparent: str | None = None
    tracestate: str | None = None
    #: The request's span while it is traced (appliance/tracing/), else None.
    span: Any = None
    #: Whether it is traced, once that is decided (None: not yet).
    sampled: bool | None = None
    #: The name of the bearer token it came with (api/auth.py; the access log), if any.
    token_name: str | None = None
    #: The model, task or pipeline it asked for, once known (its series on the status page).
    target: str | None = None

    def bound(self) -> _Bound:
        """The request and trace ids in the logging context while this request is worked on."""
        return _Bound(self)


class _Bound:
    """Request.bound's context manager (a class: a generator-based one costs 2 µs a request)."""

    __slots__ = ("_req", "_rid", "_sid", "_tid")

    def __init__(self, req: Request) -> None:
        self._req = req

    def __enter__(self) -> None:
        req = self._req
        self._rid = request_id.set(req.id)
        self._tid = trace_id.set(req.trace_id)
        self._sid = tracing.current.set(req.span) if req.span is not None else None

    def __exit__(self, *exc: object) -> None:
        if self._sid is not None:
            tracing.current.reset(self._sid)
        trace_id.reset(self._tid)
        request_id.reset(self._rid)


class RequestPath:
    """The lifecycle every front runs its requests through (see the module docstring)."""

    def __init__(
        self, router: Router, metrics: Metrics, access_log: bool, guards: GuardBook | None = None
    ) -> None:
        self.router = router
        self.engine = router.engine
        self.metrics = metrics
        self.access_log = access_log
        #: Guardrails by model or task name (appliance/guards/): applied here, once, so every
        #: front gets them; None when the config declares none.
        self.guards = guards
        if guards is not None:
            metrics.collectors.append(guards.counters.collect)
        #: The process's tracer (appliance/tracing/) when tracing is on, else None.
        self.tracer: Tracer | None = tracing.tracer
        #: The last hour of requests per name and the last failures (the status page's).
        self.series = RequestSeries()
        self.errors = RecentErrors()

    def begin(
        self,
        protocol: Protocol,
        method: str,
        path: str,
        route: str,
        *,
        request_id: str | None = None,
        traceparent: str | None = None,
        tracestate: str | None = None,
        remote: str | None = None,
        meta: Mapping[str, str] | None = None,
        timeout_ms: str | None = None,
        priority: str | None = None,
        expiry_s: float | None = None,
        timeout_name: str = "timeout",
        priority_name: str = "priority",
        accept: str | None = None,
        format: str | None = None,
        format_name: str = "parameters.format",
    ) -> Request:
        """A request as it arrives: never raises (what it carries is checked when it runs, so
        that a malformed value is answered with the request's own id)."""
        return Request(
            protocol,
            method,
            path,
            route,
            pick_request_id(request_id),
            trace_of(traceparent),
            remote,
            time.perf_counter(),
            meta if meta is not None else {},
            timeout_ms,
            expiry_s,
            priority,
            timeout_name,
            priority_name,
            accept,
            format,
            format_name,
            JSON,
            Served(),
            0,
            traceparent,
            tracestate,
        )

    # -- stages ------------------------------------------------------------------------------
    def admit(self, req: Request, name: str, version: str | None = None) -> LoadedModel:
        """404 for an unknown model, 503 for a full queue: before a body is read or decoded.
        The level is the wire's (a header) when it gives one: under a flood of background
        work, a request marked so in its header is refused without reading its body."""
        req.target = name
        return self.router.admit(name, version, priority_of(req.priority, req.priority_name))

    def _key(self, req: Request, name: str, parameters: Mapping[str, Any]) -> str | None:
        return self.router.key_for(name, parameters, req.meta)

    def _priority(self, req: Request, name: str) -> int | None:
        """For a request whose body names no level (KServe's `parameters.priority`, decoded by
        the codec, counts first): the wire's (a header, a user property), else the task's."""
        level = priority_of(req.priority, req.priority_name)
        return level if level is not None else self.router.default_priority(name)

    async def infer(
        self, req: Request, name: str, version: str | None, body: InferRequest
    ) -> InferResponse:
        """Run a decoded KServe v2 request on model or task `name` (the hot path: its stages
        are written out here rather than called)."""
        req.target = name
        if req.expiry_s:
            shorten_deadline(body, req.expiry_s)
        if req.timeout_ms is not None:
            shorten_deadline(body, timeout_ms(req.timeout_ms, req.timeout_name))
        if "format" in body.parameters or req.format_asked is not None or not is_plain(req.accept):
            self._format(req, name, version, body)
        if self.tracer is not None:
            self.trace(req, name, version)
        router = self.router
        if not body.priority and (req.priority is not None or router.tasks):
            body.priority = self._priority(req, name)
        key = router.key_for(name, body.parameters, req.meta) if router.tasks else None
        guards = self.guards.get(name) if self.guards is not None else None
        # req.bound() written out (no object, no calls: the hot path)
        rid, tid = request_id.set(req.id), trace_id.set(req.trace_id)
        sid = tracing.current.set(req.span) if req.span is not None else None
        try:
            if guards is not None:
                response = await self._guarded_infer(guards, name, version, body, key)
            else:  # a plain model the engine runs inline answers with no coroutine below
                now = router.infer_now(name, version, body)
                response = now if now is not None else await router.infer(name, version, body, key)
        finally:
            if sid is not None:
                tracing.current.reset(sid)
            trace_id.reset(tid)
            request_id.reset(rid)
        served = req.served
        served.model, served.version = response.model_name, response.model_version
        return response

    async def _guarded_infer(
        self, guards: Guards, name: str, version: str | None, body: InferRequest, key: str | None
    ) -> InferResponse:
        """BYTES inputs through the input rules, BYTES outputs checked and masked."""
        for input_name, array in body.inputs.items():
            if array.dtype.kind == "O":
                body.inputs[input_name] = _map_bytes(array, guards.check_texts)

        def check(response: InferResponse, model: LoadedModel) -> None:
            for array in response.outputs.values():
                if array.dtype.kind == "O":
                    for text in _texts(array):
                        guards.check_output(text, model.name)

        response = await self.router.infer(
            name, version, body, key, check if guards.output is not None else None
        )
        if guards.pii is None:
            return response
        outputs = {
            out: _map_bytes(array, lambda texts: [guards.mask(t) for t in texts])
            if array.dtype.kind == "O"
            else array
            for out, array in response.outputs.items()
        }
        return InferResponse(
            response.model_name, response.model_version, outputs, response.id, response.parameters
        )

    def _format(self, req: Request, name: str, version: str | None, body: InferRequest) -> None:
        """The answer's format: the body's `format` parameter (taken out: it changes how the
        answer is written, not what it holds), else the wire's, else Accept; checked against
        what the model (for a task, the model it would use now) offers, before it runs."""
        asked, field_name = body.parameters.pop("format", None), "parameters.format"
        if asked is None:
            asked, field_name = req.format_asked, req.format_name
        model = self.router.resolve(name, version)
        what = f"model {model.name!r} version {model.version}"
        req.format = choose(asked, req.accept, formats_of(model.templates), what, field_name)

    async def encode(
        self, req: Request, result: InferResponse, body: InferRequest
    ) -> tuple[bytes, str]:
        """The answer in the request's chosen format when it is not JSON (JSON stays with the
        codec, which also writes binary tensors): its bytes and Content-Type."""
        if result.templates is not None:  # a model's, or a pipeline's, with its limits
            limits = result.templates.limits
        else:
            try:
                limits = self.engine.model(result.model_name).config.formats
            except ApplianceError:  # not an engine model (unloaded meanwhile, a pipeline)
                limits = self.engine.config.model_defaults.formats
        with req.bound():
            return await encode(req.format, result, body.parameters, limits)

    async def generate(
        self,
        req: Request,
        name: str,
        gen: Generation,
        parameters: Mapping[str, Any],
        emit: Callable[[str], None] | None = None,
        stop: Callable[[], bool] | None = None,
    ) -> tuple[LoadedModel, GenerationResult]:
        """Run a chat or completion; `parameters` is where a sticky key may be (the body).
        With guards, the prompt passes the input rules first, and the text (each streamed
        piece too) is checked and masked before it leaves."""
        req.target = name
        gen.priority = self._priority(req, name)
        key = self._key(req, name, parameters)
        if self.tracer is not None:
            self.trace(req, name)
        guards = self.guards.get(name) if self.guards is not None else None
        with req.bound():
            if guards is None:
                return await self.router.generate(name, gen, emit, stop, key, req.served)
            return await self._guarded_generate(guards, req, name, gen, key, emit, stop)

    async def _guarded_generate(
        self,
        guards: Guards,
        req: Request,
        name: str,
        gen: Generation,
        key: str | None,
        emit: Callable[[str], None] | None,
        stop: Callable[[], bool] | None,
    ) -> tuple[LoadedModel, GenerationResult]:
        count = None
        if guards.input is not None and guards.input.max_tokens:
            # The backend's tokenizer where it offers one (GGUF in-process; not through a
            # worker process): max_tokens is not checked without it.
            _, backend = self.router.text_model(name, "chat")
            count = getattr(backend, "count_tokens", None)
        if gen.kind == "chat":
            contents = [str(m.get("content", "")) for m in gen.messages]
            texts = guards.check_texts(contents, count)
            gen.messages = [{**m, "content": t} for m, t in zip(gen.messages, texts, strict=True)]
        else:
            (gen.prompt,) = guards.check_texts([gen.prompt], count)
        masker = guards.stream() if emit is not None else None
        forward = emit
        if masker is not None and emit is not None:
            deliver, feed = emit, masker.feed

            def forward(text: str) -> None:
                piece = feed(text)
                if piece:
                    deliver(piece)

        def check(result: GenerationResult, model: LoadedModel) -> None:
            guards.check_output(result.text, model.name)

        model, result = await self.router.generate(
            name, gen, forward, stop, key, req.served,
            check if guards.output is not None else None,
        )  # fmt: skip
        if masker is not None and emit is not None:
            tail = masker.flush()
            if tail:
                emit(tail)
            guards.count_stream(masker)
            text = guards.pii.mask(result.text)[0] if guards.pii is not None else result.text
        else:
            text = guards.mask(result.text)
        if text is not result.text:  # a new result: the router's cache may hold this one
            result = dataclasses.replace(result, text=text)
        return model, result

    async def embed(
        self, req: Request, name: str, texts: list[str], parameters: Mapping[str, Any]
    ) -> tuple[LoadedModel, EmbeddingResult]:
        req.target = name
        key = self._key(req, name, parameters)
        priority = self._priority(req, name)
        if self.tracer is not None:
            self.trace(req, name)
        with req.bound():
            return await self.router.embed(name, texts, key, req.served, priority)

    # -- traces ------------------------------------------------------------------------------
    def carry(self, req: Request, traceparent: Any, tracestate: Any = None) -> None:
        """A trace context found in the body (the JSON fields of an MQTT 3.1.1 request) for a
        request whose wire had none."""
        if req.traceparent is None and isinstance(traceparent, str):
            req.traceparent = traceparent
            req.trace_id = trace_of(traceparent)
            req.tracestate = tracestate if isinstance(tracestate, str) else None

    def trace(self, req: Request, name: str | None, version: str | None = None) -> None:
        """Open the request's span (dated from `begin`) if it is to be traced: decided once,
        when the model is known (its trace setting counts), or when the request fails before."""
        tracer = self.tracer
        if tracer is None or req.sampled is not None:
            return
        parent = req.traceparent if req.trace_id is not None else None
        req.sampled = tracer.decide(name, parent)
        if not req.sampled:
            return
        attributes: dict[str, str | int | float | bool] = {
            "appliance.request_id": req.id,
            "appliance.protocol": req.protocol,
        }
        if name is not None:
            attributes["appliance.model.requested"] = name
        if version is not None:
            attributes["appliance.model.requested_version"] = version
        if req.protocol == "mqtt":
            attributes["messaging.system"] = "mqtt"
            attributes["messaging.operation.type"] = "process"
            attributes["messaging.destination.name"] = req.path
        elif req.protocol == "http":
            attributes["http.request.method"] = req.method
            attributes["http.route"] = req.route
            attributes["url.path"] = req.path
        if req.remote:
            attributes["client.address"] = req.remote
        # HTTP headers (the fast path's are lower-cased) and MQTT 5 user properties
        state = req.tracestate if req.tracestate is not None else req.meta.get("tracestate")
        req.span = tracer.server(f"{req.method} {req.route}", req.start, parent, state, attributes)
        if req.trace_id is None:  # the logs name the trace the request started
            req.trace_id = tracer.trace_id(req.span)

    def reply_traceparent(self, req: Request) -> str | None:
        """The traceparent a traced request's answer carries back (its own span), else None."""
        if req.span is None or self.tracer is None:
            return None
        return self.tracer.traceparent(req.span)

    # -- the end -----------------------------------------------------------------------------
    def failed(self, req: Request, exc: ApplianceError) -> int:
        """A request that ended in an error: logged if it is the server's fault; its status.
        Traced as any request when tracing is on (the fronts call this before answering, so
        the answer carries the trace context back)."""
        if self.tracer is not None:
            self.trace(req, None)
        if worth_logging(exc):
            with req.bound():
                log.warning("%s %s: %s", req.method, req.path, exc.message)
        if req.target is not None:  # a model's, task's or pipeline's (not auth, not health)
            self.errors.add(exc.status, req.target, req.path, exc.message, req.id)
        return exc.status

    def crashed(self, req: Request) -> None:
        """A bug: logged with its traceback (the front answers 500)."""
        with req.bound():
            log.exception("unhandled error on %s %s", req.method, req.path)
        self.errors.add(500, req.target, req.path, "internal server error", req.id)

    def finish(self, req: Request, status: int, answered: bool = True) -> None:
        """Account for a request once it is answered: response counters, the status page's
        series, and the access log (formatted after this step: the client does not wait for
        its log line)."""
        req.status = status
        now = time.perf_counter()
        seconds = now - req.start
        target = req.target
        if target is not None and status != 404:  # 404: a name nobody serves
            self.series.record(target, status, seconds, now)
            model = req.served.model
            if model and model != target:  # through a task: the model's series counts it too
                self.series.record(model, status, seconds, now)
        if req.protocol == "http":
            self.metrics.http_response(req.route, status)
        elif req.protocol == "ws":
            self.metrics.ws_message(status)
        elif req.protocol == "grpc":
            self.metrics.grpc_response(req.route, status)
        else:
            self.metrics.mqtt_message(status, answered)
        if self.access_log and access.isEnabledFor(logging.INFO):  # (the logger caches it)
            asyncio.get_running_loop().call_soon(log_access, req, seconds)
        if req.span is not None and self.tracer is not None:
            self._end_span(self.tracer, req, status)

    def _end_span(self, tracer: Tracer, req: Request, status: int) -> None:
        attributes: dict[str, str | int | float | bool] = {"appliance.status": status}
        if req.protocol == "http":
            attributes["http.response.status_code"] = status
        served = req.served
        if served.model:
            attributes["appliance.model.name"] = served.model
            attributes["appliance.model.version"] = served.version
        if served.task is not None:
            attributes["appliance.task"] = served.task
        tracer.finish(req.span, status, time.perf_counter(), attributes)
        req.span = None


def _texts(array: Any) -> list[str]:
    """The elements of a BYTES tensor as text (those that are not UTF-8 are not text: left
    out of the text rules)."""
    out = []
    for item in array.reshape(-1):
        if isinstance(item, bytes):
            try:
                out.append(item.decode("utf-8"))
            except UnicodeDecodeError:
                continue
        elif isinstance(item, str):
            out.append(item)
    return out


def _map_bytes(array: Any, change: Callable[[list[str]], list[str]]) -> Any:
    """A new BYTES tensor with its UTF-8 elements passed through `change` (all at once)."""
    flat = array.reshape(-1)
    where, texts = [], []
    for i, item in enumerate(flat):
        if isinstance(item, bytes):
            try:
                texts.append(item.decode("utf-8"))
            except UnicodeDecodeError:
                continue
            where.append(i)
    if not where:
        return array
    out = flat.copy()
    for i, text in zip(where, change(texts), strict=True):
        out[i] = text.encode("utf-8")
    return out.reshape(array.shape)


def log_access(req: Request, seconds: float) -> None:
    fields: dict[str, Any] = {
        "status": req.status,
        "duration_ms": round(seconds * 1000, 3),
        "remote": req.remote,
    }
    if req.protocol != "http":
        fields["protocol"] = req.protocol
    if req.token_name is not None:
        fields["token_name"] = req.token_name  # its name: who called, never the secret
    handler = direct(access, logging.INFO)
    if handler is not None:  # the same line, without a LogRecord
        msg = f"{req.method} {req.path} {req.status:d}"
        handler.emit_line(access.name, "INFO", msg, req.id, req.trace_id, fields)
        return
    access.info(
        "%s %s %d",
        req.method,
        req.path,
        req.status,
        extra={"request_id": req.id, "trace_id": req.trace_id, "fields": fields},
    )
