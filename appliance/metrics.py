"""Prometheus metrics, one registry per server so tests and embedded uses never collide.

The request path only bumps plain integers and bucket counts, all on the event loop thread (the
scheduler hands worker timings back to the loop), so it takes no locks and no label lookups.
prometheus-client turns them into the exposition format at scrape time through a collector;
gauges (queue depth, in-flight, readiness, device) are read from the engine at that moment too.
It is imported by the first scrape, not before: with the stdlib its exposition module pulls in
(http.server, urllib.request, email, wsgiref) it holds ~4.5 MiB a device never scraped needs not.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import __version__

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import Metric

#: Sub-millisecond resolution matters: a tiny model answers in tens of microseconds.
LATENCY_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
#: Requests merged into one runtime call (dynamic batching).
BATCH_BUCKETS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0)
OUTCOMES = ("success", "invalid", "overloaded", "timeout", "error", "cancelled")
#: MQTT requests by outcome: the status of their reply.
_MQTT_OUTCOMES = {400: "invalid", 404: "not_found", 413: "invalid", 415: "invalid",
                  503: "overloaded", 504: "timeout"}  # fmt: skip


class Histogram:
    """Bucket counts for one label set; `observe` is two list operations."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    def buckets(self) -> list[tuple[str, float]]:
        out, total = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += n
            out.append(("+Inf" if bound == float("inf") else repr(bound), float(total)))
        return out


class LevelStats:
    """Counters of one priority level of a model version (loop thread only)."""

    __slots__ = ("delayed", "evicted", "queue", "refused", "rejected", "total")

    def __init__(self) -> None:
        #: Queued requests answered 503 to make room for a higher level.
        self.evicted = 0
        #: Requests refused on arrival: the level's own max_queue, or a full model queue with
        #: nothing of a lower level to evict.
        self.refused = 0
        #: Requests past the level's queue timeout, answered 503 or moved back.
        self.rejected = 0
        self.delayed = 0
        #: Time waited for a worker, and from entering the queue to the answer.
        self.queue = Histogram()
        self.total = Histogram()


class ModelStats:
    """Counters of one model version, updated on the event loop thread only.

    A request run inline (on the loop thread) only bumps `inline`: its queue wait of 0 and its
    batch of 1 are added to those histograms when they are read (the hot path skips two
    observations of constants)."""

    __slots__ = ("_batch", "_folded", "_queue", "compute", "inline", "levels", "outcomes",
                 "total")  # fmt: skip

    def __init__(self) -> None:
        self.outcomes = dict.fromkeys(OUTCOMES, 0)
        self._queue = Histogram()
        self.compute = Histogram()
        self.total = Histogram()
        #: Requests per runtime call (1 when a request ran alone).
        self._batch = Histogram(BATCH_BUCKETS)
        self.inline = 0
        self._folded = 0  # inline requests already in `_queue` and `_batch`
        #: Per priority level, from level 1; empty for a model with one level.
        self.levels: list[LevelStats] = []

    def _fold(self) -> None:
        inline = self.inline
        n = inline - self._folded
        if n:
            self._folded = inline
            self._queue.counts[bisect_left(self._queue.bounds, 0.0)] += n
            self._batch.counts[bisect_left(self._batch.bounds, 1)] += n
            self._batch.sum += n

    @property
    def queue(self) -> Histogram:
        """Time a request waited for a worker (0 for one run inline)."""
        self._fold()
        return self._queue

    @property
    def batch(self) -> Histogram:
        """Requests per runtime call (1 for one run inline)."""
        self._fold()
        return self._batch


@dataclass(frozen=True)
class ModelGauges:
    """A model's state at scrape time, as the engine reports it."""

    name: str
    version: str
    ready: bool
    device: str | None
    detail: str
    fallback: bool
    load_seconds: float
    queue_depth: int
    inflight: int
    #: Requests waiting per priority level, from level 1 (empty: the model has one level).
    queued_by_level: tuple[int, ...] = ()


@dataclass(frozen=True)
class SyncGauges:
    """The sync agent's state at scrape time (appliance/sync/agent.py)."""

    state: str
    tuf: str
    last_success: float
    expired: bool
    outbox_depth: int
    outbox_bytes: int
    outbox_dropped: int
    uploads: dict[str, int]
    updates: dict[str, int]
    #: (mirror, "metadata" | "target", "ok" | "failed" | "refused" | "behind") -> fetches.
    mirror_fetches: dict[tuple[str, str, str], int] = field(default_factory=dict)


SYNC_STATES = ("starting", "idle", "offline", "checking", "downloading", "verifying", "storing",
               "activating", "expired", "error")  # fmt: skip


class Metrics:
    """The server's counters, and the collector (`collect`) of its registry."""

    def __init__(self) -> None:
        #: Made by the first scrape (`render`), which imports prometheus_client.
        self._registry: CollectorRegistry | None = None
        self._models: dict[tuple[str, str], ModelStats] = {}
        #: appliance_step_seconds: (model or pipeline, step label or node) -> time spent in it.
        self._steps: dict[tuple[str, str], Histogram] = {}
        self._http: dict[tuple[str, int], int] = {}
        #: gRPC answers by method and the HTTP status of their outcome (api/grpc.py maps it to
        #: a gRPC code once); empty while gRPC is off.
        self._grpc: dict[tuple[str, int], int] = {}
        #: Set by the engine: the current state of every model.
        self.gauge_source: Callable[[], list[ModelGauges]] = list
        #: MQTT requests by outcome, and whether the broker connection is up (None: no MQTT).
        self.mqtt_messages: dict[str, int] = {}
        self.mqtt_connected: int | None = None
        #: WebSocket streams (api/ws.py): messages by outcome, received, dropped, open now.
        self.ws_messages: dict[str, int] = {}
        self.ws_received = 0
        self.ws_dropped = 0
        self.ws_connections = 0
        #: More families made at scrape time (the router's: tasks, cache, breakers, retries).
        self.collectors: list[Callable[[], Iterable[Metric]]] = []
        #: Set by the sync agent when the appliance syncs with a hub.
        self.sync_source: Callable[[], SyncGauges] | None = None

    def for_model(self, name: str, version: str) -> ModelStats:
        return self._models.setdefault((name, version), ModelStats())

    def for_step(self, model: str, step: str) -> Histogram:
        """The `appliance_step_seconds` histogram of one step of a model (its declared name,
        else its type) or one node of a pipeline. Call it on the loop thread (at load), then
        observe."""
        return self._steps.setdefault((model, step), Histogram())

    def model_snapshot(self) -> dict[str, dict[str, float]]:
        """Per model version: requests by outcome and mean latency (a telemetry snapshot)."""
        out: dict[str, dict[str, float]] = {}
        for (name, version), stats in self._models.items():
            n = sum(stats.total.counts)
            out[f"{name}/{version}"] = {
                **{k: float(v) for k, v in stats.outcomes.items() if v},
                "mean_seconds": stats.total.sum / n if n else 0.0,
                "compute_mean_seconds": (
                    stats.compute.sum / sum(stats.compute.counts)
                    if sum(stats.compute.counts)
                    else 0.0
                ),
            }
        return out

    def http_response(self, route: str, status: int) -> None:
        key = (route, status)
        self._http[key] = self._http.get(key, 0) + 1

    def grpc_response(self, method: str, status: int) -> None:
        key = (method, status)
        self._grpc[key] = self._grpc.get(key, 0) + 1

    def stats_of(self, name: str, version: str) -> ModelStats | None:
        """The counters of a model version, if it was ever asked for (gRPC ModelStatistics)."""
        return self._models.get((name, version))

    def mqtt_message(self, status: int, answered: bool = True) -> None:
        outcome = "success" if status == 200 else _MQTT_OUTCOMES.get(status, "error")
        if not answered:
            outcome += "_unanswered"
        self.mqtt_messages[outcome] = self.mqtt_messages.get(outcome, 0) + 1

    def ws_message(self, status: int) -> None:
        outcome = "success" if status == 200 else _MQTT_OUTCOMES.get(status, "error")
        self.ws_messages[outcome] = self.ws_messages.get(outcome, 0) + 1

    def _ws_metrics(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        answered = CounterMetricFamily(
            "appliance_ws_messages", "WebSocket requests answered, by outcome", labels=["outcome"]
        )
        for outcome, n in self.ws_messages.items():
            answered.add_metric([outcome], n)
        yield answered
        yield CounterMetricFamily(
            "appliance_ws_received", "WebSocket messages received", value=self.ws_received
        )
        yield CounterMetricFamily(
            "appliance_ws_dropped",
            "WebSocket requests dropped unanswered (policy drop_oldest, queue full)",
            value=self.ws_dropped,
        )
        yield GaugeMetricFamily(
            "appliance_ws_connections", "WebSocket streams open", value=self.ws_connections
        )

    def _priority_metrics(self, gauges: list[ModelGauges]) -> Iterator[Metric]:
        """Per model and priority level, for the models with more than one level."""
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        if not any(g.queued_by_level for g in gauges) and not any(
            s.levels for s in self._models.values()
        ):
            return
        labels = ["model", "version", "level"]
        queued = GaugeMetricFamily(
            "appliance_priority_queued",
            "Requests waiting for a worker, by priority level",
            labels=labels,
        )
        counters = {
            "evicted": CounterMetricFamily(
                "appliance_priority_evicted",
                "Queued requests answered 503 to make room for a request of a higher level",
                labels=labels,
            ),
            "refused": CounterMetricFamily(
                "appliance_priority_refused",
                "Requests refused on arrival: their level's max_queue, or a full queue holding "
                "nothing of a lower level",
                labels=labels,
            ),
        }
        timeouts = CounterMetricFamily(
            "appliance_priority_queue_timeouts",
            "Requests that waited longer than their level's timeout_s, by the action taken",
            labels=[*labels, "action"],
        )
        hists = {
            "queue": HistogramMetricFamily(
                "appliance_priority_queue_seconds",
                "Time a request waited for a worker, by priority level", labels=labels,
            ),
            "total": HistogramMetricFamily(
                "appliance_priority_request_seconds",
                "Time from entering the model's queue to the answer, by priority level",
                labels=labels,
            ),
        }  # fmt: skip
        for g in gauges:
            for i, n in enumerate(g.queued_by_level, 1):
                queued.add_metric([g.name, g.version, str(i)], n)
        for (name, version), stats in self._models.items():
            for i, level in enumerate(stats.levels, 1):
                values = [name, version, str(i)]
                counters["evicted"].add_metric(values, level.evicted)
                counters["refused"].add_metric(values, level.refused)
                timeouts.add_metric([*values, "reject"], level.rejected)
                timeouts.add_metric([*values, "delay"], level.delayed)
                for key, family in hists.items():
                    h: Histogram = getattr(level, key)
                    family.add_metric(values, h.buckets(), h.sum)
        yield queued
        yield from counters.values()
        yield timeouts
        yield from hists.values()

    @property
    def content_type(self) -> str:
        """The media type of `render`'s answer (imports prometheus_client, as a scrape does)."""
        from prometheus_client.exposition import CONTENT_TYPE_LATEST

        return CONTENT_TYPE_LATEST

    @property
    def registry(self) -> CollectorRegistry:
        """The registry this collector is in, made (with the library's import) on first use."""
        if self._registry is None:
            from prometheus_client import CollectorRegistry

            self._registry = CollectorRegistry(auto_describe=False)
            self._registry.register(self)
        return self._registry

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        labels = ["model", "version"]
        requests = CounterMetricFamily(
            "appliance_inference_requests",
            "Inference requests by outcome",
            labels=[*labels, "outcome"],
        )
        inline = CounterMetricFamily(
            "appliance_inference_inline_requests",
            "Requests run on the event loop thread, measured fast enough to skip the hand-off",
            labels=labels,
        )
        hists = {
            "queue": HistogramMetricFamily(
                "appliance_inference_queue_seconds", "Time a request waited for a worker",
                labels=labels,
            ),
            "compute": HistogramMetricFamily(
                "appliance_inference_compute_seconds", "Time the runtime spent on a request",
                labels=labels,
            ),
            "total": HistogramMetricFamily(
                "appliance_inference_request_seconds",
                "Time from a request reaching the engine to its answer", labels=labels,
            ),
            "batch": HistogramMetricFamily(
                "appliance_batch_size",
                "Requests merged into one runtime call (dynamic batching)", labels=labels,
            ),
        }  # fmt: skip
        for (name, version), stats in self._models.items():
            for outcome, n in stats.outcomes.items():
                requests.add_metric([name, version, outcome], n)
            inline.add_metric([name, version], stats.inline)
            for key, family in hists.items():
                h: Histogram = getattr(stats, key)
                family.add_metric([name, version], h.buckets(), h.sum)
        yield requests
        yield inline
        yield from hists.values()
        if self._steps:
            steps = HistogramMetricFamily(
                "appliance_step_seconds",
                "Time spent in one step of a model or one node of a pipeline",
                labels=["model", "step"],
            )
            for (model, step), h in self._steps.items():
                steps.add_metric([model, step], h.buckets(), h.sum)
            yield steps

        gauges = self.gauge_source()
        depth = GaugeMetricFamily(
            "appliance_queue_depth", "Requests waiting for a worker", labels=labels
        )
        inflight = GaugeMetricFamily(
            "appliance_inflight_requests", "Requests running in the runtime", labels=labels
        )
        ready = GaugeMetricFamily(
            "appliance_model_ready", "1 when the model version serves requests", labels=labels
        )
        load = GaugeMetricFamily(
            "appliance_model_load_seconds", "How long the model took to load", labels=labels
        )
        device = GaugeMetricFamily(
            "appliance_model_device_info",
            "Where a model runs (device, runtime detail, whether it fell back to the CPU)",
            labels=[*labels, "device", "detail", "fallback"],
        )
        for g in gauges:
            values = [g.name, g.version]
            depth.add_metric(values, g.queue_depth)
            inflight.add_metric(values, g.inflight)
            ready.add_metric(values, 1 if g.ready else 0)
            if g.device is not None:
                load.add_metric(values, g.load_seconds)
                device.add_metric([*values, g.device, g.detail, str(g.fallback).lower()], 1)
        yield from (depth, inflight, ready, load, device)
        yield from self._priority_metrics(gauges)
        for extra in self.collectors:
            yield from extra()

        http = CounterMetricFamily(
            "appliance_http_responses",
            "HTTP responses by route and status",
            labels=["route", "status"],
        )
        for (route, status), n in self._http.items():
            http.add_metric([route, str(status)], n)
        yield http
        if self.ws_received or self.ws_connections:
            yield from self._ws_metrics()
        if self._grpc:
            grpc = CounterMetricFamily(
                "appliance_grpc_responses",
                "gRPC answers by method and status (the HTTP status of the outcome)",
                labels=["method", "status"],
            )
            for (method, status), n in self._grpc.items():
                grpc.add_metric([method, str(status)], n)
            yield grpc
        if self.mqtt_connected is not None:
            mqtt = CounterMetricFamily(
                "appliance_mqtt_requests", "MQTT requests by outcome", labels=["outcome"]
            )
            for outcome, n in self.mqtt_messages.items():
                mqtt.add_metric([outcome], n)
            yield mqtt
            yield GaugeMetricFamily(
                "appliance_mqtt_connected", "1 while connected to the broker",
                value=self.mqtt_connected,
            )  # fmt: skip
        if self.sync_source is not None:
            yield from _sync_metrics(self.sync_source())
        info = GaugeMetricFamily(
            "appliance_build_info", "Version of this appliance", labels=["version"]
        )
        info.add_metric([__version__], 1)
        yield info


def _sync_metrics(g: SyncGauges) -> Iterator[Metric]:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    state = GaugeMetricFamily(
        "appliance_sync_state", "1 for the sync agent's current state", labels=["state"]
    )
    for name in SYNC_STATES:
        state.add_metric([name], 1 if g.state == name else 0)
    yield state
    yield GaugeMetricFamily(
        "appliance_sync_last_success_timestamp_seconds",
        "Unix time the hub last answered a check (0: never)", value=g.last_success,
    )  # fmt: skip
    yield GaugeMetricFamily(
        "appliance_sync_metadata_expired",
        "1 while the TUF metadata is expired: updates stop, serving goes on", value=int(g.expired),
    )  # fmt: skip
    yield GaugeMetricFamily(
        "appliance_sync_outbox_events", "Telemetry events waiting for upload", value=g.outbox_depth
    )
    yield GaugeMetricFamily(
        "appliance_sync_outbox_bytes", "Bytes the waiting events take", value=g.outbox_bytes
    )
    yield CounterMetricFamily(
        "appliance_sync_outbox_dropped",
        "Events dropped because the outbox was full (each drop is reported as an event)",
        value=g.outbox_dropped,
    )
    uploads = CounterMetricFamily(
        "appliance_sync_uploads", "Telemetry upload attempts by result", labels=["result"]
    )
    for result, n in g.uploads.items():
        uploads.add_metric([result], n)
    yield uploads
    updates = CounterMetricFamily(
        "appliance_sync_updates", "Model updates by outcome", labels=["outcome"]
    )
    for outcome, n in g.updates.items():
        updates.add_metric([outcome], n)
    yield updates
    fetches = CounterMetricFamily(
        "appliance_sync_mirror_fetches",
        "TUF metadata refreshes and model downloads by source (the hub's /tuf or a mirror)",
        labels=["mirror", "what", "result"],
    )
    for (mirror, what, result), n in sorted(g.mirror_fetches.items()):
        fetches.add_metric([mirror, what, result], n)
    yield fetches
