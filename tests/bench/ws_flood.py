"""A WebSocket client sending frames at a fixed rate, faster than a slow model runs
(python -m tests.bench.ws_flood [--fps 400] [--seconds 30] [--policy drop_oldest]).

A real `appliance serve` with the compute-bound MLP of build/make_sample_models.py --heavy (4
layers of 2048x2048; FP32[1,2048] frames sent binary-framed). Reported: frames sent, answered
and reported dropped (every frame must be one or the other), the answers' latency, and the
server's resident memory sampled through the run: with `drop_oldest` it must stay flat however
long the flood lasts, since a connection holds at most max_inflight + queue frames.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np
import orjson

from appliance.registry import Registry
from tests.conftest import ROOT, start_server_process, stop_server_process


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def frame(i: int, x: np.ndarray) -> bytes:
    head = orjson.dumps({
        "id": str(i),
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 2048],
                    "parameters": {"binary_data_size": x.nbytes}}],
        "outputs": [{"name": "output", "parameters": {"binary_data": True}}],
    })  # fmt: skip
    return len(head).to_bytes(4, "little") + head + x.tobytes()


async def flood(port: int, pid: int, fps: float, seconds: float) -> None:
    x = np.random.default_rng(0).standard_normal((1, 2048)).astype("<f4")
    n = int(fps * seconds)
    sent_at: dict[str, float] = {}
    lat: list[float] = []
    dropped: list[str] = []
    memory: list[tuple[float, float]] = [(0.0, rss_mib(pid))]
    async with aiohttp.ClientSession() as session:
        url = f"http://127.0.0.1:{port}/v2/models/heavy/stream"
        async with session.ws_connect(url, max_msg_size=0) as ws:
            start = time.perf_counter()

            async def send() -> None:
                for i in range(n):
                    delay = start + i / fps - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    sent_at[str(i)] = time.perf_counter()
                    await ws.send_bytes(frame(i, x))
                    if i % int(fps) == 0:
                        memory.append((time.perf_counter() - start, rss_mib(pid)))

            sender = asyncio.create_task(send())
            answered = 0
            while answered + len(dropped) < n:
                msg = await ws.receive()
                if msg.type == aiohttp.WSMsgType.TEXT:
                    body = orjson.loads(msg.data)
                    assert "dropped" in body, body
                    dropped += body["dropped"]
                    continue
                length = int.from_bytes(msg.data[:4], "little")
                rid = orjson.loads(msg.data[4 : 4 + length])["id"]
                lat.append(time.perf_counter() - sent_at[rid])
                answered += 1
            await sender
            elapsed = time.perf_counter() - start
    memory.append((elapsed, rss_mib(pid)))
    print(f"sent {n} frames at {fps:g}/s over {elapsed:.1f} s: answered {answered} "
          f"({answered / elapsed:.0f}/s), dropped and reported {len(dropped)}")  # fmt: skip
    if lat:
        lat.sort()
        print(f"latency of answered frames: p50 {statistics.median(lat) * 1000:.1f} ms, "
              f"p99 {lat[int(0.99 * (len(lat) - 1))] * 1000:.1f} ms")  # fmt: skip
    print("server RSS (MiB) over the run: "
          + ", ".join(f"{t:.0f}s {m:.0f}" for t, m in memory))  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fps", type=float, default=400)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--policy", default="drop_oldest")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        subprocess.run(
            [sys.executable, str(ROOT / "build" / "make_sample_models.py"), "--heavy",
             "--out", str(out)],
            check=True, capture_output=True,
        )  # fmt: skip
        store = Registry(out / "store")
        store.add("heavy", out / "heavy_mlp.onnx")
        env = {"APPLIANCE_SERVER__ACCESS_LOG": "false", "APPLIANCE_WEBSOCKET__POLICY": args.policy}
        server = start_server_process(["--models", str(store.root)], env=env)
        try:
            asyncio.run(flood(server.port, server.proc.pid, args.fps, args.seconds))
        finally:
            stop_server_process(server)


if __name__ == "__main__":
    main()
