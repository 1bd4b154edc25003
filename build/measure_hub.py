"""Measure the hub in its own process over loopback: telemetry ingest, assignment polls (200 vs
304 side by side), and a real TUF client's refresh + download.

    python build/measure_hub.py MODEL.onnx [--devices 50] [--batches 20]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _hub(*args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "appliance", "hub", *args],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    ).stdout


def _call(url: str, token: str, body: Any = None, etag: str | None = None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    if etag:
        headers["If-None-Match"] = etag
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req) as resp:
            resp.read()
            return resp.status, resp.headers.get("ETag", "")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("ETag", "")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--devices", type=int, default=50)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--polls", type=int, default=500)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="hub-measure-"))
    data = tmp / "data"
    _hub("init", "--data", str(data))
    tokens = [_hub("enroll", f"d{i}", "--data", str(data)).strip() for i in range(args.devices)]
    _hub("publish", "m", args.model, "--version", "1", "--data", str(data))
    _hub("rollout", "m", "1", "--all", "--data", str(data))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance", "hub", "serve", "--data", str(data), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        m = re.search(r"http://127\.0\.0\.1:(\d+)", proc.stdout.readline())
        assert m
        base = f"http://127.0.0.1:{m.group(1)}"
        out: dict[str, Any] = {}

        # Telemetry: batches of 500 events, then the same batches again (all duplicates).
        batches = [
            {
                "events": [
                    {"seq": b * 500 + i + 1, "time": "t", "kind": "metrics", "data": {"n": i}}
                    for i in range(500)
                ]
            }
            for b in range(args.batches)
        ]
        for label in ("new", "duplicate"):
            t0 = time.perf_counter()
            for b in batches:
                assert _call(base + "/api/v1/device/telemetry", tokens[0], b)[0] == 200
            dt = time.perf_counter() - t0
            out[f"telemetry_{label}_events_per_s"] = round(500 * args.batches / dt)

        # Polls: full answers and 304s, interleaved so both see the same machine load.
        url = base + "/api/v1/device/assignments"
        _, etag = _call(url, tokens[0])
        full = cond = 0.0
        for i in range(args.polls):
            tok = tokens[i % len(tokens)]
            t0 = time.perf_counter()
            _call(url, tok)
            t1 = time.perf_counter()
            assert _call(url, tokens[0], etag=etag)[0] == 304
            t2 = time.perf_counter()
            full += t1 - t0
            cond += t2 - t1
        out["poll_200_ms"] = round(1000 * full / args.polls, 3)
        out["poll_304_ms"] = round(1000 * cond / args.polls, 3)
        out["poll_304_over_200"] = round(cond / full, 3)

        # A real TUF client: first refresh (root, timestamp, snapshot, targets) and download.
        sys.path.insert(0, str(ROOT))
        from tuf.ngclient import Updater

        from tests.hub.conftest import TokenFetcher

        meta = tmp / "device" / "metadata"
        meta.mkdir(parents=True)
        (meta / "root.json").write_bytes((data / "1.root.json").read_bytes())
        up = Updater(
            str(meta),
            base + "/tuf/metadata/",
            str(tmp / "device"),
            base + "/tuf/targets/",
            TokenFetcher(tokens[0]),
            bootstrap=None,
        )
        t0 = time.perf_counter()
        up.refresh()
        info = up.get_targetinfo("m/1/" + "model.onnx")
        assert info is not None
        up.download_target(info)
        out["tuf_first_refresh_and_download_ms"] = round(1000 * (time.perf_counter() - t0), 1)
        out["model_bytes"] = info.length
        print(json.dumps(out, indent=2))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
