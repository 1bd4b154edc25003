"""`appliance bench MODEL --sweep 1,8,32`: dynamic batching on and off, side by side, in one run.

Two `appliance serve` processes serve the same model, one with batching on (the model's own
settings) and one with it off (`batching.enabled = false` for that model), optionally pinned to
the same CPUs (`--server-cpus`). Each concurrency level is measured on both servers back to
back, so machine load drifts alike for both; the ratios are the result, not the absolute
figures. The raw runtime, in-process, gives the ceiling: a batch-1 call and one batch as large as
the highest concurrency (the most a batching server could merge).

`--overload SECONDS` then offers the batching server ten times the request rate it sustained
at the highest concurrency, open loop from more connections than the model admits: the
answers beyond capacity must be fast 503s with Retry-After, memory must stay flat, and a client
must get full service within a second of the load stopping.
"""

from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..engine.scheduler import lower_priority
from .client import HttpConnection, build_request, free_port, metrics_text
from .inputs import check_answer, infer_request, make_inputs
from .model import Target, load_backend, raw_call
from .options import parse_cpus
from .report import say
from .server import STOP_GRACE_S, ServerProcess, open_server, rss_and_peak, serve_command
from .timing import Latency, open_loop, time_calls, time_concurrent

if TYPE_CHECKING:
    from ..config import Config
    from .options import BenchOptions, SweepOptions

MODES = ("off", "on")


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _env_key(name: str) -> str:
    """The environment variable that switches batching for this model (the model's own table
    wins over [model_defaults], so a config file's [models.NAME.batching] is overridden too)."""
    if re.fullmatch(r"[a-z0-9_]+", name):
        return f"APPLIANCE_MODELS__{name.upper()}__BATCHING__ENABLED"
    return "APPLIANCE_MODEL_DEFAULTS__BATCHING__ENABLED"


def _batch_stats(address: tuple[str, int], model: str, token: str) -> tuple[float, float]:
    """(runtime calls, requests) from the server's appliance_batch_size histogram."""
    text = metrics_text(address, token)
    out = []
    for part in ("count", "sum"):
        m = re.search(
            rf'appliance_batch_size_{part}\{{model="{re.escape(model)}",[^}}]*\}} (\S+)', text
        )
        out.append(float(m.group(1)) if m else 0.0)
    return out[0], out[1]


# -- overload ---------------------------------------------------------------------------------
def overload(
    address: tuple[str, int],
    request: bytes,
    rate: float,
    seconds: float,
    connections: int,
    pid: int,
    timeout_s: float,
) -> dict[str, Any]:
    """Offer `rate` requests/s for `seconds`, open loop over `connections` keep-alive connections
    (each sends on its own schedule, or at once when behind); then probe recovery."""
    clock = time.monotonic
    errors: list[str] = []
    rss: list[float] = []
    done = threading.Event()
    start = clock() + 0.2
    stop_at = start + seconds

    def sample_rss() -> None:
        while not done.wait(0.5):
            value, _ = rss_and_peak(pid)
            if value is not None:
                rss.append(value)

    rss_before, _ = rss_and_peak(pid)
    sampler = threading.Thread(target=sample_rss, daemon=True)
    sampler.start()
    threads, results = open_loop(
        address, request, rate, start, stop_at, connections, timeout_s, errors
    )
    for t in threads:
        t.join()
    stopped = clock()
    sent_for = stopped - start
    # Recovery: sequential requests on a fresh connection for a second and a half.
    probes: list[tuple[float, int, int]] = []
    conn = HttpConnection(*address, timeout_s)
    try:
        while clock() - stopped < 1.5:
            t0 = time.perf_counter_ns()
            status, _, _ = conn.exchange(request)
            probes.append((clock() - stopped, status, time.perf_counter_ns() - t0))
    finally:
        conn.close()
    done.set()
    sampler.join()
    rss_after, _ = rss_and_peak(pid)

    answers = [a for r in results for a in r]
    ok = [ns for status, ns, _ in answers if status == 200]
    refused = [ns for status, ns, _ in answers if status == 503]
    other = sorted({status for status, _, _ in answers if status not in (200, 503)})
    first_ok = next((at for at, status, _ in probes if status == 200), None)
    after = [
        (at, status, ns) for at, status, ns in probes if first_ok is not None and at >= first_ok
    ]
    in_second = [ns for at, status, ns in after if at < 1.0 and status == 200]

    def lat(samples: list[int]) -> dict[str, float] | None:
        if not samples:
            return None
        x = Latency.of(samples)
        return {"p50_us": round(x.p50_us, 1), "p99_us": round(x.p99_us, 1)}

    return {
        "target_rps": round(rate, 1),
        "offered_rps": round(len(answers) / sent_for, 1),
        "seconds": seconds,
        "connections": connections,
        "answered_200": len(ok),
        "answered_503": len(refused),
        "other_statuses": other,
        "client_errors": errors[:3],
        "all_503_have_retry_after": all(ra for status, _, ra in answers if status == 503),
        "latency_200": lat(ok),
        "latency_503": lat(refused),
        "rss_before_mib": rss_before,
        "rss_min_mib": min(rss) if rss else None,
        "rss_max_mib": max(rss) if rss else None,
        "rss_after_mib": rss_after,
        "first_200_after_stop_ms": None if first_ok is None else round(first_ok * 1e3, 2),
        "all_200_after_first": all(status == 200 for _, status, _ in after),
        "probe_p50_us_first_second": (
            round(Latency.of(in_second).p50_us, 1) if in_second else None
        ),
    }


# -- the sweep --------------------------------------------------------------------------------
@dataclass
class RawCeiling:
    """Raw runtime timings: batch-1 calls and calls of the largest batch."""

    batch1: Latency
    batch: Latency
    inputs: dict[str, Any]
    datatypes: dict[str, str]
    expected: dict[str, Any]


def measure_ceiling(
    options: BenchOptions,
    config: Config,
    target: Target,
    rows: int,
    batch_rows: int,
    nice: int,
) -> RawCeiling:
    """Load the model and time it in a thread of its own, on the servers' CPUs and at their
    workers' priority (the runtime's threads inherit both), so the ceiling is comparable."""
    cpus = options.sweep.server_cpus if options.sweep else None
    box: list[RawCeiling] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            if cpus:
                os.sched_setaffinity(0, parse_cpus(cpus))  # this thread only
            lower_priority(nice)
            backend = load_backend(target, config)
            try:
                specs = backend.signature.inputs
                inputs = make_inputs(specs, rows)
                call1, _ = raw_call(backend, inputs)
                n1 = max(20, options.requests // 4)
                batch1 = Latency.of(time_calls(call1, max(5, n1 // 10), n1))
                call_big, _ = raw_call(backend, make_inputs(specs, batch_rows))
                n_big = max(10, n1 // max(1, batch_rows // rows))
                big = Latency.of(time_calls(call_big, max(3, n_big // 10), n_big))
                expected = dict(backend.run(inputs, None))
                datatypes = {s.name: s.datatype for s in specs}
                box.append(RawCeiling(batch1, big, inputs, datatypes, expected))
            finally:
                backend.unload()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=work, name="bench-raw")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return box[0]


def run_sweep(
    options: BenchOptions, sweep: SweepOptions, config: Config, target: Target
) -> dict[str, Any]:
    """Batching off and on, level by level, side by side (`sweep`, the part of `options` that
    only this mode reads); then the overload, if asked."""
    levels = sweep.levels
    quiet = options.quiet
    model_cfg = config.model_config(target.name)
    rows = options.batch
    top = levels[-1]
    ceiling_rows = min(top * rows, max(model_cfg.batching.max_batch_size, rows))

    # 1. The raw runtime in-process (again after every round of the sweep, side by side).
    say(quiet, f"timing the raw runtime in-process ({target.file}) ...")
    raw_rounds: list[RawCeiling] = []
    first = measure_ceiling(options, config, target, rows, ceiling_rows, model_cfg.worker_nice)
    raw_rounds.append(first)
    inputs, datatypes, expected = first.inputs, first.datatypes, first.expected

    token = config.token()
    body, headers = infer_request(inputs, datatypes, options.binary, token)
    timeout_s = model_cfg.timeout_s + 30.0
    pin = ["taskset", "-c", sweep.server_cpus] if sweep.server_cpus else []
    servers: dict[str, ServerProcess] = {}
    conns: dict[str, HttpConnection] = {}
    requests: dict[str, bytes] = {}
    runs: list[dict[str, Any]] = []
    over: dict[str, Any] | None = None
    load_before = _load()
    affinity = os.sched_getaffinity(0)
    if sweep.server_cpus:
        # the clients (threads started from here inherit it) keep off the servers' CPUs
        others = affinity - parse_cpus(sweep.server_cpus)
        if others:
            os.sched_setaffinity(0, others)
    try:
        for mode in MODES:
            env = {_env_key(target.name): "true" if mode == "on" else "false"}
            if mode == "on" and model_cfg.batching.enabled is False:
                env[_env_key(target.name)] = "true"
            port = free_port()
            cmd = pin + serve_command(options, target, port)
            servers[mode] = ServerProcess(cmd, token, port, env)
            say(quiet, f"starting the server with batching {mode} ...")
            conn, address, _ = open_server(servers[mode], target.name, timeout_s, True)
            conns[mode] = conn
            req = build_request("POST", f"/v2/models/{target.name}/infer", *address, body, headers)
            check_answer(conn, req, expected)
            requests[mode] = req
        for c in levels:
            n = max(options.requests, 20 * c)
            rounds: dict[str, list[tuple[float, Latency]]] = {m: [] for m in MODES}
            for i in range(sweep.rounds):
                for mode in MODES if i % 2 == 0 else MODES[::-1]:
                    say(quiet, f"concurrency {c}, batching {mode}, round {i + 1}: {n} requests")
                    samples, wall_s = time_concurrent(
                        conns[mode].address, requests[mode], c, max(2, options.warmup // c), n,
                        timeout_s,
                    )  # fmt: skip
                    rounds[mode].append((len(samples) / wall_s, Latency.of(samples)))
                if c == top:
                    raw_rounds.append(
                        measure_ceiling(options, config, target, rows, ceiling_rows,
                                        model_cfg.worker_nice)
                    )  # fmt: skip
            for mode in MODES:
                # the round with the median throughput stands for the level
                rps, lat = sorted(rounds[mode], key=lambda r: r[0])[len(rounds[mode]) // 2]
                runs.append({
                    "batching": mode, "concurrency": c, "requests": n, "rounds": sweep.rounds,
                    "rps": round(rps, 1), "p50_us": round(lat.p50_us, 1),
                    "p99_us": round(lat.p99_us, 1),
                })  # fmt: skip
        calls, merged = _batch_stats(conns["on"].address, target.name, token)
        load_after = _load()
        if sweep.overload > 0:
            best = max(r["rps"] for r in runs if r["batching"] == "on")
            say(quiet, f"overload: {10 * best:,.0f} req/s offered for {sweep.overload:g} s ...")
            over = overload(
                conns["on"].address,
                requests["on"],
                10 * best,
                sweep.overload,
                sweep.overload_connections,
                servers["on"].pid,
                timeout_s,
            )
            servers["on"].alive_or_raise()
    finally:
        for conn in conns.values():
            conn.close()
        for server in servers.values():
            server.stop(config.server.shutdown_timeout_s + STOP_GRACE_S)
        os.sched_setaffinity(0, affinity)

    def find(mode: str, c: int) -> dict[str, Any]:
        return next(r for r in runs if r["batching"] == mode and r["concurrency"] == c)

    raw1 = sorted((r.batch1 for r in raw_rounds), key=lambda x: x.mean_us)[len(raw_rounds) // 2]
    raw_big = sorted((r.batch for r in raw_rounds), key=lambda x: x.mean_us)[len(raw_rounds) // 2]
    raw_ceiling = ceiling_rows / rows * 1e6 / raw_big.mean_us
    figures: dict[str, Any] = {
        "model": target.name,
        "model_file": str(target.file),
        "rows_per_request": rows,
        "encoding": "binary" if options.binary else "json",
        "server_cpus": sweep.server_cpus or "any",
        "cpu_count": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": load_after,
        "raw_batch1_p50_us": round(raw1.p50_us, 1),
        "raw_batch1_rps": round(1e6 / raw1.mean_us, 1),
        "raw_ceiling_rows": ceiling_rows,
        "raw_ceiling_call_p50_us": round(raw_big.p50_us, 1),
        "raw_ceiling_rps": round(raw_ceiling, 1),
        "raw_ceiling_rounds_rps": [
            round(ceiling_rows / rows * 1e6 / r.batch.mean_us, 1) for r in raw_rounds
        ],
        "runs": runs,
        "batching_on_mean_batch": round(merged / calls, 2) if calls else None,
        "throughput_on_vs_off_at_top": round(find("on", top)["rps"] / find("off", top)["rps"], 2),
        "throughput_on_vs_raw_ceiling_at_top": round(find("on", top)["rps"] / raw_ceiling, 3),
        "p50_on_vs_off_at_lowest": round(
            find("on", levels[0])["p50_us"] / find("off", levels[0])["p50_us"], 3
        ),
        "overload": over,
    }
    return figures
