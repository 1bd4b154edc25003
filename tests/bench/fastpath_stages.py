"""Where the KServe v2 fast path's CPU goes, stage by stage, for one small JSON request.

    PYTHONPATH=. .venv/bin/python tests/bench/fastpath_stages.py [--model M] [--repeat 5]

Each stage of api/http_server.py's path is called on its own, many times, on the same request
(build/samples/sample.onnx, a [1, 4] FP32 input): the head parse, the route match, the request
record, admission, the JSON decode, the request path down to the runtime, the runtime call
alone, the answer's encoding and write, and the accounting. The best of `--repeat` rounds is
reported, beside the whole request (`inprocess_path.py`'s loop: the stages plus the loop turn
between them) and a bare `InferenceSession.run` on the same input: the part of the path that
is the model's, and what the rest costs. Stages that need the previous ones' results get them
from one real request first. Run it for two trees alternately to compare them.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from appliance.api.http import LOADER, encode_answer, tensor_request  # noqa: E402
from appliance.api.http_server import open_server, parse_head  # noqa: E402
from appliance.config import load_config  # noqa: E402
from appliance.logs import setup_logging  # noqa: E402
from appliance.server import build, source_from_file  # noqa: E402
from tests.bench.inprocess_path import BODY, RAW, NullTransport  # noqa: E402


def _best(fn: Callable[[], Any], n: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e6


async def _best_async(fn: Callable[[], Awaitable[Any]], n: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(n):
            await fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e6


async def measure(model: Path, n: int, repeat: int) -> list[tuple[str, float]]:
    config = load_config(None, {"server": {"port": 0}}, environ={})
    app = build(config, [source_from_file(model, "sample")])
    running = await open_server(app, socket.create_server(("127.0.0.1", 0)))
    rows: list[tuple[str, float]] = []
    try:
        await app[LOADER]
        server = running.http
        paths = server.paths
        conn = server.protocol()
        conn.connection_made(NullTransport())

        async def whole() -> None:
            conn.data_received(RAW)
            if conn.task is not None:  # the request had to wait (a queued model)
                await conn.task
            else:  # answered before data_received returned (api/eager.py): one loop turn
                await asyncio.sleep(0)  # per request all the same, as a server's loop takes

        for _ in range(3000):  # the inline path learns the model's run time
            await whole()
        rows.append(("whole request (loop CPU)", await _best_async(whole, n, repeat)))
        raw_head = RAW[: RAW.find(b"\r\n\r\n")]
        head = parse_head(raw_head)
        assert head is not None and conn._hot(head)
        rows.append(("parse the head", _best(lambda: parse_head(raw_head), n, repeat)))
        rows.append(("match the route", _best(lambda: conn._hot(head), n, repeat)))
        rows.append(("begin the request record", _best(lambda: conn._begin(head), n, repeat)))
        req = conn._begin(head)
        rows.append(("admit (model, queue)", _best(lambda: paths.admit(req, "sample"), n, repeat)))
        rows.append(("decode the JSON body", _best(lambda: tensor_request(BODY, None), n, repeat)))
        decoded = tensor_request(BODY, None)

        async def down() -> Any:
            return await paths.infer(conn._begin(head), "sample", None, tensor_request(BODY, None))

        result = await down()
        path_us = await _best_async(down, n, repeat)
        loaded = paths.router.engine.model_or_none("sample")
        assert loaded is not None and loaded.runner is not None
        backend, inputs = loaded.runner.backend, decoded.inputs
        run_us = _best(lambda: backend.run(inputs, None), n, repeat)
        rows.append(("begin + decode + request path + run", path_us))
        rows.append(("  of which the backend's run", run_us))
        encode = lambda: encode_answer(result, decoded, "sample")  # noqa: E731
        rows.append(("encode the answer", _best(encode, n, repeat)))
        extra = {"X-Model-Name": "sample", "X-Model-Version": "1"}
        write = lambda: conn._write(200, b"{}", b"application/json", extra, req.id, False)  # noqa: E731
        rows.append(("write the answer", _best(write, n, repeat)))

        def account() -> None:
            r = conn._begin(head)
            r.target = "sample"
            paths.finish(r, 200)

        rows.append(("begin + finish (accounting)", _best(account, n, repeat)))
        session = getattr(backend, "_session", None) or getattr(backend, "session", None)
        if session is not None:
            feed = dict(inputs)
            bare = lambda: session.run(None, feed)  # noqa: E731
            rows.append(("bare InferenceSession.run", _best(bare, n, repeat)))
    finally:
        await running.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "build" / "samples" / "sample.onnx")
    ap.add_argument("--requests", type=int, default=20000, help="calls per round of each stage")
    ap.add_argument("--repeat", type=int, default=5, help="rounds; the best is reported")
    args = ap.parse_args()
    setup_logging("warning")
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    for label, us in asyncio.run(measure(args.model, args.requests, args.repeat)):
        print(f"{label:40s} {us:7.2f} µs")


if __name__ == "__main__":
    main()
