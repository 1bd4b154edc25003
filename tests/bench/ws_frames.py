"""Frames over one WebSocket vs one HTTP POST per frame, same server, same model, same run
(python -m tests.bench.ws_frames [--frames 2000] [--rounds 5]).

A real `appliance serve` process with two models: `sample` (the tiny MLP, a KServe v2 JSON
tensor per frame) and `classifier` (the TFLite image classifier, a 64x48 JPEG per frame: the
raw picture as the WebSocket message, the same bytes as an `image/jpeg` POST). Three ways to
send the frames, alternated round by round so that the machine's noise hits them alike:

- `http`: one keep-alive connection, one POST per frame, each waiting for its answer;
- `ws lockstep`: one WebSocket, each frame waiting for its answer (the per-message cost);
- `ws window N`: one WebSocket, up to N frames in flight (sent without waiting for the
  answers before them; the server runs 2 at once and answers in order; policy `backpressure`,
  so none is dropped), answers read as they come.

Reported: frames per second and the latency of each frame (send to answer), p50 and p99, the
median over rounds; and the ratio of each way to `http`.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import aiohttp
import orjson

from appliance.registry import Registry
from tests.conftest import ROOT, start_server_process, stop_server_process

X = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def http_frames(
    session: aiohttp.ClientSession, url: str, frames: list[bytes], ctype: str
) -> tuple[float, list[float]]:
    lat = []
    start = time.perf_counter()
    for data in frames:
        t = time.perf_counter()
        async with session.post(url, data=data, headers={"Content-Type": ctype}) as r:
            await r.read()
            assert r.status == 200, r.status
        lat.append(time.perf_counter() - t)
    return time.perf_counter() - start, lat


async def ws_lockstep(
    session: aiohttp.ClientSession, url: str, frames: list[bytes], binary: bool
) -> tuple[float, list[float]]:
    lat = []
    async with session.ws_connect(url) as ws:
        start = time.perf_counter()
        for data in frames:
            t = time.perf_counter()
            await (ws.send_bytes(data) if binary else ws.send_str(data.decode()))
            msg = await ws.receive()
            assert b'"error"' not in (
                msg.data if isinstance(msg.data, bytes) else msg.data.encode()
            )
            lat.append(time.perf_counter() - t)
        return time.perf_counter() - start, lat


async def ws_stream(
    session: aiohttp.ClientSession, url: str, frames: list[bytes], binary: bool, window: int
) -> tuple[float, list[float]]:
    sent: list[float] = []
    lat: list[float] = []
    room = asyncio.Semaphore(window)
    async with session.ws_connect(url) as ws:
        start = time.perf_counter()

        async def send() -> None:
            for data in frames:
                await room.acquire()
                sent.append(time.perf_counter())
                await (ws.send_bytes(data) if binary else ws.send_str(data.decode()))

        sender = asyncio.create_task(send())
        for i in range(len(frames)):
            msg = await ws.receive()
            text = msg.data if isinstance(msg.data, str) else msg.data.decode()
            assert '"dropped"' not in text and '"error"' not in text, text[:200]
            lat.append(time.perf_counter() - sent[i])
            room.release()
        await sender
        return time.perf_counter() - start, lat


async def bench(port: int, n: int, rounds: int, window: int) -> None:
    from tests.support.images import encode, picture

    jpeg = encode(picture(64, 48, 1), "JPEG", quality=90)
    cases = {
        "sample (JSON tensor)": ("sample", [orjson.dumps({**X, "id": str(i)}) for i in range(n)],
                                 "application/json", False),
        "classifier (JPEG)": ("classifier", [jpeg] * n, "image/jpeg", True),
    }  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector) as session:
        for label, (model, frames, ctype, binary) in cases.items():
            results: dict[str, list[tuple[float, float, float]]] = {}
            infer, stream = f"{base}/v2/models/{model}/infer", f"{base}/v2/models/{model}/stream"
            ways = {
                "http": partial(http_frames, session, infer, frames, ctype),
                "ws lockstep": partial(ws_lockstep, session, stream, frames, binary),
                f"ws window {window}": partial(ws_stream, session, stream, frames, binary, window),
            }
            for way in ways.values():  # warm-up
                await way()
            for _ in range(rounds):
                for name, way in ways.items():
                    seconds, lat = await way()
                    results.setdefault(name, []).append(
                        (n / seconds, percentile(lat, 0.5), percentile(lat, 0.99))
                    )
            print(f"\n{label}: {n} frames x {rounds} rounds (medians over rounds)")
            print(f"{'way':<13} {'frames/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'fps vs http':>12}")
            http_fps = statistics.median(r[0] for r in results["http"])
            for name, rows in results.items():
                fps = statistics.median(r[0] for r in rows)
                p50 = statistics.median(r[1] for r in rows) * 1000
                p99 = statistics.median(r[2] for r in rows) * 1000
                print(f"{name:<13} {fps:>9.0f} {p50:>8.3f} {p99:>8.3f} {fps / http_fps:>11.2f}x")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--window", type=int, default=4, help="frames in flight (ws window)")
    args = parser.parse_args(argv)
    import subprocess

    from tests.support.images import CLASSIFIER_POST, CLASSIFIER_PRE

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for script in ("make_sample_models.py", "make_tflite_models.py"):
            subprocess.run(
                [sys.executable, str(ROOT / "build" / script), "--out", str(out)],
                check=True,
                capture_output=True,
            )
        store = Registry(out / "store")
        store.add("sample", out / "sample.onnx")
        store.add("classifier", out / "tfl_classifier.tflite", preprocess=CLASSIFIER_PRE,
                  postprocess=CLASSIFIER_POST)  # fmt: skip
        env = {
            "APPLIANCE_SERVER__ACCESS_LOG": "false",
            "APPLIANCE_WEBSOCKET__POLICY": "backpressure",
        }
        server = start_server_process(["--models", str(store.root)], env=env)
        try:
            asyncio.run(bench(server.port, args.frames, args.rounds, args.window))
        finally:
            stop_server_process(server)


if __name__ == "__main__":
    main()
