"""The per-model circuit breaker over real HTTP, with time driven by the test (the router's
injectable clock), never by sleeping."""

from __future__ import annotations

from typing import Any

from appliance.api.http import ROUTER
from tests.engine.test_routing import X, metric
from tests.support.flaky import FlakyBackend

BAD = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [-1, 2]}]}
BREAKER = {"enabled": True, "error_rate": 0.5, "window_s": 10.0, "min_requests": 10,
           "open_s": 30.0, "half_open_probes": 2}  # fmt: skip


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def start(serve: Any, flaky: Any, **breaker: Any) -> tuple[Any, Clock]:
    config = {
        "models": {"det": {"breaker": {**BREAKER, **breaker}}},
        "tasks": {"detect": {"variants": [{"model": "det"}], "fallback": "det-small"}},
    }
    client = await serve(config, flaky("det", "det-small"))
    clock = Clock()
    client.app[ROUTER].clock = clock
    return client, clock


async def send(client: Any, body: dict[str, Any], n: int, status: int) -> None:
    for _ in range(n):
        r = await client.post("/v2/models/det/infer", json=body)
        assert r.status == status, await r.text()


async def state(client: Any) -> float:
    return await metric(client, "appliance_breaker_state", model="det")


async def test_opens_at_the_error_rate_then_half_opens_and_closes(serve, flaky):
    client, clock = await start(serve, flaky)
    await send(client, X, 6, 200)
    await send(client, BAD, 5, 500)  # 5 of 11 failed: under one half
    assert await state(client) == 0
    await send(client, BAD, 1, 500)  # 6 of 12: the rate is reached
    assert await state(client) == 1
    assert await metric(client, "appliance_breaker_opened_total", model="det") == 1

    calls = FlakyBackend.calls["det"]
    r = await client.post("/v2/models/det/infer", json=X)
    error = (await r.json())["error"]
    assert r.status == 503 and r.headers["Retry-After"] == "30"
    assert "circuit breaker opened after 6 of 12 requests failed" in error
    r = await client.post("/v2/models/detect/infer", json=X)  # the task: its fallback answers
    assert r.status == 200 and (await r.json())["model_name"] == "det-small"
    labels = {"task": "detect", "model": "det", "reason": "breaker_open"}
    assert await metric(client, "appliance_task_fallbacks_total", **labels) == 1
    assert FlakyBackend.calls["det"] == calls  # an open breaker keeps requests off the model

    clock.now += 29
    await send(client, X, 1, 503)
    clock.now += 1.5  # half-open: a failing probe opens it again at once
    await send(client, BAD, 1, 500)
    assert await state(client) == 1
    assert await metric(client, "appliance_breaker_opened_total", model="det") == 2
    await send(client, X, 1, 503)

    clock.now += 31  # half-open again: two good probes close it
    await send(client, X, 1, 200)
    assert await state(client) == 2
    await send(client, X, 1, 200)
    assert await state(client) == 0
    await send(client, BAD, 9, 500)  # a fresh window: 9 failures are under min_requests
    assert await state(client) == 0


async def test_failures_leave_the_window_and_client_errors_never_count(serve, flaky):
    client, clock = await start(serve, flaky)
    wrong = {"inputs": [{"name": "x", "datatype": "INT32", "shape": [1], "data": [1]}]}
    await send(client, wrong, 30, 400)
    assert await state(client) == 0
    await send(client, BAD, 9, 500)
    clock.now += 11  # those nine are older than the window now
    await send(client, BAD, 9, 500)
    assert await state(client) == 0
    await send(client, BAD, 1, 500)  # ten in the window, all failed
    assert await state(client) == 1


async def test_probes_are_limited_while_half_open(serve, flaky):
    client, clock = await start(serve, flaky, half_open_probes=1, min_requests=2)
    await send(client, BAD, 2, 500)
    clock.now += 30
    breaker = client.app[ROUTER]._breakers["det"]
    assert breaker.admit() is True  # one probe out (as if still running)
    r = await client.post("/v2/models/det/infer", json=X)
    assert r.status == 503 and "probe" in (await r.json())["error"]
    breaker.record(True, True)
    await send(client, X, 1, 200)
    assert await state(client) == 0
