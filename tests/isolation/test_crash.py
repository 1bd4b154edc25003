"""A native crash in an isolated model's worker, with a real server process and real worker
processes: the requests in flight fail with a clear 503 naming the signal, the model is not ready
with that reason, it comes back by itself, and every other model serves all the while."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from appliance.registry import Registry
from tests.conftest import SAMPLE_NAMES, start_server_process, stop_server_process
from tests.support.plugins.appliance_crashy import ABORT, HANG, KILLED, SEGFAULT, SLOW

from .conftest import add_crashy, plugin_path

SAMPLE = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
CONFIG = """
[models.crashy]
isolation = "process"
max_concurrency = 4
timeout_s = 20.0

[models.crashy.process]
restart_backoff_s = 0.5
restart_backoff_max_s = 1.0
healthy_after_s = 600.0

[models.hangs]
isolation = "process"
timeout_s = 1.0

[models.hangs.process]
restart_backoff_s = 0.1
"""


def crashy(*values: float) -> dict[str, Any]:
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": [len(values)], "data": values}]}


class Client:
    def __init__(self, http: aiohttp.ClientSession, base: str) -> None:
        self.http, self.base = http, base

    async def infer(self, model: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        async with self.http.post(f"{self.base}/v2/models/{model}/infer", json=body) as r:
            return r.status, await r.json()

    async def get(self, path: str) -> tuple[int, dict[str, Any]]:
        async with self.http.get(self.base + path) as r:
            return r.status, await r.json()

    async def until_ready(self, model: str, within_s: float = 60.0) -> None:
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            status, _ = await self.get(f"/v2/models/{model}/ready")
            if status == 200:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"{model} did not come back within {within_s} s")


@pytest.fixture
def server(plugin: None, tmp_path: Path, samples: Path) -> Any:
    store = Registry(tmp_path / "models")
    for name in SAMPLE_NAMES:
        store.add(name, samples / f"{name}.onnx")
    add_crashy(store, tmp_path, "crashy")
    add_crashy(store, tmp_path, "hangs")
    config = tmp_path / "config.toml"
    config.write_text(CONFIG)
    proc = start_server_process(
        ["--models", str(store.root), "--config", str(config)], env={"PYTHONPATH": plugin_path()}
    )
    yield proc
    stop_server_process(proc)


async def test_crashes_fail_only_their_model_which_restarts_with_backoff(server: Any) -> None:
    async with aiohttp.ClientSession() as http:
        c = Client(http, f"http://{server.url}")
        stop = asyncio.Event()

        async def other_model() -> list[int]:
            statuses: list[int] = []
            while not stop.is_set():
                got = await asyncio.gather(*(c.infer("sample", SAMPLE) for _ in range(4)))
                statuses += [s for s, _ in got]
            return statuses

        traffic = asyncio.create_task(other_model())
        try:
            await crash_and_recover(c)
        finally:
            stop.set()
            statuses = await traffic
        assert len(statuses) > 20 and set(statuses) == {200}
    assert server.proc.poll() is None
    killed = "model hangs/1: its worker process did not answer within 1 s: it was killed"
    assert any(killed in line for line in server.lines)


async def crash_and_recover(c: Client) -> None:
    """The crashes, the failures and the recoveries (the other model is served meanwhile)."""
    _, meta = await c.get("/v2/models/crashy")
    first_worker = meta["parameters"]["runtime_detail"]
    assert (await c.infer("crashy", crashy(1, 2)))[1]["outputs"][0]["data"] == [2, 4]

    # three slow requests in flight, then one that crashes the worker: all four fail
    slow = [asyncio.create_task(c.infer("crashy", crashy(SLOW))) for _ in range(3)]
    await asyncio.sleep(0.4)
    crashed = [await c.infer("crashy", crashy(SEGFAULT)), *[await t for t in slow]]
    for status, body in crashed:
        assert status == 503, body
        assert "model crashy/1" in body["error"], body
        assert "died from signal 11 (SIGSEGV)" in body["error"], body

    # not ready, with the reason, on every readiness route
    status, body = await c.get("/v2/health/ready")
    assert status == 503 and "crashy: restarting" in body["error"], body
    assert "SIGSEGV" in body["error"] and "restarting in 0.5 s" in body["error"], body
    status, body = await c.get("/v2/models/crashy/ready")
    assert status == 503 and "SIGSEGV" in body["error"], body

    await c.until_ready("crashy")
    _, meta = await c.get("/v2/models/crashy")
    assert meta["parameters"]["runtime_detail"] != first_worker  # a new process
    assert (await c.infer("crashy", crashy(3)))[1]["outputs"][0]["data"] == [6]

    # crashes that follow soon after wait longer each time, up to the cap
    for value, signal_text, delay in (
        (ABORT, "died from signal 6 (SIGABRT)", "1 s"),
        (
            KILLED,
            "died from signal 9 (SIGKILL: killed, e.g. by the kernel's out-of-memory",
            "1 s",
        ),
    ):
        status, body = await c.infer("crashy", crashy(value))
        assert status == 503 and signal_text in body["error"], body
        status, body = await c.get("/v2/models/crashy/ready")
        assert status == 503 and f"restarting in {delay}" in body["error"], body
        await c.until_ready("crashy")

    # a hang is a crash too: the request times out, the worker is killed and restarted
    assert (await c.infer("hangs", crashy(1)))[0] == 200
    hung_worker = (await c.get("/v2/models/hangs"))[1]["parameters"]["runtime_detail"]
    status, body = await c.infer("hangs", crashy(HANG))
    assert status == 504, body
    deadline = time.monotonic() + 60
    while (await c.get("/v2/models/hangs"))[1]["parameters"].get("runtime_detail") == hung_worker:
        assert time.monotonic() < deadline, "the hung worker was not replaced"
        await asyncio.sleep(0.05)
    await c.until_ready("hangs")
    assert (await c.infer("hangs", crashy(1)))[0] == 200
