"""Bounded queue, concurrency limit, deadlines, and a free event loop, through real HTTP."""

from __future__ import annotations

import asyncio
import threading

import pytest

from tests.support.gated import GatedBackend

REQ = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1, 2]}]}


async def _started(n: int = 1) -> None:
    for _ in range(n):
        ok = await asyncio.to_thread(GatedBackend.started.acquire, True, 10)
        assert ok, "run never started"


async def test_full_queue_is_refused_at_once_with_503(serve, gated):
    client = await serve({"models": {"gated": {"max_concurrency": 1, "max_queue": 2}}}, gated)
    running = asyncio.ensure_future(client.post("/v2/models/gated/infer", json=REQ))
    await _started()
    queued = [
        asyncio.ensure_future(client.post("/v2/models/gated/infer", json=REQ)) for _ in range(2)
    ]
    # Wait until both are admitted (queued) before sending the one that must be refused.
    for _ in range(200):
        text = await (await client.get("/metrics")).text()
        if 'appliance_queue_depth{model="gated",version="1"} 2.0' in text:
            break
        await asyncio.sleep(0.01)
    else:
        pytest.fail("requests never queued")
    r = await client.post("/v2/models/gated/infer", json=REQ)
    assert r.status == 503
    assert r.headers["Retry-After"] == "1"
    assert "at capacity" in (await r.json())["error"]
    GatedBackend.gate.set()
    for fut in [running, *queued]:
        resp = await fut
        assert resp.status == 200
        assert (await resp.json())["outputs"][0]["data"] == [2.0, 4.0]
    text = await (await client.get("/metrics")).text()
    assert (
        'appliance_inference_requests_total{model="gated",outcome="overloaded",version="1"} 1.0'
        in text
    )
    assert (
        'appliance_inference_requests_total{model="gated",outcome="success",version="1"} 3.0'
        in text
    )


async def test_concurrency_limit_runs_that_many_at_once(serve, gated):
    client = await serve({"models": {"gated": {"max_concurrency": 2, "max_queue": 5}}}, gated)
    futs = [
        asyncio.ensure_future(client.post("/v2/models/gated/infer", json=REQ)) for _ in range(4)
    ]
    await _started(2)
    await asyncio.sleep(0.05)
    assert GatedBackend.runs == 2  # the other two wait for a worker
    GatedBackend.gate.set()
    assert [(await f).status for f in futs] == [200] * 4
    assert GatedBackend.runs == 4


async def test_deadline_expires_in_queue_and_the_run_is_skipped(serve, gated):
    client = await serve({"models": {"gated": {"max_concurrency": 1, "timeout_s": 30}}}, gated)
    first = asyncio.ensure_future(client.post("/v2/models/gated/infer", json=REQ))
    await _started()
    # Triton's `timeout` parameter, in microseconds: 50 ms for this one
    r = await client.post("/v2/models/gated/infer", json={**REQ, "parameters": {"timeout": 50_000}})
    assert r.status == 504
    assert "timed out after 0.05 s in the queue" in (await r.json())["error"]
    GatedBackend.gate.set()
    assert (await first).status == 200
    # the expired request never reached the runtime
    r = await client.post("/v2/models/gated/infer", json=REQ)
    assert r.status == 200
    assert GatedBackend.runs == 2


async def test_event_loop_keeps_answering_while_a_model_runs(serve, gated):
    client = await serve({}, gated)
    slow = asyncio.ensure_future(client.post("/v2/models/gated/infer", json=REQ))
    await _started()
    for _ in range(20):  # health, metadata and metrics answer while inference is in progress
        assert (await client.get("/v2/health/live")).status == 200
        assert (await client.get("/v2/models/gated")).status == 200
    assert not slow.done()
    GatedBackend.gate.set()
    assert (await slow).status == 200


async def test_ready_only_after_models_loaded(serve, gated, monkeypatch):
    loading = threading.Event()
    original = GatedBackend.__init__

    def slow_init(self, *a, **k):
        loading.wait(10)
        original(self, *a, **k)

    monkeypatch.setattr(GatedBackend, "__init__", slow_init)
    client = await serve({}, gated, wait=False)
    assert (await client.get("/v2/health/live")).status == 200
    r = await client.get("/v2/health/ready")
    assert r.status == 503 and "gated: loading" in (await r.json())["error"]
    assert (await client.get("/v2/models/gated/ready")).status == 503
    loading.set()
    for _ in range(500):
        if (await client.get("/v2/health/ready")).status == 200:
            break
        await asyncio.sleep(0.01)
    assert (await client.get("/v2/models/gated/ready")).status == 200


def _inline_count(text: str) -> float:
    for line in text.splitlines():
        if line.startswith('appliance_inference_inline_requests_total{model="gated"'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_fast_model_runs_inline_after_measuring_and_leaves_when_slow(serve, gated):
    GatedBackend.gate.set()
    # a generous budget keeps this deterministic on a busy machine
    client = await serve({"models": {"gated": {"inline_max_us": 100_000}}}, gated)

    async def inline_after_one() -> float:
        assert (await client.post("/v2/models/gated/infer", json=REQ)).status == 200
        return _inline_count(await (await client.get("/metrics")).text())

    counts = [await inline_after_one() for _ in range(20)]
    assert counts[15] == 0  # the first 16 runs are measured on the workers
    assert counts[-1] == 4  # then the model runs inline
    GatedBackend.delay = 0.5  # once far slower than the budget: the machine, maybe
    assert await inline_after_one() == 5
    GatedBackend.delay = 0.0
    assert [await inline_after_one() for _ in range(2)] == [6.0, 7.0]  # still inline
    GatedBackend.delay = 0.5  # twice in a row: the model is slow now
    assert [await inline_after_one() for _ in range(2)] == [8.0, 9.0]
    GatedBackend.delay = 0.0
    # back on the workers until 16 runs are measured again
    assert [await inline_after_one() for _ in range(17)] == [9.0] * 16 + [10.0]
    # a larger input than any measured goes to the workers too
    big = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [64], "data": [1.0] * 64}]}
    assert (await client.post("/v2/models/gated/infer", json=big)).status == 200


async def test_inline_off_when_budget_is_zero(serve, gated):
    GatedBackend.gate.set()
    client = await serve({"models": {"gated": {"inline_max_us": 0}}}, gated)
    for _ in range(20):
        assert (await client.post("/v2/models/gated/infer", json=REQ)).status == 200
    assert _inline_count(await (await client.get("/metrics")).text()) == 0
