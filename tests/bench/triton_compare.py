"""The appliance against NVIDIA Triton on the same tiny model, same machine, same load generator.

    PYTHONPATH=. .venv/bin/python tests/bench/triton_compare.py \\
        --triton-python /work/venvs/triton/bin/python [--model build/samples/sample.onnx] \\
        [--server-cpus 0] [--levels 1,32] [--requests 3000] [--rounds 3] [--json]
        [--client wrk|python] [--seconds 8]

Triton 2.51 comes from PyTriton (pip `nvidia-pytriton`, which bundles tritonserver), in a venv
of its own: it serves the ONNX model through its Python backend, a function that calls
onnxruntime, with dynamic batching on (max batch 32, no queue delay). The appliance serves the
same file with its defaults (dynamic batching on). Both servers are pinned to the same CPUs
(taskset) and idle while the other is measured, alternating round by round. The client is wrk
(Debian's `wrk`, C, one thread, keep-alive, KServe v2 JSON bodies; the default where it is on
PATH), or with `--client python` the `appliance bench` socket client (one thread per
connection), which tops out near 4,000 req/s on one core and so under-reports a server faster
than that. The result is the ratio of requests per second, side by side.

The same file, run by the Triton venv's Python with `--serve-triton`, is the Triton server.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


# -- the Triton side (runs in the Triton venv: pytriton, numpy, onnxruntime only) ----------------
def serve_triton(model: str, http_port: int, grpc_port: int, metrics_port: int) -> None:
    import numpy as np
    import onnxruntime as ort
    from pytriton.decorators import batch  # type: ignore[import-not-found, unused-ignore]
    from pytriton.model_config import (  # type: ignore[import-not-found, unused-ignore]
        DynamicBatcher,
        ModelConfig,
        Tensor,
    )
    from pytriton.triton import Triton, TritonConfig  # type: ignore[import-not-found, unused-ignore]

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])

    @batch  # type: ignore[untyped-decorator, unused-ignore]
    def infer(input: Any) -> dict[str, Any]:
        probabilities, label = session.run(None, {"input": input})
        return {"probabilities": probabilities, "label": label.reshape(-1, 1)}

    config = TritonConfig(
        http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port, log_verbose=0
    )
    with Triton(config=config) as triton:
        triton.bind(
            model_name="sample",
            infer_func=infer,
            inputs=[Tensor(name="input", dtype=np.float32, shape=(4,))],
            outputs=[
                Tensor(name="probabilities", dtype=np.float32, shape=(3,)),
                Tensor(name="label", dtype=np.int64, shape=(1,)),
            ],
            config=ModelConfig(
                max_batch_size=32, batcher=DynamicBatcher(max_queue_delay_microseconds=0)
            ),
            strict=False,
        )
        print("TRITON READY", flush=True)
        triton.serve()


# -- the driver (runs in the appliance venv) ------------------------------------------------------
def _wait_ready(port: int, model: str, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    from appliance.bench.client import HttpConnection, build_request
    from appliance.bench.errors import BenchError

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"the server exited with status {proc.returncode}")
        try:
            conn = HttpConnection("127.0.0.1", port, 5.0)
        except BenchError:
            time.sleep(0.2)
            continue
        try:
            req = build_request("GET", f"/v2/models/{model}/ready", "127.0.0.1", port)
            status, _, _ = conn.exchange(req)
            if status == 200:
                return
        except BenchError:
            pass
        finally:
            conn.close()
        time.sleep(0.2)
    raise BenchError(f"the server on port {port} was not ready within {timeout_s:g} s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


_WRK_LATENCY = re.compile(r"^\s*(50|99)%\s+([\d.]+)(us|ms|s)\s*$", re.M)
_WRK_UNIT = {"us": 1.0, "ms": 1e3, "s": 1e6}


def parse_wrk(output: str) -> dict[str, float]:
    """Requests per second and p50/p99 in µs from `wrk --latency` output; fails on errors."""
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.M)
    if rps is None:
        raise ValueError(f"no Requests/sec in wrk's output:\n{output}")
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if bad is not None:
        raise ValueError(f"{bad.group(1)} answers were not 200:\n{output}")
    errors = re.search(r"Socket errors: (.*)", output)
    if errors is not None and re.search(r"[1-9]", errors.group(1)):
        raise ValueError(f"socket errors: {errors.group(1)}")
    out = {"rps": float(rps.group(1))}
    for pct, value, unit in _WRK_LATENCY.findall(output):
        out[f"p{pct}_us"] = float(value) * _WRK_UNIT[unit]
    return out


def run_wrk(
    url: str, body: bytes, concurrency: int, seconds: float, cpus: set[int] | None
) -> dict[str, float]:
    """One wrk run of POSTs of `body` (KServe v2 JSON) over `concurrency` connections."""
    script = (
        'wrk.method = "POST"\n'
        f"wrk.body = {body.decode()!r}\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
    )
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as f:
        f.write(script)
        f.flush()
        pin = ["taskset", "-c", ",".join(map(str, sorted(cpus)))] if cpus else []
        cmd = [*pin, "wrk", "-t1", f"-c{concurrency}", f"-d{seconds:g}s", "--latency",
               "-s", f.name, url]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    if proc.returncode != 0:
        raise ValueError(f"wrk failed ({proc.returncode}): {proc.stderr}")
    return parse_wrk(proc.stdout)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--serve-triton", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ports", help=argparse.SUPPRESS)
    ap.add_argument("--model", default=str(ROOT / "build" / "samples" / "sample.onnx"))
    ap.add_argument("--triton-python", default="/work/venvs/triton/bin/python")
    ap.add_argument("--server-cpus", default="0", help="taskset CPU list for both servers")
    ap.add_argument("--levels", default="1,32")
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument(
        "--client", choices=["wrk", "python"], default="wrk" if shutil.which("wrk") else "python"
    )
    ap.add_argument("--seconds", type=float, default=8.0, help="length of one wrk run")
    args = ap.parse_args(argv)
    if args.serve_triton:
        http, grpc, metrics = (int(p) for p in args.ports.split(","))
        serve_triton(args.model, http, grpc, metrics)
        return 0

    import numpy as np
    import orjson

    from appliance.bench.client import build_request, free_port
    from appliance.bench.timing import Latency, time_concurrent
    from appliance.codec import InferRequest, encode_request

    levels = sorted({int(x) for x in args.levels.split(",")})
    pin = ["taskset", "-c", args.server_cpus] if args.server_cpus else []
    ports = {"appliance": free_port(), "triton": free_port()}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    log = open(os.devnull, "wb")  # noqa: SIM115 - closed below
    results: dict[str, dict[int, dict[str, float]]] = {"appliance": {}, "triton": {}}
    load_before = [round(x, 2) for x in os.getloadavg()]
    others: set[int] | None = None
    if args.server_cpus:  # the clients keep off the servers' CPUs where there are others
        servers = {int(x) for x in args.server_cpus.split(",")}
        others = os.sched_getaffinity(0) - servers or None
        if others:
            os.sched_setaffinity(0, others)
    try:
        procs["appliance"] = subprocess.Popen(
            [*pin, sys.executable, "-m", "appliance", "serve", "--model", args.model,
             "--name", "sample", "--host", "127.0.0.1", "--port", str(ports["appliance"])],
            stdout=log, stderr=log, cwd=ROOT,
        )  # fmt: skip
        extra = f"{ports['triton']},{free_port()},{free_port()}"
        procs["triton"] = subprocess.Popen(
            [*pin, args.triton_python, __file__, "--serve-triton", "--model", args.model,
             "--ports", extra],
            stdout=log, stderr=log, cwd=ROOT,
        )  # fmt: skip
        for name, proc in procs.items():
            _wait_ready(ports[name], "sample", proc, 180.0)
        x = np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32)
        body, _ = encode_request(InferRequest(inputs={"input": x}))
        headers = {"Content-Type": "application/json"}
        for c in levels:
            n = max(args.requests, 30 * c)
            samples: dict[str, list[dict[str, float]]] = {"appliance": [], "triton": []}
            for i in range(args.rounds):
                order = ["appliance", "triton"] if i % 2 == 0 else ["triton", "appliance"]
                for name in order:
                    addr = ("127.0.0.1", ports[name])
                    if args.client == "wrk":
                        url = f"http://127.0.0.1:{ports[name]}/v2/models/sample/infer"
                        got = run_wrk(url, body, c, args.seconds, others)
                    else:
                        req = build_request("POST", "/v2/models/sample/infer", *addr, body,
                                            headers)  # fmt: skip
                        ns, wall = time_concurrent(addr, req, c, max(2, args.warmup // c), n, 60.0)
                        lat = Latency.of(ns)
                        got = {"rps": len(ns) / wall, "p50_us": lat.p50_us, "p99_us": lat.p99_us}
                    samples[name].append(got)
                    print(f"c={c} {name} round {i + 1}: {got['rps']:,.0f} req/s",
                          file=sys.stderr, flush=True)  # fmt: skip
            for name, runs in samples.items():
                mid = sorted(runs, key=lambda r: r["rps"])[len(runs) // 2]
                results[name][c] = {k: round(v, 1) for k, v in mid.items()}
    finally:
        for proc in procs.values():
            _stop(proc)
        log.close()
    figures = {
        "model": args.model,
        "server_cpus": args.server_cpus,
        "client": args.client,
        "load_average_before": load_before,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "results": results,
        "ratio_rps": {
            c: round(results["appliance"][c]["rps"] / results["triton"][c]["rps"], 2)
            for c in levels
        },
    }
    if args.json:
        print(orjson.dumps(figures, option=orjson.OPT_NON_STR_KEYS).decode())
    else:
        before, after = figures["load_average_before"], figures["load_average_after"]
        print(f"client {args.client}; servers on CPUs {args.server_cpus}; "
              f"load average {before} before, {after} after")  # fmt: skip
        print(f"{'concurrency':>11} {'server':>10} {'req/s':>9} {'p50 µs':>9} {'p99 µs':>9}")
        for c in levels:
            for name in ("appliance", "triton"):
                r = results[name][c]
                print(f"{c:>11} {name:>10} {r['rps']:>9,.0f} {r['p50_us']:>9,.1f} "
                      f"{r['p99_us']:>9,.1f}")  # fmt: skip
            print(f"{'':>11} {'ratio':>10} {figures['ratio_rps'][c]:>9}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
