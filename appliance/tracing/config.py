"""The `[tracing]` section: OpenTelemetry traces exported over OTLP/HTTP (appliance/tracing/).

    [tracing]
    enabled = true
    endpoint = "http://localhost:4318/v1/traces"   # an OpenTelemetry Collector, Jaeger, Tempo...
    sampling_ratio = 0.001        # of requests that arrive without a sampled traceparent
    service_name = "appliance"
    [tracing.resource]            # more resource attributes (strings)
    "deployment.environment" = "factory-3"

Off by default: nothing of OpenTelemetry is imported and no exporter runs until `enabled`.
A request whose W3C `traceparent` says "sampled" is always traced (parent-based sampling);
one whose traceparent says "not sampled" never is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import Invalid, between, device_name, not_empty, url_scheme


@dataclass
class TracingConfig:
    enabled: bool = False
    #: Where spans go: an OTLP/HTTP traces endpoint (protobuf).
    endpoint: str = field(
        default="http://localhost:4318/v1/traces", metadata=url_scheme("http://", "https://")
    )
    #: The share of requests traced that arrive without a traceparent (Triton's default rate is
    #: one in 1000); changed at run time by POST /v2/trace/setting.
    sampling_ratio: float = field(default=0.001, metadata=between(0, 1))
    service_name: str = field(default="appliance", metadata=not_empty("must not be empty"))
    #: The `service.instance.id` and `device.id` resource attributes; empty: [mqtt] device_id,
    #: else [hub] device_id, else the host name.
    device_id: str = field(default="", metadata=device_name("a device id"))
    #: More resource attributes, all strings (`service.version` is the appliance's version).
    resource: dict[str, str] = field(default_factory=dict)
    #: Spans waiting for export beyond this are dropped (counted by the SDK), never queued
    #: without bound.
    max_queue_size: int = field(default=2048, metadata=between(1, 1_000_000))
    #: Spans per export request, and how long the exporter waits before sending a batch.
    max_export_batch_size: int = field(default=512, metadata=between(1, 100_000))
    schedule_delay_ms: int = field(default=1000, metadata=between(1, 3_600_000))
    export_timeout_s: float = field(default=10.0, metadata=between(0.1, 600))

    def check(self) -> None:
        if self.max_export_batch_size > self.max_queue_size:
            raise Invalid("max_export_batch_size", "must not be above max_queue_size")
        if self.enabled and not self.endpoint:
            raise Invalid("endpoint", "must be set while tracing is enabled")
