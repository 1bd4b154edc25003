"""OpenTelemetry traces: which spans the appliance makes, and the small API the layers call.

Off by default (`[tracing] enabled = false`): then `tracer` stays None, nothing of
OpenTelemetry is imported, and each hook below costs one attribute check. On, `otel.Tracer`
(the `otel` extra) exports spans over OTLP/HTTP in a background thread.

Spans (names and attributes are the contract the tests check; README "Traces"):

- the request, one per request of every front, kind SERVER: `{method} {route}` (HTTP) or
  `PUBLISH infer` (MQTT). Its parent is the client's W3C `traceparent` (HTTP header, gRPC
  metadata, MQTT 5 user property, the JSON request's `traceparent` field over MQTT 3.1.1); the
  reply carries the request span's own `traceparent` back.
- `queue` (time waiting for a worker) and `compute` (the runtime call; `appliance.batch_size`
  requests shared it), children of the request, with `appliance.model.name` / `.version`; a
  generation or an embedding has one `run` span instead (its wait and run together);
- `step {label}` for each input and output step (appliance/steps/chain.py) and `node {name}`
  for each pipeline node (`record`);
- `sync.poll`, `sync.download`, `sync.verify`, `sync.activate` of the hub sync agent, and the
  hub's own request spans (parented on the device's through the `traceparent` it sends).

Child spans are recorded after the fact from `time.perf_counter()` stamps the code takes
anyway (`record`), so a traced request costs no context switching on the hot path and an
untraced one nothing but the checks.
"""

from __future__ import annotations

import contextvars
from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .otel import Tracer

#: The tracer while tracing is on (set by `use`), else None: the check every hook makes first.
tracer: Tracer | None = None
#: The span being worked on in this task (a traced request's, a sync operation's), else None.
current: contextvars.ContextVar[Any] = contextvars.ContextVar("appliance_span", default=None)

Attributes = Mapping[str, str | int | float | bool]


def use(new: Tracer | None) -> Tracer | None:
    """Make `new` the process's tracer (None: off); returns the previous one."""
    global tracer
    old, tracer = tracer, new
    return old


def record(name: str, start: float, end: float, attributes: Attributes) -> None:
    """A finished child span of the current one, from `time.perf_counter()` stamps; nothing
    when the work is not traced."""
    t = tracer
    if t is not None:
        parent = current.get()
        if parent is not None:
            t.child(parent, name, start, end, attributes)


class span:
    """A span around a block (sync operations, hub requests): a child of the current span, or
    a new trace (sampled at the configured ratio). Nothing when tracing is off.

        with tracing.span("sync.poll", {"appliance.hub.url": url}):
            ...
    """

    __slots__ = ("_attributes", "_name", "_span", "_token")

    def __init__(self, name: str, attributes: Attributes | None = None) -> None:
        self._name = name
        self._attributes = attributes
        self._span: Any = None
        self._token: contextvars.Token[Any] | None = None

    def __enter__(self) -> Any:
        t = tracer
        if t is not None:
            self._span = t.start(self._name, current.get(), self._attributes)
            if self._span is not None:
                self._token = current.set(self._span)
        return self._span

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._token is not None:
            current.reset(self._token)
        t = tracer
        if self._span is not None and t is not None:
            t.end(self._span, exc)


def inject(headers: dict[str, str]) -> None:
    """Add the current span's `traceparent` to outgoing HTTP headers (the sync agent's requests
    to the hub), so the hub's spans join the device's trace."""
    t = tracer
    if t is not None:
        parent = current.get()
        if parent is not None:
            headers["traceparent"] = t.traceparent(parent)


def injected(headers: dict[str, str]) -> dict[str, str]:
    """`headers` with the current span's traceparent added (see `inject`)."""
    inject(headers)
    return headers


class server(span):
    """A span (kind SERVER) around an incoming request that is not a model request (the hub's
    API): under the caller's `traceparent` header, sampled as a request is."""

    __slots__ = ("_headers",)

    def __init__(
        self, name: str, headers: Mapping[str, str], attributes: Attributes | None = None
    ) -> None:
        super().__init__(name, attributes)
        self._headers = headers

    def __enter__(self) -> Any:
        t = tracer
        if t is not None:
            self._span = t.incoming(self._name, self._headers, self._attributes)
            if self._span is not None:
                self._token = current.set(self._span)
        return self._span
