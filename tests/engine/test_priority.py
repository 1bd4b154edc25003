"""Priority levels (engine/priority.py) through real HTTP, MQTT and tritonclient, on onnxruntime.

As in test_batching.py, the model's only worker is held busy by a job the test releases
(`_hold`), so what queues meanwhile is deterministic. The order the runtime ran requests in is
read from the loaded backend itself: its `run` is wrapped to note each call's first column
(every request carries its own marker there) before onnxruntime runs it.
"""

from __future__ import annotations

import asyncio
import re
import threading
from typing import Any

import numpy as np
import orjson
import pytest

from appliance.api.http import ENGINE, PATH
from appliance.codec import decode_request
from appliance.config import PriorityConfig, PriorityQueueConfig, load_config
from appliance.engine.priority import Levels
from appliance.errors import ConfigError, InvalidInput, Overloaded
from tests.api.test_mqtt import DEVICE, mqtt_settings, peers  # noqa: F401
from tests.engine.test_batching import _hold, _queued
from tests.support.mosquitto import mosquitto_factory_fixture, mosquitto_fixture  # noqa: F401

TIMEOUT = 20.0


def _req(marker: float, priority: Any = None, **params: Any) -> dict[str, Any]:
    """One row for sample.onnx whose first value names the request."""
    req: dict[str, Any] = {
        "inputs": [
            {"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [marker, 0, 0, 0]}
        ]
    }
    if priority is not None:
        params["priority"] = priority
    if params:
        req["parameters"] = params
    return req


def _post(client: Any, req: dict[str, Any], model: str = "sample") -> asyncio.Future[Any]:
    fut: asyncio.Future[Any] = asyncio.ensure_future(
        client.post(f"/v2/models/{model}/infer", json=req)
    )
    return fut


def _levels(levels: int = 3, default: int = 0, **model: Any) -> dict[str, Any]:
    """The sample model with priority levels. No urgent worker unless asked for: the tests of
    the queue's order hold its one usual worker and watch what it takes next."""
    queues = model.pop("queues", [])
    priority = {
        "levels": levels,
        "default_level": default,
        "queues": queues,
        "urgent_workers": model.pop("urgent_workers", 0),
    }
    return {
        "models": {"sample": {"max_concurrency": 1, "max_queue": 8, "priority": priority, **model}}
    }


def _record(
    client: Any, model: str = "sample", gate: threading.Event | None = None
) -> list[list[float]]:
    """The markers of every runtime call the model makes from now on, in order (each call
    waits for `gate`, if given, before onnxruntime runs it)."""
    backend = client.server.app[ENGINE].ready_model(model).backend
    calls: list[list[float]] = []
    real = backend.run

    def run(inputs: dict[str, np.ndarray[Any, Any]], outputs: list[str] | None) -> Any:
        calls.append(inputs["input"][:, 0].tolist())
        if gate is not None:
            assert gate.wait(TIMEOUT), "the test never opened the gate"
        return real(inputs, outputs)

    backend.run = run
    return calls


async def _metric(client: Any, name: str, **labels: str) -> float:
    text = await (await client.get("/metrics")).text()
    for line in text.splitlines():
        m = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            return float(m.group(2))
    return 0.0


async def _until_metric(client: Any, name: str, value: float, **labels: str) -> None:
    for _ in range(int(TIMEOUT / 0.01)):
        if await _metric(client, name, **labels) >= value:
            return
        await asyncio.sleep(0.01)
    pytest.fail(f"{name}{labels} never reached {value}")


# -- order ---------------------------------------------------------------------------------------
async def test_a_higher_level_queued_later_runs_first_and_levels_batch_apart(serve):
    client = await serve(_levels())
    runner, release, hold = await _hold(client, "sample")
    calls = _record(client)
    low = [_post(client, _req(30 + i, priority=3)) for i in range(3)]
    await _queued(runner, 4)
    mid = _post(client, _req(20, priority=2))
    await _queued(runner, 5)
    high = _post(client, _req(10, priority=1))
    await _queued(runner, 6)
    for level, n in (("1", 1), ("2", 1), ("3", 3)):
        assert await _metric(client, "appliance_priority_queued", level=level) == n
    release.set()
    await hold
    for fut in [*low, mid, high]:
        r = await fut
        assert r.status == 200, await r.text()
    # each level in its own run, highest first; the three lows still merged into one batch
    assert calls == [[10.0], [20.0], [30.0, 31.0, 32.0]]


async def test_without_levels_the_queue_keeps_arrival_order(serve):
    client = await serve({"models": {"sample": {"max_concurrency": 1}}})
    runner, release, hold = await _hold(client, "sample")
    calls = _record(client)
    futs = [_post(client, _req(30, priority=3))]
    await _queued(runner, 2)
    futs.append(_post(client, _req(10, priority=1)))  # a priority the model does not have
    await _queued(runner, 3)
    release.set()
    await hold
    assert [(await f).status for f in futs] == [200, 200]
    assert calls == [[30.0, 10.0]]  # one batch, in arrival order
    text = await (await client.get("/metrics")).text()
    assert "appliance_priority_" not in text  # one level: no per-level series


async def test_a_levels_max_batch_size_cuts_its_batches(serve):
    client = await serve(_levels(queues=[{"level": 3, "max_batch_size": 2}]))
    runner, release, hold = await _hold(client, "sample")
    calls = _record(client)
    futs = [_post(client, _req(30 + i, priority=3)) for i in range(5)]
    await _queued(runner, 6)
    futs.append(_post(client, _req(20 + 0, priority=2)))
    futs.append(_post(client, _req(21, priority=2)))
    await _queued(runner, 8)
    release.set()
    await hold
    assert [(await f).status for f in futs] == [200] * 7
    assert calls == [[20.0, 21.0], [30.0, 31.0], [32.0, 33.0], [34.0]]


# -- a full queue: eviction and refusal ------------------------------------------------------------
async def test_a_full_queue_evicts_its_newest_lowest_request_for_a_higher_one(serve):
    client = await serve(_levels(max_queue=3))
    runner, release, hold = await _hold(client, "sample")
    calls = _record(client)
    low = [_post(client, _req(30, priority=3))]
    await _queued(runner, 2)
    low.append(_post(client, _req(31, priority=3)))
    await _queued(runner, 3)
    mid = _post(client, _req(20, priority=2))
    await _queued(runner, 4)  # full: 1 running + 3 queued
    high = _post(client, _req(10, priority=1))
    evicted = await low[1]  # answered at once, while the worker is still held
    assert evicted.status == 503
    assert evicted.headers["Retry-After"] == "1"
    assert "evicted from the queue for one of level 1" in (await evicted.json())["error"]
    top = _post(client, _req(11, priority=1))
    evicted = await low[0]  # then the older low: still the lowest level
    assert evicted.status == 503
    release.set()
    await hold
    assert [(await f).status for f in (mid, high, top)] == [200, 200, 200]
    assert calls == [[10.0, 11.0], [20.0]]
    assert await _metric(client, "appliance_priority_evicted_total", level="3") == 2
    assert await _metric(client, "appliance_priority_evicted_total", level="1") == 0
    assert (
        await _metric(
            client, "appliance_inference_requests_total", model="sample", outcome="overloaded"
        )
        == 2
    )


async def test_the_lowest_level_at_a_full_queue_is_refused_at_once(serve):
    client = await serve(_levels(max_queue=2))
    runner, release, hold = await _hold(client, "sample")
    queued = [_post(client, _req(30 + i, priority=3)) for i in range(2)]
    await _queued(runner, 3)
    for req in (_req(40, priority=3), _req(41), _req(42, priority=9)):  # level 3, default, too low
        r = await client.post("/v2/models/sample/infer", json=req)
        assert r.status == 503
        assert r.headers["Retry-After"] == "1"
        assert "none of them below priority level 3" in (await r.json())["error"]
    assert await _metric(client, "appliance_priority_refused_total", level="3") == 3
    # the queue full of level-1 work refuses level 1 too: nothing below it to evict
    release.set()
    await hold
    assert [(await f).status for f in queued] == [200, 200]
    runner, release, hold = await _hold(client, "sample")
    top = [_post(client, _req(10 + i, priority=1)) for i in range(2)]
    await _queued(runner, 3)
    r = await client.post("/v2/models/sample/infer", json=_req(12, priority=1))
    assert r.status == 503
    release.set()
    await hold
    assert [(await f).status for f in top] == [200, 200]


async def test_requests_in_a_running_batch_no_longer_count_as_waiting(serve):
    client = await serve(_levels(max_queue=2))
    runner, release, hold = await _hold(client, "sample")
    gate = threading.Event()
    calls = _record(client, gate=gate)
    first = [_post(client, _req(30 + i, priority=3)) for i in range(2)]
    await _queued(runner, 3)  # full: 1 running, 2 waiting
    release.set()
    await hold
    for _ in range(int(TIMEOUT / 0.005)):  # the two now run as one batch, held at the gate
        if calls:
            break
        await asyncio.sleep(0.005)
    assert calls == [[30.0, 31.0]]
    # 2 admitted and running: 2 more may wait (max_queue), the next is refused
    more = [_post(client, _req(32 + i, priority=3)) for i in range(2)]
    await _queued(runner, 4)
    r = await client.post("/v2/models/sample/infer", json=_req(34, priority=3))
    assert r.status == 503
    gate.set()
    assert [(await f).status for f in (*first, *more)] == [200] * 4


async def test_a_levels_own_max_queue_refuses_that_level_only(serve):
    client = await serve(_levels(queues=[{"level": 3, "max_queue": 1}]))
    runner, release, hold = await _hold(client, "sample")
    first = _post(client, _req(30, priority=3))
    await _queued(runner, 2)
    r = await client.post("/v2/models/sample/infer", json=_req(31, priority=3))
    assert r.status == 503
    assert "priority level 3 has 1 requests waiting, its max_queue" in (await r.json())["error"]
    other = _post(client, _req(20, priority=2))
    await _queued(runner, 3)
    release.set()
    await hold
    assert [(await f).status for f in (first, other)] == [200, 200]
    assert await _metric(client, "appliance_priority_refused_total", level="3") == 1


# -- a level's queue timeout ---------------------------------------------------------------------
async def test_timeout_action_reject_answers_503_while_the_worker_is_busy(serve):
    client = await serve(_levels(queues=[{"level": 3, "timeout_s": 0.05}]))
    runner, release, hold = await _hold(client, "sample")
    r = await client.post("/v2/models/sample/infer", json=_req(30, priority=3))
    assert r.status == 503
    assert r.headers["Retry-After"] == "1"
    assert (
        "waited 0.05 s in the queue, the timeout_s of priority level 3" in (await r.json())["error"]
    )
    assert runner.pending == 1  # its place was freed at once
    kept = _post(client, _req(20, priority=2))  # level 2 has no timeout
    await _queued(runner, 2)
    await asyncio.sleep(0.1)
    assert not kept.done()
    release.set()
    await hold
    assert (await kept).status == 200
    labels = {"level": "3", "action": "reject"}
    assert await _metric(client, "appliance_priority_queue_timeouts_total", **labels) == 1


async def test_timeout_action_delay_moves_a_request_behind_its_level_not_below_it(serve):
    client = await serve(
        _levels(
            batching={"enabled": False},
            queues=[{"level": 2, "timeout_s": 0.05, "timeout_action": "delay"}],
        )
    )
    runner, release, hold = await _hold(client, "sample")
    calls = _record(client)
    late = _post(client, _req(20, priority=2))
    await _until_metric(
        client, "appliance_priority_queue_timeouts_total", 1, level="2", action="delay"
    )
    after = [_post(client, _req(21, priority=2)), _post(client, _req(30, priority=3))]
    await _queued(runner, 4)
    release.set()
    await hold
    assert [(await f).status for f in (late, *after)] == [200] * 3
    # behind the level-2 request that arrived after it, ahead of level 3
    assert calls == [[21.0], [20.0], [30.0]]


async def test_the_requests_own_deadline_still_counts_at_every_level(serve):
    client = await serve(_levels())
    runner, release, hold = await _hold(client, "sample")
    r = await client.post(
        "/v2/models/sample/infer", json=_req(10, priority=1, timeout=50_000)
    )  # Triton's `timeout`, in microseconds
    assert r.status == 504
    assert runner.pending == 1
    release.set()
    await hold


# -- mapping and parsing ------------------------------------------------------------------------
def test_priority_maps_like_triton() -> None:
    levels: Levels[Any] = Levels(PriorityConfig(levels=3, default_level=2))
    assert [levels.level_of(p) for p in (None, 0, 1, 2, 3, 4, 10**9)] == [2, 2, 1, 2, 3, 2, 2]
    lowest: Levels[Any] = Levels(PriorityConfig(levels=4))
    assert lowest.default == 4  # default_level 0: the lowest level
    policies = Levels[Any](
        PriorityConfig(
            levels=2,
            queues=[
                PriorityQueueConfig(level=2, max_queue=5, timeout_s=0.5, timeout_action="delay")
            ],
        )
    ).policies
    assert (policies[0].max_queue, policies[0].timeout_s, policies[0].delay) == (0, 0.0, False)
    assert (policies[1].max_queue, policies[1].timeout_s, policies[1].delay) == (5, 0.5, True)


async def test_requests_land_on_their_mapped_level(serve):
    client = await serve(_levels(default=2))
    for req in (_req(1), _req(2, priority=0), _req(3, priority=7), _req(4, priority=2)):
        assert (await client.post("/v2/models/sample/infer", json=req)).status == 200
    assert (await client.post("/v2/models/sample/infer", json=_req(5, priority=1))).status == 200
    name = "appliance_priority_request_seconds_count"
    assert await _metric(client, name, level="2") == 4
    assert await _metric(client, name, level="1") == 1
    assert await _metric(client, name, level="3") == 0
    assert await _metric(client, "appliance_priority_queued", level="3") == 0


@pytest.mark.parametrize("bad", ["1", -1, 1.5, True, None, [1], {"level": 1}])
def test_a_malformed_priority_is_a_400_naming_the_parameter(bad: Any) -> None:
    body = orjson.dumps(_req(1, **{"priority": bad}))
    if bad is None:
        assert decode_request(body).priority is None  # JSON null: not given
        return
    with pytest.raises(InvalidInput, match=r"^parameters\.priority must be a non-negative"):
        decode_request(body)


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast_path", "aiohttp"])
async def test_both_http_paths_read_the_priority_and_refuse_a_bad_one(serve, fast_path):
    client = await serve({**_levels(), "server": {"fast_path": fast_path}})
    r = await client.post("/v2/models/sample/infer", json=_req(1, priority="high"))
    assert r.status == 400
    assert "parameters.priority" in (await r.json())["error"]
    runner, release, hold = await _hold(client, "sample")
    calls = _record(client)
    low = _post(client, _req(30, priority=3))
    await _queued(runner, 2)
    high = _post(client, _req(10, priority=1))
    await _queued(runner, 3)
    release.set()
    await hold
    assert [(await f).status for f in (low, high)] == [200, 200]
    assert calls == [[10.0], [30.0]]


async def test_mqtt_requests_carry_their_priority(mosquitto, serve, peers):  # noqa: F811
    client = await serve({**mqtt_settings(mosquitto), **_levels()})
    peer = peers(mosquitto)
    replies = await peer.ready()
    topic = f"appliance/{DEVICE}/infer/sample"
    peer.publish(
        topic, orjson.dumps(_req(1, priority=-2)), response_topic=replies, correlation=b"bad"
    )
    reply = await peer.reply(replies, b"bad")
    assert reply.status == 400 and "parameters.priority" in reply.json()["error"]
    runner, release, hold = await _hold(client, "sample")
    calls = _record(client)
    for marker, priority in ((30, 3), (10, 1)):
        peer.publish(
            topic,
            orjson.dumps(_req(marker, priority=priority)),
            response_topic=replies,
            correlation=b"m%d" % marker,
        )
        await _queued(runner, 2 if marker == 30 else 3)
    release.set()
    await hold
    for marker in (30, 10):
        assert (await peer.reply(replies, b"m%d" % marker)).status == 200
    assert calls == [[10.0], [30.0]]


async def test_tritonclient_priority_argument_is_honoured(serve):
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    client = await serve(_levels(max_queue=1))
    url = f"127.0.0.1:{client.server.port}"

    def infer(marker: float, priority: int) -> Any:
        triton = httpclient.InferenceServerClient(url, network_timeout=TIMEOUT)
        try:
            x = httpclient.InferInput("input", [1, 4], "FP32")
            x.set_data_from_numpy(np.array([[marker, 0, 0, 0]], np.float32), binary_data=True)
            try:
                return triton.infer("sample", [x], priority=priority).as_numpy("label")
            except InferenceServerException as exc:
                return exc
        finally:
            triton.close()

    runner, release, hold = await _hold(client, "sample")
    calls = _record(client)
    low = asyncio.ensure_future(asyncio.to_thread(infer, 30, 3))
    await _queued(runner, 2)
    high = asyncio.ensure_future(asyncio.to_thread(infer, 10, 1))
    evicted = await low  # the queue held one: the low made room for the high
    assert isinstance(evicted, InferenceServerException)
    assert evicted.status() == "503" and "evicted" in str(evicted.message())
    await _queued(runner, 2)
    release.set()
    await hold
    assert isinstance(await high, np.ndarray)
    assert calls == [[10.0]]


# -- config -------------------------------------------------------------------------------------
def _two(*queues: Any) -> dict[str, Any]:
    return {"levels": 2, "queues": list(queues)}


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"levels": 0}, "levels = 0: must be between 1 and 16"),
        ({"levels": 17}, "levels = 17: must be between 1 and 16"),
        ({"levels": 3, "default_level": 4}, "default_level = 4: must be between 1 and levels (3)"),
        (_two({"level": 3}), "queues[0].level = 3: must be between 1 and levels (2)"),
        (_two({"max_queue": 3}), "queues[0].level = 0: must be between 1"),
        (_two({"level": 1}, {"level": 1}), "queues[1].level = 1: another queue"),
        (_two({"level": 1, "timeout_action": "drop"}),
         "queues[0].timeout_action = 'drop': must be one of 'reject', 'delay'"),
        (_two({"level": 1, "max_queue": -1}), "queues[0].max_queue = -1: must not be negative"),
        (_two({"level": 1, "wait": 1}), "queues[0].wait: unknown key"),
        ({"levels": 2, "queues": {"level": 1}}, "queues = {'level': 1}: must be a list"),
    ],
)  # fmt: skip
def test_config_errors_name_the_key(table: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, {"models": {"m": {"priority": table}}}, {})
    assert info.value.message.startswith("models.m.priority." + message)


def test_config_from_toml_defaults_and_a_model(tmp_path) -> None:
    path = tmp_path / "appliance.toml"
    path.write_text(
        """
[model_defaults.priority]
levels = 3

[models.detector.priority]
default_level = 2

[[models.detector.priority.queues]]
level = 3
max_queue = 4
timeout_s = 0.25
timeout_action = "delay"
"""
    )
    config = load_config(path, {}, {"APPLIANCE_MODELS__OTHER__PRIORITY__LEVELS": "2"})
    detector = config.model_config("detector").priority
    assert (detector.levels, detector.default_level) == (3, 2)
    assert detector.queues == [PriorityQueueConfig(3, 4, 0.25, "delay")]
    assert config.model_config("other").priority.levels == 2
    assert config.model_config("plain").priority == PriorityConfig(levels=3)


# -- threads: a worker waiting for a batch sees a higher level arrive ------------------------------
class Job:
    """A queued request as engine/priority.py's `Levels` sees it: its level."""

    def __init__(self, level: int) -> None:
        self.level = level


def test_a_batch_wait_ends_when_a_higher_level_arrives() -> None:
    levels: Levels[Job] = Levels(PriorityConfig(levels=2))
    levels.put(Job(2))
    first = levels.take()
    assert first is not None and first.level == 2
    ended = threading.Event()

    def wait() -> None:
        import time

        while levels.wait_more(2, time.perf_counter() + TIMEOUT):
            pass
        ended.set()

    t = threading.Thread(target=wait)
    t.start()
    levels.put(Job(2))  # the same level: the wait goes on
    assert not ended.wait(0.05)
    levels.put(Job(1))
    assert ended.wait(TIMEOUT)
    t.join()
    taken = levels.take()
    assert taken is not None and taken.level == 1


# -- urgent workers: what runs beside a background batch ------------------------------------------
async def test_an_urgent_worker_runs_upper_levels_beside_a_running_background_job(serve):
    client = await serve(_levels(urgent_workers=1))
    runner, release, hold = await _hold(client, "sample")  # level 3 (the default) is running
    calls = _record(client)
    low = _post(client, _req(30, priority=3))
    await _queued(runner, 2)
    # levels 1 and 2 are answered while the level-3 job still holds the usual worker
    for marker, level in ((10.0, 1), (20.0, 2)):
        r = await _post(client, _req(marker, priority=level))
        assert r.status == 200, await r.text()
    assert not hold.done() and not low.done()
    assert await _metric(client, "appliance_priority_queued", level="3") == 1
    assert calls == [[10.0], [20.0]]  # the queued level-3 request was not taken by it
    release.set()
    await hold
    assert (await low).status == 200
    assert calls == [[10.0], [20.0], [30.0]]


async def test_without_thread_safety_there_is_no_urgent_worker(serve):
    client = await serve(_levels(urgent_workers=2))
    runner = client.server.app[ENGINE].ready_model("sample").runner
    assert sum(t.name.startswith("urgent-") for t in runner._threads) == 2
    type(runner.backend).thread_safe = False
    try:
        other = await serve(_levels(urgent_workers=2))
        runner = other.server.app[ENGINE].ready_model("sample").runner
        assert not any(t.name.startswith("urgent-") for t in runner._threads)
    finally:
        del type(runner.backend).thread_safe  # back to the base class's


def test_a_worker_limited_to_upper_levels_is_woken_by_their_requests_only() -> None:
    levels: Levels[Job] = Levels(PriorityConfig(levels=3))
    taken: list[int] = []
    got = threading.Semaphore(0)

    def worker(upto: int) -> None:
        while (job := levels.take(upto)) is not None:
            taken.append(job.level)
            got.release()

    urgent = threading.Thread(target=worker, args=(2,))
    urgent.start()
    levels.put(Job(3))  # the lowest level: only a usual worker takes it
    levels.put(Job(2))
    assert got.acquire(timeout=TIMEOUT)
    assert taken == [2] and levels.queued(3) == 1
    usual = threading.Thread(target=worker, args=(0,))  # and the two wait side by side
    usual.start()
    assert got.acquire(timeout=TIMEOUT)
    assert taken == [2, 3]
    levels.put(Job(3))  # one notify could wake the urgent worker only: every put wakes both
    assert got.acquire(timeout=TIMEOUT)
    levels.put(Job(1))
    assert got.acquire(timeout=TIMEOUT)
    assert sorted(taken) == [1, 2, 3, 3]
    levels.close()
    urgent.join(TIMEOUT)
    usual.join(TIMEOUT)
    assert not urgent.is_alive() and not usual.is_alive()


def test_background_requests_do_not_wake_a_waiting_urgent_worker() -> None:
    """Under a flood every background put used to wake the urgent worker, which then took the
    interpreter lock from the event loop to find nothing; it wakes for its own levels only."""

    levels: Levels[Job] = Levels(PriorityConfig(levels=3))
    taken: list[int] = []
    got = threading.Semaphore(0)

    def urgent() -> None:
        while (job := levels.take(2)) is not None:
            taken.append(job.level)
            got.release()

    t = threading.Thread(target=urgent)
    t.start()
    for _ in range(int(TIMEOUT / 0.001)):  # until it waits
        if levels._picky[1]:
            break
        threading.Event().wait(0.001)
    assert levels._picky[1] == 1
    for _ in range(20):
        levels.put(Job(3))
    assert levels.urgent_wakeups == 0 and levels.queued(3) == 20
    levels.put(Job(2))
    assert got.acquire(timeout=TIMEOUT)
    assert taken == [2] and levels.urgent_wakeups == 1
    levels.close()
    t.join(TIMEOUT)
    assert not t.is_alive()


# -- the priority from the request path: header, user property, a task's default ------------------
async def test_the_header_and_a_tasks_default_set_the_level(serve):
    """X-Request-Priority gives a level to a body without one; a task's `priority` gives one to
    its requests that name none; the body's own parameter wins over both."""
    client = await serve(
        {
            **_levels(),
            "tasks": {"urgent": {"variants": [{"model": "sample"}], "priority": 1}},
        }
    )
    runner, release, hold = await _hold(client, "sample")
    calls = _record(client)
    low = _post(client, _req(30))  # the default level: the lowest
    await _queued(runner, 2)
    by_header = asyncio.ensure_future(
        client.post("/v2/models/sample/infer", json=_req(20), headers={"X-Request-Priority": "2"})
    )
    await _queued(runner, 3)
    by_task = _post(client, _req(10), model="urgent")
    await _queued(runner, 4)
    overridden = _post(client, _req(31, priority=3), model="urgent")  # the body says 3
    await _queued(runner, 5)
    release.set()
    await hold
    for fut in (low, by_header, by_task, overridden):
        r = await fut
        assert r.status == 200, await r.text()
    assert calls == [[10.0], [20.0], [30.0, 31.0]]


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast_path", "aiohttp"])
async def test_a_low_level_named_in_the_header_is_refused_before_its_body(serve, fast_path):
    """At a full queue, a request whose header names the lowest level is refused from its
    head alone (its body is skipped, the connection stays usable); one without a header is
    admitted as if of the highest level, since its body may ask for it."""
    client = await serve({**_levels(max_queue=2), "server": {"fast_path": fast_path}})
    runner, release, hold = await _hold(client, "sample")
    queued = [_post(client, _req(30 + i, priority=3)) for i in range(2)]
    await _queued(runner, 3)
    r = await client.post(
        "/v2/models/sample/infer", data=b"{not even json", headers={"X-Request-Priority": "3"}
    )
    assert r.status == 503 and r.headers["Retry-After"] == "1"
    r = await client.post("/v2/models/sample/infer", data=b"{not even json")
    assert r.status == 400  # admitted, then its body read: malformed
    release.set()
    await hold
    assert [(await f).status for f in queued] == [200, 200]
    assert await _metric(client, "appliance_priority_refused_total", level="3") == 1


async def test_the_heads_admitted_in_one_loop_round_count_against_the_queue(serve):
    """Heads read in one round of the event loop, before any body is decoded, each count as
    queued: only as many as there is room for pass, the rest are refused from their heads (no
    decode to throw away). The count ends with the round, so the bodies that follow are
    queued as usual and a later round finds the real queue."""
    client = await serve(_levels(max_queue=2, queues=[{"level": 2, "max_queue": 1}]))
    runner, release, hold = await _hold(client, "sample")  # running: the queue is empty
    paths = client.server.app[PATH]

    def head(level: str) -> None:
        req = paths.begin("http", "POST", "/v2/models/sample/infer", "infer", priority=level)
        paths.admit(req, "sample")

    head("3")
    head("2")
    with pytest.raises(Overloaded, match="priority level 2 has 1 requests waiting"):
        head("2")  # its level's own max_queue, counting the head before it
    with pytest.raises(Overloaded, match="none of them below priority level 3"):
        head("3")  # the model's queue: two heads admitted fill it
    head("1")  # a level above the lowest is never refused while a lower one may be evicted
    assert await _metric(client, "appliance_priority_refused_total", level="3") == 1
    assert await _metric(client, "appliance_priority_refused_total", level="2") == 1
    # a new round: nothing is queued, the heads of the last one no longer count
    head("3")
    head("3")
    await asyncio.sleep(0)
    queued = [_post(client, _req(30 + i, priority=3)) for i in range(2)]
    await _queued(runner, 3)
    with pytest.raises(Overloaded, match="none of them below priority level 3"):
        head("3")  # now the queue itself is full
    release.set()
    await hold
    assert [(await f).status for f in queued] == [200, 200]


async def test_a_request_queued_in_its_heads_round_counts_once(serve):
    """A head's request queued within the same round (the aiohttp path may read and decode a
    body without yielding) takes its level's head count down: it counts as queued, not twice."""
    client = await serve(_levels(max_queue=3))
    runner, release, hold = await _hold(client, "sample")
    paths = client.server.app[PATH]

    def head() -> None:
        req = paths.begin("http", "POST", "/v2/models/sample/infer", "infer", priority="3")
        paths.admit(req, "sample")

    head()
    head()
    job = runner._submit({}, None, TIMEOUT, 0, lambda backend, cancelled: None, 3)
    head()  # 1 queued + 1 head + this one: the queue's 3
    with pytest.raises(Overloaded):
        head()
    release.set()
    await hold
    await job.future


async def test_mqtt_user_property_sets_the_level(mosquitto, serve, peers):  # noqa: F811
    client = await serve({**mqtt_settings(mosquitto), **_levels()})
    peer = peers(mosquitto)
    replies = await peer.ready()
    topic = f"appliance/{DEVICE}/infer/sample"
    runner, release, hold = await _hold(client, "sample")
    calls = _record(client)
    for marker, level in ((30, "3"), (10, "1")):
        peer.publish(
            topic,
            orjson.dumps(_req(marker)),
            response_topic=replies,
            correlation=b"p%d" % marker,
            user=[("priority", level)],
        )
        await _queued(runner, 2 if marker == 30 else 3)
    release.set()
    await hold
    for marker in (30, 10):
        assert (await peer.reply(replies, b"p%d" % marker)).status == 200
    assert calls == [[10.0], [30.0]]
