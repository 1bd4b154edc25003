"""Pipelines against their baselines, side by side in one run (issue 16's two figures).

    PYTHONPATH=. .venv/bin/python tests/bench/pipeline_bench.py [--part chain|fanout|both]

1. chain, in-process at concurrency 1: a 2-model pipeline through the router (what every
   front calls) against calling both models through the same router one after the other,
   handing the first model's output to the second. Rounds alternate the two; the figure is the
   median of the per-round ratios (target ≤ 1.15). Twice: tiny models (y = 2x, then z = y + 1,
   FP32 [1, 4]: the pipeline's own cost at its most visible) and build/samples/heavy_mlp.onnx
   twice (compute-bound, [1, 2048]).
2. fan-out, over HTTP at concurrency 8, against `appliance serve` in its own process: a
   pipeline whose first node fans its 16 output rows out to build/samples/sample.onnx (each
   row its own call, merged by the model's dynamic batcher), against a client that sends the
   same 16 rows to sample.onnx one request each. Throughput in rows per second; rounds
   alternate; the figure is the median ratio (target ≥ 3).

Nothing is downloaded: the tiny models are written here with onnx.helper, the samples by
build/make_sample_models.py (`make samples`).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from appliance.bench.client import build_request, free_port
from appliance.bench.timing import time_concurrent
from appliance.codec import InferRequest
from appliance.config import load_config
from appliance.engine import Engine
from appliance.metrics import Metrics
from appliance.registry import Registry
from appliance.routing import Router
from appliance.server import sources_from_store

ROOT = Path(__file__).resolve().parent.parent.parent
SAMPLES = ROOT / "build" / "samples"


def chain_doc(first: str, second: str, a_in: str, a_out: str, b_in: str, b_out: str,
              shape: list[int]) -> dict[str, Any]:  # fmt: skip
    return {
        "kind": "pipeline",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": shape}],
        "nodes": [
            {"name": "a", "model": first, "inputs": {a_in: "request.x"}},
            {"name": "b", "model": second, "inputs": {b_in: f"a.{a_out}"}},
        ],
        "outputs": [{"name": "out", "source": f"b.{b_out}"}],
    }


async def _chain(
    store: Path, decl: Path, first: str, second: str, a_in: str, a_out: str, b_in: str,
    width: int, requests: int, rounds: int,
) -> dict[str, float]:  # fmt: skip
    config = load_config(None, {
        "store": {"path": str(store)},
        "model_defaults": {"probe_first_load": False},
        "pipelines": {"chain": {"file": str(decl)}},
    }, {})  # fmt: skip
    metrics = Metrics()
    engine = Engine(config, metrics, sources_from_store(store), store / ".cache")
    await engine.start()
    router = Router(engine, config, metrics)
    x = np.random.default_rng(0).normal(size=(1, width)).astype(np.float32)

    async def direct() -> None:
        r1 = await router.infer(first, None, InferRequest({a_in: x}))
        await router.infer(second, None, InferRequest({b_in: r1.outputs[a_out]}))

    async def piped() -> None:
        await router.infer("chain", None, InferRequest({"x": x}))

    async def timed(call: Any) -> tuple[float, float]:
        """Seconds per request: wall time, and the process's CPU time (steadier on a machine
        shared with other work)."""
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(requests):
            await call()
        return (time.perf_counter() - t0) / requests, (time.process_time() - c0) / requests

    for call in (direct, piped):  # warm up: runtimes, the inline estimate, the binding
        await timed(call)
    wall: list[float] = []
    cpu: list[float] = []
    d_us, p_us = [], []
    for _ in range(rounds):
        d, dc = await timed(direct)
        p, pc = await timed(piped)
        wall.append(p / d)
        cpu.append(pc / dc)
        d_us.append(d * 1e6)
        p_us.append(p * 1e6)
    await engine.stop()
    return {"direct_us": statistics.median(d_us), "pipeline_us": statistics.median(p_us),
            "ratio": statistics.median(wall), "cpu_ratio": statistics.median(cpu)}  # fmt: skip


def chain(work: Path, requests: int, rounds: int) -> None:
    sys.path.insert(0, str(ROOT))
    from tests.pipelines.models import affine

    store = Registry(work / "chain-models")
    store.add("double", affine(work / "double.onnx", "x", "y", 2.0, 0.0))
    store.add("addone", affine(work / "addone.onnx", "y", "z", 1.0, 1.0))
    store.add("heavy", SAMPLES / "heavy_mlp.onnx")
    store.add("heavy2", SAMPLES / "heavy_mlp.onnx")
    cases = [
        ("tiny", ("double", "addone", "x", "y", "y", "z", 4), requests),
        ("heavy_mlp", ("heavy", "heavy2", "input", "output", "input", "output", 2048),
         max(requests // 25, 10)),
    ]  # fmt: skip
    for label, (m1, m2, a_in, a_out, b_in, b_out, width), n in cases:
        decl = work / f"chain-{label}.pipeline.json"
        decl.write_bytes(orjson.dumps(chain_doc(m1, m2, a_in, a_out, b_in, b_out, [-1, width])))
        out = asyncio.run(_chain(store.root, decl, m1, m2, a_in, a_out, b_in, width, n, rounds))
        print(
            f"chain {label:<9} c=1 in-process: both models called directly "
            f"{out['direct_us']:8.1f} µs, the 2-model pipeline {out['pipeline_us']:8.1f} µs: "
            f"ratio {out['ratio']:.3f}, in CPU time {out['cpu_ratio']:.3f} (medians of "
            f"{rounds} rounds of {n}; target ≤ 1.15)"
        )


FAN = {
    "kind": "pipeline",
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
    "nodes": [
        {"name": "prep", "model": "double", "inputs": {"x": "request.x"}, "fan_out": True},
        {"name": "cls", "model": "sample", "inputs": {"input": "prep.y"}},
    ],
    "outputs": [{"name": "probabilities", "source": "cls.probabilities"},
                {"name": "label", "source": "cls.label"}],
}  # fmt: skip


def _body(rows: np.ndarray[Any, Any], name: str) -> bytes:
    return orjson.dumps({"inputs": [{"name": name, "datatype": "FP32", "shape": list(rows.shape),
                                     "data": rows.reshape(-1).tolist()}]})  # fmt: skip


def fanout(work: Path, requests: int, rounds: int, rows: int, concurrency: int) -> None:
    sys.path.insert(0, str(ROOT))
    from tests.pipelines.models import affine

    store = Registry(work / "fan-models")
    store.add("double", affine(work / "double.onnx", "x", "y", 2.0, 0.0))
    store.add("sample", SAMPLES / "sample.onnx")
    decl = work / "fan.pipeline.json"
    decl.write_bytes(orjson.dumps(FAN))
    config = work / "fan.toml"
    # every row of every request in the model's queue at once: 8 x 16 > the default 64
    config.write_text(f'[pipelines.fan]\nfile = "{decl}"\n[models.sample]\nmax_queue = 1024\n')
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance", "serve", "--port", str(port), "--models",
         str(store.root), "--config", str(config), "--log-level", "warning"],
        cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _wait_ready(port)
        x = np.random.default_rng(1).normal(size=(rows, 4)).astype(np.float32)
        address = ("127.0.0.1", port)
        headers = {"Content-Type": "application/json"}
        piped = build_request("POST", "/v2/models/fan/infer", *address, _body(x, "x"), headers)
        one = build_request("POST", "/v2/models/sample/infer", *address,
                            _body(x[:1] * 2, "input"), headers)  # fmt: skip
        ratios, p_rows, o_rows = [], [], []
        for i in range(rounds + 1):
            _, wall_p = time_concurrent(address, piped, concurrency, 20, requests, 30.0)
            _, wall_o = time_concurrent(address, one, concurrency, 20, requests * rows, 30.0)
            if i == 0:
                continue  # warm-up round
            p, o = requests * rows / wall_p, requests * rows / wall_o
            ratios.append(p / o)
            p_rows.append(p)
            o_rows.append(o)
        print(
            f"fan-out {rows} rows c={concurrency} over HTTP: one by one "
            f"{statistics.median(o_rows):8.0f} rows/s, the pipeline "
            f"{statistics.median(p_rows):8.0f} rows/s "
            f"({statistics.median(p_rows) / rows:.0f} req/s): ratio "
            f"{statistics.median(ratios):.2f} (median of {rounds} rounds; target ≥ 3)"
        )
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        for line in metrics.decode().splitlines():
            if line.startswith(("appliance_batch_size_count", "appliance_batch_size_sum")) and (
                'model="sample"' in line
            ):
                print("  " + line)
    finally:
        proc.terminate()
        proc.wait(15)


def _wait_ready(port: int) -> None:
    deadline = time.monotonic() + 300  # a first load is slow on a busy machine
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/models/fan/ready", timeout=2):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("the server did not become ready")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=["chain", "fanout", "both"], default="both")
    parser.add_argument("--requests", type=int, default=500, help="per round (chain, tiny)")
    parser.add_argument("--fan-requests", type=int, default=200, help="pipeline requests a round")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.part in ("chain", "both"):
            chain(work, args.requests, args.rounds)
        if args.part in ("fanout", "both"):
            fanout(work, args.fan_requests, args.rounds, args.rows, args.concurrency)


if __name__ == "__main__":
    main()
