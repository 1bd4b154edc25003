"""`appliance selftest`: proves a build works end to end, with no network and no model store.

It starts the real HTTP server on a free loopback port, loads the bundled sample model, sends one
inference over HTTP and compares the answer with the one recorded when the model was made. Every
packaged binary runs it (mitmproxy-style), so a missing hidden import or data file fails the
build, not a device.
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
import time
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import ApplianceError

#: Relative tolerance against the recorded probabilities (they are stored to 6 decimals).
TOLERANCE = 1e-4


def data_dir() -> Path:
    """Where the bundled sample model lives (inside the package, or the frozen bundle)."""
    return Path(str(resources.files("appliance") / "data"))


async def _run(timeout_s: float) -> str:
    import aiohttp

    from .api.http import ENGINE, LOADER
    from .api.http_server import open_server
    from .config import load_config
    from .server import build, source_from_file

    data = data_dir()
    expected: dict[str, Any] = json.loads((data / "sample.expected.json").read_text())
    # Hermetic: no config file, no APPLIANCE_* variables, loopback only.
    config = load_config(
        None, {"server": {"host": "127.0.0.1", "port": 0, "access_log": False}}, environ={}
    )
    app = build(config, [source_from_file(data / "sample.onnx", "sample")])
    # The server `appliance serve` runs: its own protocol for infer, aiohttp for the rest.
    running = await open_server(app, socket.create_server(("127.0.0.1", 0)))
    try:
        host, port = "127.0.0.1", running.port
        await asyncio.wait_for(app[LOADER], timeout_s)
        model = app[ENGINE].model("sample")
        if model.status != "ready":
            raise ApplianceError(f"the sample model did not load: {model.reason}")
        body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4],
                            "data": expected["input"]}]}  # fmt: skip
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            url = f"http://{host}:{port}/v2"
            async with session.get(f"{url}/health/ready") as r:
                if r.status != 200:
                    raise ApplianceError(f"/v2/health/ready answered {r.status}: {await r.text()}")
            t0 = time.perf_counter()
            async with session.post(f"{url}/models/sample/infer", json=body) as r:
                answer = await r.json()
                if r.status != 200:
                    raise ApplianceError(f"inference answered {r.status}: {answer}")
            elapsed_ms = (time.perf_counter() - t0) * 1000
        outputs = {o["name"]: o["data"] for o in answer["outputs"]}
        got = outputs.get("probabilities", [])
        want = expected["probabilities"]
        if len(got) != len(want) or not all(
            math.isclose(g, w, rel_tol=TOLERANCE, abs_tol=1e-6)
            for g, w in zip(got, want, strict=True)
        ):
            raise ApplianceError(f"wrong answer: probabilities {got}, expected {want}")
        if outputs.get("label") != expected["label"]:
            raise ApplianceError(
                f"wrong answer: label {outputs.get('label')}, expected {expected['label']}"
            )
        placement = model.placement
        where = f"{placement.device} ({placement.detail})" if placement else "unknown device"
        return f"sample model on {where} answered correctly over HTTP in {elapsed_ms:.1f} ms"
    finally:
        await running.close()


def run_selftest(timeout_s: float = 60.0) -> tuple[bool, str]:
    """(passed, one-line reason)."""
    try:
        return True, asyncio.run(_run(timeout_s))
    except ApplianceError as exc:
        return False, exc.message
    except Exception as exc:  # the point is to report any breakage in one line
        return False, f"{type(exc).__name__}: {exc}"
