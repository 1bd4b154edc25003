"""Prometheus metrics, one registry per server so tests and embedded uses never collide."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from . import __version__

#: Sub-millisecond resolution matters: a tiny model answers in tens of microseconds.
LATENCY_BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
OUTCOMES = ("success", "invalid", "overloaded", "timeout", "error")


@dataclass
class ModelMetrics:
    """Children bound to one model version once, so the request path does no label lookups."""

    outcomes: dict[str, Any]
    queue: Any
    compute: Any
    total: Any
    queue_depth: Any
    inflight: Any
    inline: Any


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        labels = ("model", "version")
        self.requests = Counter(
            "appliance_inference_requests",
            "Inference requests by outcome",
            (*labels, "outcome"),
            registry=r,
        )
        self.queue_seconds = Histogram(
            "appliance_inference_queue_seconds",
            "Time a request waited for a worker",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.compute_seconds = Histogram(
            "appliance_inference_compute_seconds",
            "Time the runtime spent on a request",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.request_seconds = Histogram(
            "appliance_inference_request_seconds",
            "Time from a request reaching the engine to its answer",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "appliance_queue_depth", "Requests waiting for a worker", labels, registry=r
        )
        self.inflight = Gauge(
            "appliance_inflight_requests", "Requests running in the runtime", labels, registry=r
        )
        self.inline = Counter(
            "appliance_inference_inline_requests",
            "Requests run on the event loop thread, measured fast enough to skip the hand-off",
            labels,
            registry=r,
        )
        self.load_seconds = Gauge(
            "appliance_model_load_seconds", "How long the model took to load", labels, registry=r
        )
        self.model_ready = Gauge(
            "appliance_model_ready",
            "1 when the model version serves requests",
            labels,
            registry=r,
        )
        self.model_device = Gauge(
            "appliance_model_device_info",
            "Where a model runs (device, runtime detail, whether it fell back to the CPU)",
            (*labels, "device", "detail", "fallback"),
            registry=r,
        )
        self.http_responses = Counter(
            "appliance_http_responses",
            "HTTP responses by route and status",
            ("route", "status"),
            registry=r,
        )
        self._http_children: dict[tuple[str, int], Any] = {}
        build = Gauge("appliance_build_info", "Version of this appliance", ("version",), registry=r)
        build.labels(__version__).set(1)

    def http_response(self, route: str, status: int) -> None:
        """Count one HTTP response; children are cached (routes and statuses are few)."""
        key = (route, status)
        child = self._http_children.get(key)
        if child is None:
            child = self._http_children[key] = self.http_responses.labels(route, str(status))
        child.inc()

    def for_model(self, name: str, version: str) -> ModelMetrics:
        return ModelMetrics(
            outcomes={o: self.requests.labels(name, version, o) for o in OUTCOMES},
            queue=self.queue_seconds.labels(name, version),
            compute=self.compute_seconds.labels(name, version),
            total=self.request_seconds.labels(name, version),
            queue_depth=self.queue_depth.labels(name, version),
            inflight=self.inflight.labels(name, version),
            inline=self.inline.labels(name, version),
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
