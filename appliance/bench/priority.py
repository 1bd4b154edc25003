"""`appliance bench MODEL --priority`: urgent requests through a flood of background ones.

One `appliance serve` gives the model two priority levels (engine/priority.py); level 2, the
flood's, is the default one. Every request names its level, in the `X-Request-Priority` header
(`--priority-by header`, the default: the server picks the level before it reads the body, so a
refused request's body is never read or decoded) or in the body's `parameters.priority`
(`--priority-by body`: the whole body is read and decoded first). The model's capacity is
measured first: a closed loop of level-2 requests over `--concurrency` connections. Then, one
after the other on the same server, for `--priority-seconds` each:

1. alone: level-1 requests at a steady `--high-share` (5 %) of that capacity, open loop (each
   of a few connections sends on its own schedule);
2. flood: the same level-1 stream, plus level-2 requests at `--flood-factor` (10x) the
   capacity (or at a fixed `--flood-rps`, so that runs compare alike: the level-1 rate is then
   `--high-share` of that rate / `--flood-factor`), open loop over up to `--flood-connections`
   connections at once, from a lean asyncio client (bench/flood.py) in a process of its own
   (`--flood-nice` lowers its CPU priority: on a small machine the flood's client competes for
   the CPU with the server it floods, which a flood from the network does not). Requests that
   find every connection busy wait in the client and are timed from when they were due; the
   figures count them.

The figures are the level-1 stream's latency in both phases and their ratio (the goal: p99
under the flood within 2x of its p99 alone), its refusals (the goal: none), and what the flood
got: answers by status, and how fast its 503s came back. Both phases run in one invocation on
one server, so the ratio compares like with like; the absolute figures are this machine's.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import re
import time
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from .client import build_request, error_text, free_port, metrics_text
from .errors import BenchError
from .flood import flood
from .inputs import infer_request, make_inputs
from .model import Target, load_backend
from .options import parse_cpus
from .report import say
from .server import STOP_GRACE_S, ServerProcess, cpu_seconds, open_server, serve_command
from .timing import Answer, Latency, open_loop, time_concurrent

if TYPE_CHECKING:
    from ..config import Config
    from .options import BenchOptions, PriorityBy, PriorityOptions

#: The levels the server is given: 1 for the urgent stream, 2 (the default) for the flood.
HIGH, LOW = 1, 2
#: Connections carrying the level-1 stream (it is sparse: a few cover its rate).
HIGH_CONNECTIONS = 4
#: The HTTP header that carries a request's level (api/http.py's PRIORITY_HEADER; not imported
#: from there, which would load the server's web framework into the load generator).
PRIORITY_HEADER = "X-Request-Priority"


def server_env(name: str, flood_batch: int) -> dict[str, str]:
    """Two priority levels for the model, level 2 the default (its batches at most
    `flood_batch` rows, 0: the model's limit), as APPLIANCE_* variables: the model's own table
    when its name allows, else [model_defaults]."""
    if re.fullmatch(r"[a-z0-9_]+", name):
        prefix = f"APPLIANCE_MODELS__{name.upper()}__PRIORITY__"
    else:
        prefix = "APPLIANCE_MODEL_DEFAULTS__PRIORITY__"
    return {
        f"{prefix}LEVELS": "2",
        f"{prefix}DEFAULT_LEVEL": str(LOW),
        f"{prefix}QUEUES": f"[{{level = {LOW}, max_batch_size = {flood_batch}}}]",
    }


def level_request(
    address: tuple[str, int],
    model: str,
    inputs: dict[str, Any],
    datatypes: dict[str, str],
    binary: bool,
    token: str,
    level: int,
    by: PriorityBy,
) -> bytes:
    """The full infer request for one level, the level in the header or in the body."""
    parameters = {"priority": level} if by == "body" else None
    body, headers = infer_request(inputs, datatypes, binary, token, parameters)
    if by == "header":
        headers[PRIORITY_HEADER] = str(level)
    return build_request("POST", f"/v2/models/{model}/infer", *address, body, headers)


def _flood_main(
    conn: Connection,
    address: tuple[str, int],
    request: bytes,
    rate: float,
    start: float,
    stop_at: float,
    connections: int,
    timeout_s: float,
    nice: int,
) -> None:
    """The flood's own process (spawned), `nice` steps below the bench's CPU priority: its
    answers go back through `conn`. On uvloop where installed (a runtime dependency off
    Windows): its sends and reads cost the machine the server shares about a quarter less."""
    os.nice(nice)
    run = flood(address, request, rate, start, stop_at, connections, timeout_s)
    try:
        import uvloop
    except ImportError:
        conn.send(asyncio.run(run))
    else:
        conn.send(uvloop.run(run))
    conn.close()


def _lat(samples: list[int]) -> dict[str, float] | None:
    if not samples:
        return None
    x = Latency.of(samples)
    return {"p50_us": round(x.p50_us, 1), "p99_us": round(x.p99_us, 1), "count": x.count}


def _summary(answers: list[Answer], seconds: float) -> dict[str, Any]:
    by_status: dict[str, int] = {}
    for status, _, _ in answers:
        by_status[str(status)] = by_status.get(str(status), 0) + 1
    return {
        "sent": len(answers),
        "offered_rps": round(len(answers) / seconds, 1),
        "statuses": by_status,
        "latency_200": _lat([ns for status, ns, _ in answers if status == 200]),
        "latency_503": _lat([ns for status, ns, _ in answers if status == 503]),
        "all_503_have_retry_after": all(ra for status, _, ra in answers if status == 503),
    }


def phase(
    address: tuple[str, int],
    high: bytes,
    high_rps: float,
    low: bytes | None,
    low_rps: float,
    seconds: float,
    flood_connections: int,
    timeout_s: float,
    flood_nice: int = 0,
) -> dict[str, Any]:
    """The level-1 stream, alone or (with `low`) beside the level-2 flood."""
    errors: list[str] = []
    # time for the flood's process to start; the flood begins first, so the queue is full
    # when the first level-1 request comes
    start = time.monotonic() + (2.0 if low is not None else 0.2)
    stop_at = start + seconds
    process, pipe = None, None
    if low is not None:
        ctx = multiprocessing.get_context("spawn")
        pipe, child = ctx.Pipe(duplex=False)
        process = ctx.Process(
            target=_flood_main,
            args=(
                child,
                address,
                low,
                low_rps,
                start - 0.2,
                stop_at,
                flood_connections,
                timeout_s,
                flood_nice,
            ),
            name="bench-flood",
            daemon=True,
        )
        process.start()
        child.close()
    threads, urgent = open_loop(
        address, high, high_rps, start, stop_at, HIGH_CONNECTIONS, timeout_s, errors
    )
    for t in threads:
        t.join()
    out: dict[str, Any] = {
        "seconds": seconds,
        "high": _summary([a for r in urgent for a in r], seconds),
        "client_errors": errors,
    }
    if process is not None and pipe is not None:
        if not pipe.poll(timeout_s + 30.0):
            process.kill()
            raise BenchError("the flood's process never reported")
        flood, flood_errors, flood_stats = pipe.recv()
        process.join()
        out["low"] = _summary(flood, seconds + 0.2)
        out["low"]["connections"] = flood_connections
        out["low"]["client"] = flood_stats
        errors += flood_errors
    out["client_errors"] = errors[:3]
    return out


def server_cpu(pid: int) -> tuple[float, float]:
    """(the whole server's CPU seconds, its event loop's): the loop is the main thread."""
    return cpu_seconds(pid) or 0.0, cpu_seconds(pid, pid) or 0.0


def cpu_per_request(
    before: tuple[float, float], after: tuple[float, float], run: dict[str, Any]
) -> dict[str, float]:
    """The server's CPU time over a phase, per request it answered (both levels): a figure
    that other load on the machine moves far less than latency (10 ms ticks, so a phase of
    a few seconds gives it to a few per cent)."""
    n = max(1, run["high"]["sent"] + run.get("low", {}).get("sent", 0))
    total, loop = (a - b for a, b in zip(after, before, strict=True))
    return {
        "total_s": round(total, 2),
        "loop_s": round(loop, 2),
        "total_us_per_request": round(1e6 * total / n, 1),
        "loop_us_per_request": round(1e6 * loop / n, 1),
    }


def priority_counters(text: str, model: str) -> dict[str, float]:
    """The server's per-level counters (appliance_priority_*_total) for the model."""
    out: dict[str, float] = {}
    pattern = (
        rf"appliance_priority_(evicted|refused|queue_timeouts)_total"
        rf'\{{(?:action="(\w+)",)?level="(\d+)",model="{re.escape(model)}",[^}}]*\}} (\S+)'
    )
    for kind, action, level, value in re.findall(pattern, text):
        key = f"{kind}_level{level}" + (f"_{action}" if action else "")
        out[key] = float(value)
    return out


def level_buckets(text: str, model: str, level: int) -> list[tuple[float, float]]:
    """(upper bound in seconds, cumulative count) of the level's appliance_priority_request_
    seconds: the server's own view, from entering the model's queue to the answer."""
    pattern = (
        rf'appliance_priority_request_seconds_bucket\{{le="([^"]+)",level="{level}",'
        rf'model="{re.escape(model)}",[^}}]*\}} (\S+)'
    )
    return [(float(le), float(n)) for le, n in re.findall(pattern, text)]


def bucket_quantile(
    before: list[tuple[float, float]], after: list[tuple[float, float]], q: float
) -> float | None:
    """The bucket bound under which a fraction `q` of the requests between two scrapes fell."""
    counts = [(le, n - b) for (le, n), (_, b) in zip(after, before, strict=True)]
    if not counts or counts[-1][1] <= 0:
        return None
    want = q * counts[-1][1]
    return next(le for le, n in counts if n >= want)


def run_priority(
    options: BenchOptions, prio: PriorityOptions, config: Config, target: Target
) -> dict[str, Any]:
    """Capacity, then level 1 alone, then level 1 beside the level-2 flood, on one server
    (`prio`, the part of `options` that only this mode reads); the figures as a JSON document."""
    quiet = options.quiet
    model_cfg = config.model_config(target.name)
    backend = load_backend(target, config)
    try:
        specs = backend.signature.inputs
        inputs = make_inputs(specs, options.batch)
        datatypes = {s.name: s.datatype for s in specs}
    finally:
        backend.unload()
    token = config.token()
    timeout_s = model_cfg.timeout_s + 30.0
    pin = ["taskset", "-c", prio.server_cpus] if prio.server_cpus else []
    port = free_port()
    server = ServerProcess(
        pin + serve_command(options, target, port),
        token,
        port,
        server_env(target.name, prio.flood_batch),
    )
    load_before = [round(x, 2) for x in os.getloadavg()]
    affinity = os.sched_getaffinity(0)
    if prio.server_cpus:
        # the clients (threads and the flood's process started from here inherit it) keep
        # off the server's CPUs
        others = affinity - parse_cpus(prio.server_cpus)
        if others:
            os.sched_setaffinity(0, others)
    try:
        conn, address, _ = open_server(server, target.name, timeout_s, quiet)
        high, low = (
            level_request(
                address, target.name, inputs, datatypes, options.binary, token, level, prio.by
            )
            for level in (HIGH, LOW)
        )
        for request in (high, low):
            status, _, reply = conn.exchange(request)
            if status != 200:
                raise BenchError(f"the server answered {status}: {error_text(reply)}")
        conn.close()
        c = options.concurrency
        say(quiet, f"capacity: {options.requests} level-{LOW} requests over {c} connections ...")
        samples, wall_s = time_concurrent(
            address, low, c, max(2, options.warmup // c), options.requests, timeout_s
        )
        capacity = len(samples) / wall_s
        nominal = prio.flood_rps / prio.flood_factor if prio.flood_rps else capacity
        high_rps = prio.high_share * nominal
        low_rps = prio.flood_factor * nominal
        seconds = prio.seconds
        say(quiet, f"alone: level {HIGH} at {high_rps:,.1f} req/s for {seconds:g} s ...")
        scrapes = [metrics_text(address, token)]
        cpu = [server_cpu(server.pid)]
        alone = phase(address, high, high_rps, None, 0.0, seconds, 1, timeout_s)
        cpu.append(server_cpu(server.pid))
        scrapes.append(metrics_text(address, token))
        say(
            quiet,
            f"flood: level {HIGH} at {high_rps:,.1f} req/s beside level {LOW} at "
            f"{low_rps:,.0f} req/s for {seconds:g} s (level in the {prio.by}) ...",
        )
        flood = phase(
            address, high, high_rps, low, low_rps, seconds, prio.flood_connections, timeout_s,
            prio.flood_nice,
        )  # fmt: skip
        cpu.append(server_cpu(server.pid))
        server.alive_or_raise()
        scrapes.append(metrics_text(address, token))
    finally:
        server.stop(config.server.shutdown_timeout_s + STOP_GRACE_S)
        os.sched_setaffinity(0, affinity)
    load_after = [round(x, 2) for x in os.getloadavg()]

    def p99(run: dict[str, Any]) -> float | None:
        lat = run["high"]["latency_200"]
        return lat["p99_us"] if lat else None

    alone_p99, flood_p99 = p99(alone), p99(flood)
    hist = [level_buckets(text, target.name, HIGH) for text in scrapes]
    for run, (before, after) in ((alone, hist[0:2]), (flood, hist[1:3])):
        run["high"]["server_p50_under_ms"], run["high"]["server_p99_under_ms"] = (
            None if (x := bucket_quantile(before, after, q)) is None else x * 1e3
            for q in (0.5, 0.99)
        )
    for run, (cpu0, cpu1) in ((alone, cpu[0:2]), (flood, cpu[1:3])):
        run["server_cpu"] = cpu_per_request(cpu0, cpu1, run)
    if "low" in flood:
        client = flood["low"]["client"]
        client["cpu_us_per_request"] = round(1e6 * client["cpu_s"] / max(1, client["sent"]), 1)
    high_sent = flood["high"]["sent"]
    return {
        "model": target.name,
        "model_file": str(target.file),
        "encoding": "binary" if options.binary else "json",
        "priority_by": prio.by,
        "high_level": HIGH,
        "flood_level": LOW,
        "batching": model_cfg.batching.enabled,
        "max_batch_size": model_cfg.batching.max_batch_size,
        "flood_max_batch_size": prio.flood_batch or model_cfg.batching.max_batch_size,
        "max_queue": model_cfg.max_queue,
        "cpu_count": os.cpu_count(),
        "server_cpus": prio.server_cpus or "any",
        "load_average_before": load_before,
        "load_average_after": load_after,
        "capacity_rps": round(capacity, 1),
        "capacity_p50_us": round(Latency.of(samples).p50_us, 1),
        "high_target_rps": round(high_rps, 1),
        "flood_target_rps": round(low_rps, 1),
        "flood_rps_fixed": bool(prio.flood_rps),
        "flood_nice": prio.flood_nice,
        "alone": alone,
        "flood": flood,
        "high_p99_flood_vs_alone": (
            round(flood_p99 / alone_p99, 2) if alone_p99 and flood_p99 else None
        ),
        "high_not_200_under_flood": high_sent - flood["high"]["statuses"].get("200", 0),
        "server_counters": priority_counters(scrapes[-1], target.name),
    }
