"""The default `appliance bench MODEL`: what the appliance adds on top of the runtime.

The same model and input are timed twice, side by side: the raw runtime call in-process (and
again with idle gaps, as a server sees its requests) and the HTTP round trip through a real
`appliance serve` subprocess; then the HTTP floor (/v2/health/live), optionally MQTT round trips,
throughput at some concurrency and the server's memory and CPU time per request.
"""

from __future__ import annotations

import gc
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .client import HttpConnection, build_request, error_text, header
from .errors import BenchError
from .inputs import check_outputs, infer_body, infer_request, make_inputs, read_outputs
from .model import Target, load_backend, raw_call
from .report import say
from .server import STOP_GRACE_S, cpu_seconds, mqtt_device, open_server, rss_and_peak, server_for
from .timing import Latency, time_calls, time_concurrent, time_http, time_paced

if TYPE_CHECKING:
    import numpy as np

    from ..config import Config
    from ..device import Placement
    from .options import BenchOptions

    Array = np.ndarray[Any, Any]

#: Idle time before each paced raw call: about one HTTP round trip on a small CPU.
PACED_GAP_S = 0.0003


@dataclass
class RawRun:
    """The raw runtime's figures, and the input and outputs the server must reproduce."""

    inputs: dict[str, Array]
    datatypes: dict[str, str]
    expected: dict[str, Array]
    latency: Latency
    paced: Latency
    placement: Placement


def measure_raw(
    target: Target, config: Config, batch: int, warmup: int, requests: int, quiet: bool = True
) -> RawRun:
    """Time the bare runtime call; the model is unloaded on return, so the bench process holds
    no runtime threads or memory while the server is measured."""
    import numpy as np

    backend = load_backend(target, config)
    try:
        specs = backend.signature.inputs
        inputs = make_inputs(specs, batch)
        call, out_names = raw_call(backend, inputs)
        expected = {
            n: (a if isinstance(a, np.ndarray) else np.asarray(a))
            for n, a in zip(out_names, call(), strict=True)
        }
        say(quiet, f"timing the raw runtime call ({warmup} + {requests}) ...")
        latency = Latency.of(time_calls(call, warmup, requests))
        say(quiet, f"timing it again with a {PACED_GAP_S * 1e6:.0f} µs idle gap before each call")
        paced = Latency.of(time_paced(call, PACED_GAP_S, requests))
        datatypes = {s.name: s.datatype for s in specs}
        return RawRun(inputs, datatypes, expected, latency, paced, backend.placement)
    finally:
        backend.unload()


def run_latency(options: BenchOptions, config: Config, target: Target) -> dict[str, Any]:
    """Raw runtime vs HTTP round trip, throughput and server memory for one model."""
    from ..tensors import datatype_of

    quiet = options.quiet
    model_cfg = config.model_config(target.name)

    # 1. The raw runtime, in-process; released before the server starts.
    say(quiet, f"loading {target.file} in-process ...")
    raw_run = measure_raw(target, config, options.batch, options.warmup, options.requests, quiet)
    inputs, datatypes, expected = raw_run.inputs, raw_run.datatypes, raw_run.expected
    raw, paced, placement = raw_run.latency, raw_run.paced, raw_run.placement
    gc.collect()

    token = config.token()
    body, headers = infer_request(inputs, datatypes, options.binary, token)
    timeout_s = model_cfg.timeout_s + 30.0

    # 2.-4. The real server.
    server = server_for(options, config, target, token)
    conn: HttpConnection | None = None
    try:
        conn, address, idle_rss = open_server(server, target.name, timeout_s, quiet)

        request = build_request("POST", f"/v2/models/{target.name}/infer", *address, body, headers)
        status, head, reply = conn.exchange(request)
        if status != 200:
            raise BenchError(f"the server answered {status}: {error_text(reply)}")
        raw_length = header(head, b"Inference-Header-Content-Length")
        check_outputs(expected, read_outputs(reply, int(raw_length) if raw_length else None))
        if options.binary and raw_length is None:
            raise BenchError("the server did not answer in binary although asked to")

        say(quiet, f"timing HTTP round trips ({options.warmup} + {options.requests}) ...")
        time_http(conn, request, options.warmup, 0)
        cpu_before = cpu_seconds(server.pid)
        http = Latency.of(time_http(conn, request, 0, options.requests))
        cpu_after = cpu_seconds(server.pid)
        cpu_us = None
        if cpu_before is not None and cpu_after is not None:
            cpu_us = (cpu_after - cpu_before) * 1e6 / options.requests
        # The same server and connection without a model: HTTP and the middleware alone.
        live = build_request("GET", "/v2/health/live", *address, b"", {})
        floor = Latency.of(time_http(conn, live, options.warmup, options.requests))
        conn.close()
        conn = None
        mqtt: Latency | None = None
        if options.mqtt:
            from .mqtt import time_mqtt

            say(quiet, f"timing MQTT round trips through {options.mqtt} ...")
            json_body, _ = infer_body(inputs, datatypes, False)
            mqtt = Latency.of(
                time_mqtt(
                    options.mqtt,
                    mqtt_device(),
                    target.name,
                    json_body,
                    options.warmup,
                    options.requests,
                    timeout_s,
                )
            )

        concurrency = min(options.concurrency, options.requests)
        say(quiet, f"timing throughput at concurrency {concurrency} ...")
        samples, wall_s = time_concurrent(
            address,
            request,
            concurrency,
            math.ceil(options.warmup / concurrency),
            options.requests,
            timeout_s,
        )
        loaded = Latency.of(samples)
        server.alive_or_raise()
        after_rss, peak_rss = rss_and_peak(server.pid)
    finally:
        if conn is not None:
            conn.close()
        server.stop(config.server.shutdown_timeout_s + STOP_GRACE_S)

    def r(x: float | None, digits: int = 2) -> float | None:
        return None if x is None else round(x, digits)

    figures: dict[str, Any] = {
        "model": target.name,
        "model_file": str(target.file),
        "backend": target.source.manifest.backend,
        "device": placement.device,
        "runtime_detail": placement.detail,
        "inputs": [
            {"name": n, "datatype": datatype_of(a), "shape": list(a.shape)}
            for n, a in inputs.items()
        ],
        "encoding": "binary" if options.binary else "json",
        "request_bytes": len(body),
        "response_bytes": len(reply),
        "cpu_count": os.cpu_count(),
        "requests": options.requests,
        "warmup": options.warmup,
        "raw_p50_us": r(raw.p50_us),
        "raw_p99_us": r(raw.p99_us),
        "raw_mean_us": r(raw.mean_us),
        "raw_paced_p50_us": r(paced.p50_us),
        "raw_paced_p99_us": r(paced.p99_us),
        "raw_paced_mean_us": r(paced.mean_us),
        "http_floor_p50_us": r(floor.p50_us),
        "http_floor_p99_us": r(floor.p99_us),
        "http_floor_mean_us": r(floor.mean_us),
        "mqtt_p50_us": r(mqtt.p50_us) if mqtt else None,
        "mqtt_p99_us": r(mqtt.p99_us) if mqtt else None,
        "mqtt_mean_us": r(mqtt.mean_us) if mqtt else None,
        "http_p50_us": r(http.p50_us),
        "http_p99_us": r(http.p99_us),
        "http_mean_us": r(http.mean_us),
        "overhead_p50_us": r(http.p50_us - raw.p50_us),
        "overhead_p99_us": r(http.p99_us - raw.p99_us),
        "overhead_mean_us": r(http.mean_us - raw.mean_us),
        "overhead_vs_paced_p50_us": r(http.p50_us - paced.p50_us),
        "overhead_vs_paced_p99_us": r(http.p99_us - paced.p99_us),
        "overhead_vs_paced_mean_us": r(http.mean_us - paced.mean_us),
        "server_cpu_us_per_request": r(cpu_us, 1),
        "concurrency": concurrency,
        "throughput_rps": r(len(samples) / wall_s, 1),
        "throughput_p50_us": r(loaded.p50_us),
        "throughput_p99_us": r(loaded.p99_us),
        "throughput_mean_us": r(loaded.mean_us),
        "server_idle_rss_mib": r(idle_rss, 1),
        "server_after_rss_mib": r(after_rss, 1),
        "server_peak_rss_mib": r(peak_rss, 1),
    }
    return figures
