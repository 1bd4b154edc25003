"""`appliance bench MODEL --isolation 1,32`: the model in-process and in a worker process
(`isolation = "process"`), side by side, in one run.

Two `appliance serve` processes serve the same model, identical but for its isolation setting.
At each concurrency level both are measured back to back, in alternating order over several
rounds, so machine load drifts alike for both; the round with the median throughput stands for
the level. The figures that matter are the differences: microseconds added per request at
concurrency 1 and the throughput ratio at the highest level.

For scale, the bare round trip between two Python processes over the same kind of socket pair
(no shared memory, no model) is timed in the bench process, back to back and with the sender
busy for `BUSY_GAP_S` before each (as a server is, parsing the next request, while its worker
waits): no worker call can be cheaper than it on the machine at hand. On a small VM the second
is much the slower: waking a process whose CPU went idle costs an interrupt to another vCPU.

Start-up is timed too: the in-process server's first start on a fresh cache includes the
first-load probe (the file loaded once in a child process); its second start finds the probe
remembered; the isolated server loads the model in its worker. Memory: the server's RSS, and
its worker's.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .client import HttpConnection, build_request, free_port
from .inputs import check_answer, infer_request, make_inputs
from .model import Target, load_backend, raw_call
from .report import say
from .server import STOP_GRACE_S, ServerProcess, open_server, rss_and_peak, serve_command
from .timing import Latency, time_concurrent

if TYPE_CHECKING:
    from ..config import Config
    from .options import BenchOptions, IsolationOptions

MODES = ("in-process", "isolated")


def _env_key(name: str) -> str:
    """The environment variable that sets this model's isolation (the model's own table wins
    over [model_defaults], so a config file's [models.NAME] setting is overridden too)."""
    if re.fullmatch(r"[a-z0-9_]+", name):
        return f"APPLIANCE_MODELS__{name.upper()}__ISOLATION"
    return "APPLIANCE_MODEL_DEFAULTS__ISOLATION"


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def _rss(pid: int) -> float | None:
    rss, _ = rss_and_peak(pid)
    return None if rss is None else round(rss, 1)


#: The echo a bare round trip talks to: what the worker's loop does, without the protocol.
_ECHO = """
import socket, sys
s = socket.socket(fileno=int(sys.argv[1]))
while (m := s.recv(4096)):
    s.send(m)
"""


#: How long the sender keeps its CPU busy before each paced round trip: about what the server
#: spends on an HTTP request around the model call.
BUSY_GAP_S = 0.00025


def process_round_trip(requests: int, busy_gap_s: float = 0.0) -> Latency:
    """A 32-byte packet to another Python process and back, over an AF_UNIX SOCK_SEQPACKET
    pair: the floor of a call to a worker process on this machine. With `busy_gap_s`, the
    sender spins that long before each round trip (its peer waits idle meanwhile)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    proc = subprocess.Popen(
        [sys.executable, "-c", _ECHO, str(theirs.fileno())], pass_fds=(theirs.fileno(),)
    )
    theirs.close()
    try:
        packet = b"x" * 32
        clock = time.perf_counter_ns
        samples = []
        gap_ns = int(busy_gap_s * 1e9)
        for i in range(requests + requests // 10):
            if gap_ns:
                until = clock() + gap_ns
                while clock() < until:
                    pass
            t0 = clock()
            ours.send(packet)
            ours.recv(64)
            if i >= requests // 10:  # the first tenth warms up
                samples.append(clock() - t0)
        return Latency.of(samples)
    finally:
        ours.close()
        proc.wait(10)


def run_isolation(
    options: BenchOptions, isolation: IsolationOptions, config: Config, target: Target
) -> dict[str, Any]:
    """Both servers, level by level, side by side; the figures."""
    import numpy as np

    quiet = options.quiet
    levels = isolation.levels
    model_cfg = config.model_config(target.name)
    token = config.token()
    timeout_s = model_cfg.timeout_s + 30.0

    floor = process_round_trip(options.requests)
    floor_busy = process_round_trip(options.requests, BUSY_GAP_S)
    say(quiet, f"loading {target.file} in-process for its inputs and expected outputs ...")
    backend = load_backend(target, config)
    try:
        specs = backend.signature.inputs
        inputs = make_inputs(specs, options.batch)
        call, names = raw_call(backend, inputs)
        expected = {n: np.asarray(a) for n, a in zip(names, call(), strict=True)}
    finally:
        backend.unload()
    body, headers = infer_request(
        inputs, {s.name: s.datatype for s in specs}, options.binary, token
    )

    scratch = tempfile.TemporaryDirectory(prefix="appliance-bench-")
    # A fresh store directory: its cache starts empty, so the first start pays the probe.
    served = dataclasses.replace(options, models=scratch.name)
    servers: dict[str, ServerProcess] = {}
    conns: dict[str, HttpConnection] = {}
    requests: dict[str, bytes] = {}
    startup: dict[str, float] = {}
    load_before = [round(x, 2) for x in os.getloadavg()]
    results: dict[tuple[str, int], list[tuple[float, Latency]]] = {}

    def start(mode: str) -> ServerProcess:
        env = {_env_key(target.name): "process" if mode == "isolated" else "none"}
        port = free_port()
        server = ServerProcess(serve_command(served, target, port), token, port, env)
        t0 = time.perf_counter()
        conn, address, _ = open_server(server, target.name, timeout_s, True)
        elapsed = time.perf_counter() - t0
        conns[mode] = conn
        req = build_request("POST", f"/v2/models/{target.name}/infer", *address, body, headers)
        check_answer(conn, req, expected, f"the {mode} server")
        requests[mode] = req
        startup[mode] = elapsed
        return server

    try:
        say(quiet, "starting the in-process server on a fresh cache (the file is probed) ...")
        first = start("in-process")
        startup["in-process, first start"] = startup.pop("in-process")
        conns.pop("in-process").close()
        first.stop(config.server.shutdown_timeout_s + STOP_GRACE_S)
        for mode in MODES:
            say(quiet, f"starting the {mode} server ...")
            servers[mode] = start(mode)
        for c in levels:
            n = max(options.requests, 20 * c)
            for i in range(isolation.rounds):
                for mode in MODES if i % 2 == 0 else MODES[::-1]:
                    say(quiet, f"concurrency {c}, {mode}, round {i + 1}: {n} requests")
                    samples, wall_s = time_concurrent(
                        conns[mode].address, requests[mode], c, max(2, options.warmup // c), n,
                        timeout_s,
                    )  # fmt: skip
                    results.setdefault((mode, c), []).append(
                        (len(samples) / wall_s, Latency.of(samples))
                    )
        memory = {
            mode: {
                "server_rss_mib": _rss(server.pid),
                "worker_rss_mib": [_rss(child) for child in _children(server.pid)],
            }
            for mode, server in servers.items()
        }
        for server in servers.values():
            server.alive_or_raise()
    finally:
        for conn in conns.values():
            conn.close()
        for server in servers.values():
            server.stop(config.server.shutdown_timeout_s + STOP_GRACE_S)
        scratch.cleanup()

    runs = []
    for (mode, c), rounds in results.items():
        rps, lat = sorted(rounds, key=lambda r: r[0])[len(rounds) // 2]
        runs.append({
            "mode": mode, "concurrency": c, "requests": lat.count, "rounds": len(rounds),
            "rps": round(rps, 1), "p50_us": round(lat.p50_us, 1),
            "mean_us": round(lat.mean_us, 1), "p99_us": round(lat.p99_us, 1),
            "rounds_rps": [round(r[0], 1) for r in rounds],
        })  # fmt: skip

    def find(mode: str, c: int) -> dict[str, Any]:
        return next(r for r in runs if r["mode"] == mode and r["concurrency"] == c)

    low, top = levels[0], levels[-1]
    return {
        "model": target.name,
        "model_file": str(target.file),
        "rows_per_request": options.batch,
        "encoding": "binary" if options.binary else "json",
        "cpu_count": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "startup_s": {k: round(v, 3) for k, v in startup.items()},
        "probe_added_to_first_start_s": round(
            startup["in-process, first start"] - startup["in-process"], 3
        ),
        "process_round_trip_p50_us": round(floor.p50_us, 1),
        "process_round_trip_mean_us": round(floor.mean_us, 1),
        "process_round_trip_after_busy_gap_p50_us": round(floor_busy.p50_us, 1),
        "process_round_trip_after_busy_gap_mean_us": round(floor_busy.mean_us, 1),
        "runs": runs,
        "added_p50_us_at_lowest": round(
            find("isolated", low)["p50_us"] - find("in-process", low)["p50_us"], 1
        ),
        "added_mean_us_at_lowest": round(
            find("isolated", low)["mean_us"] - find("in-process", low)["mean_us"], 1
        ),
        "throughput_isolated_vs_in_process_at_top": round(
            find("isolated", top)["rps"] / find("in-process", top)["rps"], 3
        ),
        "lowest_concurrency": low,
        "highest_concurrency": top,
        "memory": memory,
    }


def format_isolation(f: dict[str, Any]) -> str:
    """The figures for a person: both modes per level, then the differences."""
    lines = [
        f"model    {f['model']} ({f['model_file']}), {f['rows_per_request']} row(s) per request,"
        f" {f['encoding']} tensors",
        f"machine  {f['cpu_count']} CPUs; load average {f['load_average_before']} before, "
        f"{f['load_average_after']} after",
        "start-up "
        + ", ".join(f"{k} {v:.3f} s" for k, v in f["startup_s"].items())
        + f" (the first-load probe added {f['probe_added_to_first_start_s']:.3f} s)",
        "",
        f"{'concurrency':>11} {'mode':>11} {'req/s':>10} {'p50 µs':>10} {'mean µs':>10}"
        f" {'p99 µs':>10}",
    ]
    for r in sorted(f["runs"], key=lambda r: (r["concurrency"], r["mode"])):
        lines.append(
            f"{r['concurrency']:>11} {r['mode']:>11} {r['rps']:>10,.0f} {r['p50_us']:>10,.1f}"
            f" {r['mean_us']:>10,.1f} {r['p99_us']:>10,.1f}"
        )
    mem = f["memory"]
    lines += [
        "",
        f"added by the worker process at concurrency {f['lowest_concurrency']}: "
        f"{f['added_p50_us_at_lowest']:,.1f} µs p50, {f['added_mean_us_at_lowest']:,.1f} µs mean"
        f"\n  (a bare round trip to another process here: {f['process_round_trip_p50_us']:,.1f} µs"
        f" p50 back to back, {f['process_round_trip_after_busy_gap_p50_us']:,.1f} µs p50 after"
        f" {BUSY_GAP_S * 1e6:.0f} µs of work)",
        f"throughput at concurrency {f['highest_concurrency']}: isolated / in-process "
        f"{f['throughput_isolated_vs_in_process_at_top']:.3f}x",
        f"memory: in-process server {mem['in-process']['server_rss_mib']} MiB; isolated server "
        f"{mem['isolated']['server_rss_mib']} MiB + worker {mem['isolated']['worker_rss_mib']} MiB",
    ]
    return "\n".join(lines) + "\n"
