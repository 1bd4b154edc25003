"""CPU per request of the HTTP fast path, in-process, without sockets or a load generator.

    PYTHONPATH=. .venv/bin/python tests/bench/inprocess_path.py [--requests 3000] [--rounds 7]
        [--isolation none|process|both] [--spin-us US] [--tracing off|all]

Feeds a plain KServe v2 infer request for build/samples/sample.onnx to the front protocol's
connection object (api/http_server.py) over a transport that discards what is written, and
reports the event loop thread's CPU time per request (median of the rounds): parsing, the
request path, the codec, the engine and the runtime call, the access log record. With no
client and no kernel in the loop it is steady enough to compare two trees side by side (run it
alternately with PYTHONPATH set to each): differences of a few microseconds show, where HTTP
round trips on a shared 2-core machine vary by tens.

`--tracing all` runs the same loop with tracing off, on at a sampling ratio of 1/1000 and on at
1/1, side by side (spans go to a minimal OTLP/HTTP endpoint in another process; the exporter's
thread is not the loop's: the loop's cost of making the spans is what is measured).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from appliance.api.http import LOADER
from appliance.api.http_server import open_server
from appliance.config import load_config
from appliance.server import build, source_from_file

BODY = b'{"inputs":[{"name":"input","datatype":"FP32","shape":[1,4],"data":[5.1,3.5,1.4,0.2]}]}'
RAW = (
    b"POST /v2/models/sample/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n" % len(BODY)
) + BODY


_SINK = """
import http.server
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *a):
        pass
s = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
print(s.server_address[1], flush=True)
s.serve_forever()
"""


#: The child processes' CPU per request of each `measure` (the worker of an isolated model).
CHILDREN_CPU: list[float] = []


def _children_cpu() -> float:
    """Seconds of CPU the running child processes of this one have used (from /proc: clock
    ticks, so only long rounds tell)."""
    me, total = str(os.getpid()), 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[1] == me:
                total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


class NullTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, data: Any) -> None:
        self.writes += 1

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else default

    def close(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def measure(
    model: Path,
    requests: int,
    rounds: int,
    isolation: str = "none",
    ratio: float | None = None,
    steps: dict[str, Any] | None = None,
    spin_us: float | None = None,
) -> tuple[float, float]:
    """(event loop CPU, wall time) per request, in microseconds (medians of the rounds);
    `ratio`: tracing on at this sampling ratio (None: off); `steps`: the model's manifest
    declares these steps."""
    overrides: dict[str, Any] = {"server": {"port": 0, "access_log": True}}
    if isolation != "none":  # (a tree from before isolation knows no such key)
        overrides["model_defaults"] = {"isolation": isolation}
        if spin_us is not None:  # (nor one from before polling this one)
            overrides["model_defaults"]["process"] = {"spin_us": spin_us}
    sink = None
    if ratio is not None:
        # an OTLP endpoint in another process that answers every export with 200
        sink = subprocess.Popen([sys.executable, "-c", _SINK], stdout=subprocess.PIPE, text=True)
        assert sink.stdout is not None
        port = int(sink.stdout.readline())
        overrides["tracing"] = {
            "enabled": True,
            "sampling_ratio": ratio,
            "endpoint": f"http://127.0.0.1:{port}/v1/traces",
        }
    config = load_config(None, overrides, environ={})
    source = source_from_file(model, "sample")
    if steps is not None:
        manifest = dataclasses.replace(source.manifest, steps=steps)
        source = dataclasses.replace(source, manifest=manifest)
    app = build(config, [source])
    running = await open_server(app, socket.create_server(("127.0.0.1", 0)))
    try:
        await app[LOADER]
        conn = running.http.protocol()
        transport = NullTransport()
        conn.connection_made(transport)

        async def one() -> None:
            conn.data_received(RAW)
            if conn.task is not None:  # the request had to wait (a queued model)
                await conn.task
            else:  # answered before data_received returned (api/eager.py): one loop turn
                await asyncio.sleep(0)  # per request all the same, as a server's loop takes

        for _ in range(requests):  # warm up (the inline path learns the model's run time)
            await one()
        cpu, wall, others = [], [], []
        for _ in range(rounds):
            start, t0, c0 = time.thread_time(), time.perf_counter(), _children_cpu()
            for _ in range(requests):
                await one()
            cpu.append((time.thread_time() - start) / requests * 1e6)
            wall.append((time.perf_counter() - t0) / requests * 1e6)
            others.append((_children_cpu() - c0) / requests * 1e6)
        CHILDREN_CPU.append(statistics.median(others))
        assert transport.writes == requests * (rounds + 1)
        return statistics.median(cpu), statistics.median(wall)
    finally:
        await running.close()
        if sink is not None:
            sink.kill()
            sink.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", type=Path, default=Path("build/samples/sample.onnx"))
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument(
        "--isolation",
        choices=["none", "process", "both"],
        default="none",
        help="the model in-process, in a worker process, or both side by side (wall time per "
        "request then tells what isolation adds at c=1: the worker's CPU is not the loop's)",
    )
    ap.add_argument(
        "--tracing",
        choices=["off", "all"],
        default="off",
        help="all: tracing off, on at 1/1000 and on at 1/1, side by side",
    )
    ap.add_argument(
        "--spin-us",
        type=float,
        help="the isolated model's process.spin_us (default: the configuration's)",
    )
    ap.add_argument("--repeat", type=int, default=1, help="run the three settings this often")
    ap.add_argument(
        "--steps",
        metavar="JSON",
        help="also with these steps declared, side by side (a pass-through on the sample model: "
        '\'{"input": [{"type": "cast", "datatype": "FP32"}]}\')',
    )
    args = ap.parse_args()
    access = logging.getLogger("appliance.access")  # records made, not written
    access.addHandler(logging.NullHandler())
    access.propagate = False
    logging.getLogger("appliance").setLevel(logging.WARNING)
    access.setLevel(logging.INFO)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    kinds = ["none", "process"] if args.isolation == "both" else [args.isolation]
    ratios: list[float | None] = (
        [None, 0.001, 1.0] * args.repeat if args.tracing == "all" else [None]
    )
    declared: list[dict[str, Any] | None] = [None]
    if args.steps:
        declared = [None, json.loads(args.steps)] * args.repeat
    for kind in kinds:
        for ratio in ratios:
            for steps in declared:
                cpu, wall = asyncio.run(
                    measure(
                        args.model, args.requests, args.rounds, kind, ratio, steps, args.spin_us
                    )
                )
                what = "off" if ratio is None else f"on at {ratio:g}"
                with_steps = "" if steps is None else ", with the steps"
                worker = f", worker CPU {CHILDREN_CPU[-1]:.1f} µs" if kind != "none" else ""
                print(
                    f"isolation {kind}, tracing {what}{with_steps}: event loop CPU per request: "
                    f"{cpu:.1f} µs, wall {wall:.1f} µs{worker}"
                )


if __name__ == "__main__":
    main()
