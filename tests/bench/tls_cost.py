"""What TLS costs on the fast path: the same server over plain HTTP and over HTTPS, side by side
in one run, same model, same load generator.

    PYTHONPATH=. .venv/bin/python tests/bench/tls_cost.py [--model build/samples/sample.onnx]
        [--levels 1,32] [--seconds 5] [--rounds 3] [--server-cpus 0] [--json]

Two `appliance serve` processes of one model file, one with `--tls-cert/--tls-key` (a self-made
CA, ECDSA P-256, tests/support/certs.py), pinned to the same CPUs (taskset) and measured in
turn, alternating round by round; the median round is reported. The client is wrk (one thread,
keep-alive, KServe v2 JSON bodies to /v2/models/sample/infer, which the fast path answers):
each connection pays its handshake once, so the figures are the steady cost of encrypting
requests and answers (TLS 1.3, AES-GCM), not of handshakes. The result is the ratio of
requests per second, of the latencies and of the server's CPU time per request (user + system
from /proc, all threads: the figure that other load on a busy machine disturbs least), HTTPS
over HTTP.
"""

from __future__ import annotations

import argparse
import os
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.bench.triton_compare import _stop, run_wrk  # noqa: E402
from tests.support.certs import make_pki  # noqa: E402

BODY = b'{"inputs":[{"name":"input","datatype":"FP32","shape":[1,4],"data":[5.1,3.5,1.4,0.2]}]}'


def _wait_ready(url: str, ctx: ssl.SSLContext | None, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/v2/health/ready", timeout=5, context=ctx) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} was not ready in time")


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) a process has used: the cost per request,
    which other load on the machine disturbs far less than requests per second."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from appliance.bench.client import free_port

    levels = sorted({int(x) for x in args.levels.split(",")})
    pin = ["taskset", "-c", args.server_cpus] if args.server_cpus else []
    others: set[int] | None = None
    if args.server_cpus:  # the client keeps off the servers' CPUs where there are others
        others = os.sched_getaffinity(0) - {int(x) for x in args.server_cpus.split(",")} or None
    load_before = [round(x, 2) for x in os.getloadavg()]
    results: dict[str, dict[int, dict[str, float]]] = {"http": {}, "https": {}}
    with tempfile.TemporaryDirectory() as tmp:
        pki = make_pki(Path(tmp))
        tls_args = ["--tls-cert", str(pki["server.crt"]), "--tls-key", str(pki["server.key"])]
        ctx = ssl.create_default_context(cafile=str(pki["ca.crt"]))
        ports = {"http": free_port(), "https": free_port()}
        procs: dict[str, subprocess.Popen[bytes]] = {}
        try:
            for name in ("http", "https"):
                procs[name] = subprocess.Popen(
                    [*pin, sys.executable, "-m", "appliance", "serve", "--model", args.model,
                     "--name", "sample", "--port", str(ports[name]), "--log-level", "warning",
                     *(tls_args if name == "https" else [])],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
                    env={**os.environ, "APPLIANCE_SERVER__ACCESS_LOG": "false"},
                )  # fmt: skip
            for name, proc in procs.items():
                url = f"{name}://localhost:{ports[name]}"
                _wait_ready(url, ctx if name == "https" else None, proc)
            for c in levels:
                runs: dict[str, list[dict[str, float]]] = {"http": [], "https": []}
                for i in range(args.rounds):
                    for name in ("http", "https") if i % 2 == 0 else ("https", "http"):
                        url = f"{name}://127.0.0.1:{ports[name]}/v2/models/sample/infer"
                        cpu = _cpu_s(procs[name].pid)
                        got = run_wrk(url, BODY, c, args.seconds, others)
                        served = got["rps"] * args.seconds
                        got["cpu_us_per_req"] = (_cpu_s(procs[name].pid) - cpu) / served * 1e6
                        runs[name].append(got)
                        print(f"c={c} {name} round {i + 1}: {got['rps']:,.0f} req/s",
                              file=sys.stderr, flush=True)  # fmt: skip
                for name, got_runs in runs.items():
                    mid = sorted(got_runs, key=lambda r: r["rps"])[len(got_runs) // 2]
                    results[name][c] = {k: round(v, 1) for k, v in mid.items()}
        finally:
            for proc in procs.values():
                _stop(proc)
    return {
        "model": args.model,
        "server_cpus": args.server_cpus,
        "seconds": args.seconds,
        "rounds": args.rounds,
        "load_average_before": load_before,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "results": results,
        "ratio_https_over_http": {
            c: {
                key: round(results["https"][c][key] / results["http"][c][key], 3)
                for key in ("rps", "p50_us", "p99_us", "cpu_us_per_req")
            }
            for c in levels
        },
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "build" / "samples" / "sample.onnx"))
    ap.add_argument("--levels", default="1,32", help="concurrency levels (wrk connections)")
    ap.add_argument("--seconds", type=float, default=5.0, help="length of one wrk run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--server-cpus", default="0", help="taskset CPU list for both servers")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    figures = measure(args)
    if args.json:
        import orjson

        print(orjson.dumps(figures, option=orjson.OPT_NON_STR_KEYS).decode())
        return 0
    before, after = figures["load_average_before"], figures["load_average_after"]
    print(f"servers on CPUs {args.server_cpus}; load average {before} before, {after} after")
    print(f"{'concurrency':>11} {'scheme':>7} {'req/s':>9} {'p50 µs':>9} {'p99 µs':>9} "
          f"{'CPU µs/req':>10}")  # fmt: skip
    for c, ratio in figures["ratio_https_over_http"].items():
        for name in ("http", "https"):
            r = figures["results"][name][c]
            print(f"{c:>11} {name:>7} {r['rps']:>9,.0f} {r['p50_us']:>9,.1f} {r['p99_us']:>9,.1f} "
                  f"{r['cpu_us_per_req']:>10,.1f}")  # fmt: skip
        print(f"{'':>11} {'ratio':>7} {ratio['rps']:>9} {ratio['p50_us']:>9} {ratio['p99_us']:>9} "
              f"{ratio['cpu_us_per_req']:>10}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
