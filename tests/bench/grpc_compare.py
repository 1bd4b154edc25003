"""tritonclient.grpc against tritonclient.http on the appliance, same model, same run (and
Triton's own gRPC endpoint on the same model, where a Triton venv is given).

    PYTHONPATH=. .venv/bin/python tests/bench/grpc_compare.py [--model build/samples/sample.onnx]
        [--levels 1,32] [--seconds 4] [--rounds 3] [--server-cpus 0]
        [--triton-python /work/venvs/triton/bin/python | --no-triton] [--json]

Each client is tritonclient's asyncio client (grpc.aio, aiohttp), `c` tasks in one process each
sending the next request as soon as its answer is in, one [1, 4] FP32 input as tritonclient
sends it by default (gRPC: raw_input_contents; HTTP: binary tensor data). The servers are pinned
to the same CPUs (taskset) and the client to the others; targets alternate round by round and
the median round is reported. Triton 2.51 comes from PyTriton (tests/bench/triton_compare.py
starts it: Python backend calling onnxruntime, dynamic batching).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.bench.triton_compare import _stop, _wait_ready  # noqa: E402


async def _load(kind: str, url: str, concurrency: int, seconds: float) -> dict[str, float]:
    """Requests per second and p50/p99 (µs) of `concurrency` closed-loop tasks."""
    if kind == "grpc":
        import tritonclient.grpc.aio as client_module
    else:
        import tritonclient.http.aio as client_module
    x = np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32)
    inp = client_module.InferInput("input", [1, 4], "FP32")
    inp.set_data_from_numpy(x)
    client = client_module.InferenceServerClient(url)
    latencies: list[int] = []
    try:
        for _ in range(50):  # warm up connections and the model
            await client.infer("sample", [inp])
        stop = time.perf_counter() + seconds

        async def worker() -> None:
            while time.perf_counter() < stop:
                t0 = time.perf_counter_ns()
                await client.infer("sample", [inp])
                latencies.append(time.perf_counter_ns() - t0)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    finally:
        await client.close()
    ns = np.array(latencies)
    return {
        "rps": len(ns) / wall,
        "p50_us": float(np.percentile(ns, 50)) / 1e3,
        "p99_us": float(np.percentile(ns, 99)) / 1e3,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "build" / "samples" / "sample.onnx"))
    ap.add_argument("--triton-python", default="/work/venvs/triton/bin/python")
    ap.add_argument("--no-triton", action="store_true")
    ap.add_argument("--server-cpus", default="0", help="taskset CPU list for the servers")
    ap.add_argument("--levels", default="1,32")
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    import orjson

    from appliance.bench.client import free_port

    triton = not args.no_triton and Path(args.triton_python).exists()
    pin = ["taskset", "-c", args.server_cpus] if args.server_cpus else []
    if args.server_cpus:
        others = os.sched_getaffinity(0) - {int(x) for x in args.server_cpus.split(",")}
        if others:
            os.sched_setaffinity(0, others)
    ports = {name: free_port() for name in ("http", "grpc", "t_http", "t_grpc", "t_metrics")}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    log = open(os.devnull, "wb")  # noqa: SIM115 - closed below
    targets = {
        "appliance grpc": ("grpc", f"127.0.0.1:{ports['grpc']}"),
        "appliance http": ("http", f"127.0.0.1:{ports['http']}"),
    }
    if triton:
        targets["triton grpc"] = ("grpc", f"127.0.0.1:{ports['t_grpc']}")
        targets["triton http"] = ("http", f"127.0.0.1:{ports['t_http']}")
    levels = sorted({int(x) for x in args.levels.split(",")})
    results: dict[str, dict[int, dict[str, float]]] = {t: {} for t in targets}
    try:
        procs["appliance"] = subprocess.Popen(
            [*pin, sys.executable, "-m", "appliance", "serve", "--model", args.model,
             "--name", "sample", "--port", str(ports["http"]), "--grpc-port", str(ports["grpc"])],
            stdout=log, stderr=log, cwd=ROOT,
        )  # fmt: skip
        _wait_ready(ports["http"], "sample", procs["appliance"], 120.0)
        if triton:
            extra = f"{ports['t_http']},{ports['t_grpc']},{ports['t_metrics']}"
            procs["triton"] = subprocess.Popen(
                [*pin, args.triton_python, str(ROOT / "tests" / "bench" / "triton_compare.py"),
                 "--serve-triton", "--model", args.model, "--ports", extra],
                stdout=log, stderr=log, cwd=ROOT,
            )  # fmt: skip
            _wait_ready(ports["t_http"], "sample", procs["triton"], 180.0)
        for c in levels:
            runs: dict[str, list[dict[str, float]]] = {t: [] for t in targets}
            names = list(targets)
            for i in range(args.rounds):
                for name in names if i % 2 == 0 else names[::-1]:
                    kind, url = targets[name]
                    got = asyncio.run(_load(kind, url, c, args.seconds))
                    runs[name].append(got)
                    print(f"c={c} {name} round {i + 1}: {got['rps']:,.0f} req/s",
                          file=sys.stderr, flush=True)  # fmt: skip
            for name, rounds in runs.items():
                mid = sorted(rounds, key=lambda r: r["rps"])[len(rounds) // 2]
                results[name][c] = {k: round(v, 1) for k, v in mid.items()}
    finally:
        for proc in procs.values():
            _stop(proc)
        log.close()
    figures: dict[str, Any] = {
        "model": args.model,
        "server_cpus": args.server_cpus,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "results": results,
        "grpc_over_http": {
            c: round(results["appliance grpc"][c]["rps"] / results["appliance http"][c]["rps"], 2)
            for c in levels
        },
    }
    if triton:
        figures["appliance_grpc_over_triton_grpc"] = {
            c: round(results["appliance grpc"][c]["rps"] / results["triton grpc"][c]["rps"], 2)
            for c in levels
        }
    if args.json:
        print(orjson.dumps(figures, option=orjson.OPT_NON_STR_KEYS).decode())
        return 0
    print(f"servers on CPUs {args.server_cpus}; load average {figures['load_average']}")
    print(f"{'c':>3} {'target':>15} {'req/s':>9} {'p50 µs':>9} {'p99 µs':>9}")
    for c in levels:
        for name in targets:
            r = results[name][c]
            print(f"{c:>3} {name:>15} {r['rps']:>9,.0f} {r['p50_us']:>9,.1f} {r['p99_us']:>9,.1f}")
        print(f"{'':>3} {'grpc/http':>15} {figures['grpc_over_http'][c]:>9}x")
        if triton:
            ratio = figures["appliance_grpc_over_triton_grpc"][c]
            print(f"{'':>3} {'vs triton grpc':>15} {ratio:>9}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
