"""What tracing adds to one request, on the loop thread: the decision for a request that is not
sampled, and the spans of one that is (request + compute, request + queue + compute), made
through the same calls the request path makes (beside the same calls with tracing off),
exported by the SDK to an exporter that drops.

    PYTHONPATH=. .venv/bin/python tests/bench/trace_cost.py [--n 20000]

Thread CPU time per request in microseconds (the exporter's thread is not counted).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from appliance import tracing
from appliance.engine.engine import _trace_run
from appliance.engine.scheduler import Timing
from appliance.request import Request, RequestPath
from appliance.tracing.config import TracingConfig
from appliance.tracing.otel import Tracer


class Drop(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


class Model:
    name, version = "sample", "1"


model: Any = Model()  # a stand-in for a LoadedModel: only its name and version are read


def per_call(fn: Callable[[], None], n: int) -> float:
    for _ in range(n // 10):
        fn()
    t0 = time.thread_time()
    for _ in range(n):
        fn()
    return (time.thread_time() - t0) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=20000)
    n = ap.parse_args().n
    tracer = Tracer(TracingConfig(enabled=True, max_queue_size=100_000), "bench", Drop())
    tracing.use(tracer)
    path = RequestPath.__new__(RequestPath)
    path.tracer = tracer

    def request(queued: bool) -> None:
        req = Request("http", "POST", "/v2/models/sample/infer", "/v2/models/{name}/infer",
                      "id", None, "127.0.0.1", time.perf_counter(), {})  # fmt: skip
        path.trace(req, "sample")
        with req.bound():
            now = time.perf_counter()
            timing = Timing(1e-5 if queued else 0.0, 1e-5, not queued, 1, now)
            _trace_run(model, timing)
        path.reply_traceparent(req)
        if req.span is not None:
            path._end_span(tracer, req, 200)

    tracing.use(None)
    path.tracer = None
    off = per_call(lambda: request(False), n * 5)
    print(f"tracing off (the same calls, as the baseline): {off:.2f} µs")
    tracing.use(tracer)
    path.tracer = tracer
    tracer.settings.server.ratio = 0.0
    unsampled = per_call(lambda: request(False), n * 5)
    print(f"on, not sampled: {unsampled:.2f} µs ({unsampled - off:+.2f} µs)")
    tracer.settings.server.ratio = 1.0
    print(f"sampled, request + compute spans: {per_call(lambda: request(False), n):.1f} µs")
    print(f"sampled, request + queue + compute: {per_call(lambda: request(True), n):.1f} µs")
    tracer.shutdown()


if __name__ == "__main__":
    main()
