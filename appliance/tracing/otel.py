"""The OpenTelemetry side of tracing (the `otel` extra): imported only when [tracing] is on.

The sampling decision is the appliance's own (settings.py), taken before OpenTelemetry is
touched: a request that is not traced costs a random number, not a non-recording span (about
6 µs in the SDK). Spans that are made are always recorded and exported by a
BatchSpanProcessor (a bounded queue, a background thread, OTLP/HTTP protobuf).
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from .. import __version__
from . import Attributes
from .config import TracingConfig
from .settings import TraceSettings

_PROPAGATOR = TraceContextTextMapPropagator()
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")


def trace_of(traceparent: str) -> str | None:
    """The trace id of a well-formed traceparent (as request.trace_of, which is a layer up)."""
    m = _TRACEPARENT.match(traceparent.strip().lower())
    return None if m is None or m.group(1) == "0" * 32 else m.group(1)


def sampled_flag(traceparent: str | None) -> bool | None:
    """The sampled flag of a W3C traceparent already checked (request.trace_of), else None."""
    if not traceparent:
        return None
    try:
        return bool(int(traceparent.strip()[-2:], 16) & 1)
    except ValueError:
        return None


class Tracer:
    """Spans of one process, exported to `config.endpoint`."""

    def __init__(
        self, config: TracingConfig, device_id: str = "", exporter: SpanExporter | None = None
    ) -> None:
        device = config.device_id or device_id or socket.gethostname()
        attributes: dict[str, str] = {
            "service.name": config.service_name,
            "service.version": __version__,
            "service.instance.id": device,
            "device.id": device,
            **config.resource,
        }
        self.provider = TracerProvider(resource=Resource.create(attributes), sampler=ALWAYS_ON)
        self.exporter = exporter or OTLPSpanExporter(
            endpoint=config.endpoint, timeout=config.export_timeout_s
        )
        self.provider.add_span_processor(
            BatchSpanProcessor(
                self.exporter,
                max_queue_size=config.max_queue_size,
                schedule_delay_millis=config.schedule_delay_ms,
                max_export_batch_size=config.max_export_batch_size,
                export_timeout_millis=int(config.export_timeout_s * 1000),
            )
        )
        self.tracer = self.provider.get_tracer("appliance", __version__)
        self.settings = TraceSettings(config.sampling_ratio)
        # perf_counter stamps -> the epoch nanoseconds spans carry
        self._offset_ns = time.time_ns() - int(time.perf_counter() * 1e9)

    def _ns(self, t: float) -> int:
        return self._offset_ns + int(t * 1e9)

    # -- requests ----------------------------------------------------------------------------
    def decide(self, model: str | None, traceparent: str | None) -> bool:
        return self.settings.decide(model, sampled_flag(traceparent))

    def server(
        self,
        name: str,
        start: float,
        traceparent: str | None,
        tracestate: str | None,
        attributes: Attributes,
    ) -> Span:
        """A request's span (kind SERVER) from its perf_counter start, under the client's
        traceparent when it sent one."""
        context = None
        if traceparent:
            carrier = {"traceparent": traceparent}
            if tracestate:
                carrier["tracestate"] = tracestate
            context = _PROPAGATOR.extract(carrier)
        return self.tracer.start_span(
            name, context, SpanKind.SERVER, attributes, start_time=self._ns(start)
        )

    def finish(
        self, span: Span, status: int, end: float, attributes: Attributes | None = None
    ) -> None:
        """End a request's span with its status (5xx: an error, as semantic conventions say
        for servers; 4xx is the client's)."""
        if attributes:
            span.set_attributes(attributes)
        if status >= 500:
            span.set_status(Status(StatusCode.ERROR, str(status)))
            span.set_attribute("error.type", str(status))
        span.end(self._ns(end))

    def child(
        self, parent: Span, name: str, start: float, end: float, attributes: Attributes
    ) -> None:
        span = self.tracer.start_span(
            name, trace.set_span_in_context(parent), SpanKind.INTERNAL, attributes,
            start_time=self._ns(start),
        )  # fmt: skip
        span.end(self._ns(end))

    def traceparent(self, span: Span) -> str:
        """The W3C traceparent naming `span` (the one a reply carries back)."""
        ctx = span.get_span_context()
        return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"

    def trace_id(self, span: Span) -> str:
        return f"{span.get_span_context().trace_id:032x}"

    # -- blocks (sync, hub) ------------------------------------------------------------------
    def start(self, name: str, parent: Any, attributes: Attributes | None) -> Span | None:
        """A span now: a child of `parent`, or (none) a new trace; background work such as a
        sync poll runs once a minute, so it is always traced."""
        context = trace.set_span_in_context(parent) if parent is not None else None
        return self.tracer.start_span(name, context, SpanKind.INTERNAL, attributes)

    def incoming(
        self, name: str, headers: Mapping[str, str], attributes: Attributes | None
    ) -> Span | None:
        """A SERVER span for a request with these headers, if it is to be traced."""
        traceparent = headers.get("traceparent")
        if traceparent is not None and trace_of(traceparent) is None:
            traceparent = None  # malformed: as if absent
        if not self.decide(None, traceparent):
            return None
        return self.server(
            name, time.perf_counter(), traceparent, headers.get("tracestate"), attributes or {}
        )

    def end(self, span: Span, exc: BaseException | None) -> None:
        if exc is not None:
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            span.set_attribute("error.type", type(exc).__name__)
        span.end()

    def shutdown(self) -> None:
        """Export what is queued (bounded by the export timeout), then stop the thread."""
        self.provider.shutdown()


def from_config(config: TracingConfig, device_id: str = "") -> Tracer:
    return Tracer(config, device_id)
