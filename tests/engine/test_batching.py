"""Dynamic batching through real HTTP (and MQTT), with onnxruntime and the gated backend.

To make merging deterministic, the model's only worker is held busy by a job the test releases
(`_hold`): requests sent meanwhile queue up, and the worker takes them as one batch. Counts come
from /metrics (`appliance_batch_size`), never from timers.
"""

from __future__ import annotations

import asyncio
import re
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import orjson
import pytest
from onnx import TensorProto, helper

from appliance.api.http import ENGINE
from appliance.engine import ModelSource
from appliance.engine.scheduler import ModelRunner
from appliance.registry import Registry
from tests.api.test_mqtt import DEVICE, mqtt_settings, online, peers  # noqa: F401
from tests.support.gated import BatchingGatedBackend, GatedBackend
from tests.support.mosquitto import mosquitto_factory_fixture, mosquitto_fixture  # noqa: F401

TIMEOUT = 20.0


def _sample_req(rows: np.ndarray[Any, Any], outputs: list[str] | None = None) -> dict[str, Any]:
    req: dict[str, Any] = {
        "inputs": [
            {
                "name": "input",
                "datatype": "FP32",
                "shape": list(rows.shape),
                "data": rows.ravel().tolist(),
            }
        ]
    }
    if outputs is not None:
        req["outputs"] = [{"name": n} for n in outputs]
    return req


def _x(rows: list[list[float]]) -> dict[str, Any]:
    a = np.asarray(rows, dtype=np.float32)
    return {
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": list(a.shape), "data": a.ravel().tolist()}
        ]
    }


async def _hold(client: Any, name: str) -> tuple[ModelRunner, threading.Event, asyncio.Future[Any]]:
    """Keep the model's worker busy until the returned event is set."""
    runner = client.server.app[ENGINE].ready_model(name).runner
    entered, release = threading.Event(), threading.Event()

    def block(backend: Any, cancelled: Any) -> None:
        entered.set()
        release.wait(TIMEOUT)

    task = asyncio.ensure_future(runner.call(block, 60))
    assert await asyncio.to_thread(entered.wait, TIMEOUT), "the holding job never ran"
    return runner, release, task


async def _queued(runner: ModelRunner, n: int) -> None:
    """Wait until `n` requests (the holding job included) are admitted."""
    for _ in range(int(TIMEOUT / 0.005)):
        if runner.pending >= n:
            return
        await asyncio.sleep(0.005)
    pytest.fail(f"only {runner.pending} of {n} requests queued")


async def _batches(client: Any, model: str) -> tuple[float, float, dict[str, float]]:
    """(runtime calls, requests in them, cumulative buckets) of appliance_batch_size."""
    text = await (await client.get("/metrics")).text()
    lab = f'model="{model}",version="1"'
    count = re.search(rf"appliance_batch_size_count\{{{lab}\}} (\S+)", text)
    total = re.search(rf"appliance_batch_size_sum\{{{lab}\}} (\S+)", text)
    assert count is not None and total is not None, text
    buckets = {
        le: float(v)
        for le, v in re.findall(rf'appliance_batch_size_bucket\{{le="([^"]+)",{lab}\}} (\S+)', text)
    }
    return float(count.group(1)), float(total.group(1)), buckets


def _post(client: Any, model: str, req: dict[str, Any], **headers: str) -> asyncio.Future[Any]:
    fut: asyncio.Future[Any] = asyncio.ensure_future(
        client.post(f"/v2/models/{model}/infer", json=req, headers=headers)
    )
    return fut


@pytest.fixture
def gated_batch(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[list[ModelSource]]:
    from appliance import backends
    from appliance.manifest import Manifest

    monkeypatch.setitem(
        backends._BACKENDS, "gated_batch", "tests.support.gated:BatchingGatedBackend"
    )
    B = BatchingGatedBackend
    B.gate, B.started, B.runs, B.delay, B.calls = (
        threading.Event(),
        threading.Semaphore(0),
        0,
        0.0,
        [],
    )
    f = tmp_path / "gated.bin"
    f.write_bytes(b"")
    manifest = Manifest("gb", "1", "gated_batch", f.name, "", 0, B.signature_2d, "", "test")
    yield [ModelSource(manifest, f, verify=False)]
    B.gate.set()


def _onnx_model(path: Path, make: Any) -> Path:
    model = helper.make_model(make(), opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    path.write_bytes(model.SerializeToString())
    return path


# -- merging and splitting on the real runtime ---------------------------------------------------
async def test_mixed_batch_sizes_merge_and_split_like_unbatched_runs(serve, samples):
    client = await serve()
    rng = np.random.default_rng(3)
    requests = [rng.standard_normal((n, 4)).astype(np.float32) for n in (1, 3, 2, 1)]
    runner, release, hold = await _hold(client, "sample")
    futs = [_post(client, "sample", _sample_req(a)) for a in requests]
    await _queued(runner, 1 + len(requests))
    release.set()
    await hold
    session = ort.InferenceSession(str(samples / "sample.onnx"), providers=["CPUExecutionProvider"])
    for a, fut in zip(requests, futs, strict=True):
        r = await fut
        assert r.status == 200
        out = {o["name"]: o for o in (await r.json())["outputs"]}
        probs, label = session.run(None, {"input": a})  # the same request run alone
        assert out["probabilities"]["shape"] == list(probs.shape)
        np.testing.assert_allclose(out["probabilities"]["data"], probs.ravel(), rtol=1e-5)
        assert out["label"]["data"] == label.tolist()
    count, total, buckets = await _batches(client, "sample")
    assert (count, total) == (1.0, 4.0)  # one runtime call answered the four requests
    assert buckets["2.0"] == 0 and buckets["4.0"] == 1


async def test_different_outputs_or_trailing_dims_run_in_separate_batches(serve, gated_batch):
    client = await serve({}, gated_batch)
    BatchingGatedBackend.gate.set()
    runner, release, hold = await _hold(client, "gb")
    futs = [
        _post(client, "gb", _x([[1, 2]])),
        _post(client, "gb", _x([[3, 4, 5]])),  # 3 columns: cannot join the 2-column ones
        _post(client, "gb", _x([[6, 7], [8, 9]])),
        _post(client, "gb", {**_x([[1, 1]]), "outputs": [{"name": "y"}]}),  # asks for outputs
    ]
    await _queued(runner, 5)
    release.set()
    await hold
    answers = [await (await f).json() for f in futs]
    assert [a["outputs"][0]["data"] for a in answers] == [
        [2.0, 4.0], [6.0, 8.0, 10.0], [12.0, 14.0, 16.0, 18.0], [2.0, 2.0],
    ]  # fmt: skip
    assert [a["outputs"][0]["shape"] for a in answers] == [[1, 2], [1, 3], [2, 2], [1, 2]]
    assert BatchingGatedBackend.calls == [3, 1, 1]  # rows: requests 1+3 together, then 2, then 4
    assert (await _batches(client, "gb"))[:2] == (3.0, 4.0)


async def test_max_batch_size_counts_rows(serve, gated_batch):
    client = await serve({"models": {"gb": {"batching": {"max_batch_size": 4}}}}, gated_batch)
    BatchingGatedBackend.gate.set()
    runner, release, hold = await _hold(client, "gb")
    rows = [1, 2, 2, 3, 1, 5]
    futs = [_post(client, "gb", _x([[float(i)]] * n)) for i, n in enumerate(rows)]
    await _queued(runner, 1 + len(rows))
    release.set()
    await hold
    for i, (n, f) in enumerate(zip(rows, futs, strict=True)):
        assert (await (await f).json())["outputs"][0]["data"] == [2.0 * i] * n
    # 1+2 (the next 2 would make 5), 2 (the 3 would make 5), 3+1, and 5 alone
    assert BatchingGatedBackend.calls == [3, 2, 4, 5]


async def test_one_rejected_member_does_not_fail_the_others(serve, gated_batch):
    client = await serve({}, gated_batch)
    BatchingGatedBackend.gate.set()
    runner, release, hold = await _hold(client, "gb")
    futs = [_post(client, "gb", _x([[v]])) for v in (1.0, 13.0, 2.0)]
    await _queued(runner, 4)
    release.set()
    await hold
    responses = [await f for f in futs]
    assert [r.status for r in responses] == [200, 400, 200]
    assert "13 is unlucky" in (await responses[1].json())["error"]
    assert (await responses[2].json())["outputs"][0]["data"] == [4.0]
    # the batch of three failed, then each member ran alone
    assert BatchingGatedBackend.calls == [3, 1, 1, 1]


# -- deadlines -------------------------------------------------------------------------------------
async def test_each_member_keeps_its_own_deadline(serve, gated_batch):
    client = await serve({}, gated_batch)
    _, release, hold = await _hold(client, "gb")
    patient = _post(client, "gb", _x([[1.0]]))
    hasty = _post(client, "gb", _x([[2.0]]), **{"X-Request-Timeout-Ms": "50"})
    also = _post(client, "gb", _x([[3.0]]))
    r = await hasty  # times out in the queue while the worker is held
    assert r.status == 504 and "in the queue" in (await r.json())["error"]
    BatchingGatedBackend.gate.set()
    release.set()
    await hold
    assert [(await f).status for f in (patient, also)] == [200, 200]
    assert BatchingGatedBackend.calls == [2]  # the expired member never reached the runtime


async def test_a_timeout_shorter_than_the_measured_run_time_is_refused_or_dropped(
    serve, gated_batch
):
    client = await serve({}, gated_batch)
    B = BatchingGatedBackend
    B.gate.set()
    B.delay = 0.3  # every run takes at least 300 ms, so the estimate is at least that
    assert (await _post(client, "gb", _x([[1.0]]))).status == 200
    # at admission: 100 ms cannot be met, 504 at once without queueing
    r = await _post(client, "gb", _x([[1.0]]), **{"X-Request-Timeout-Ms": "100"})
    assert r.status == 504 and "not queued" in (await r.json())["error"]
    # while queued: 1 s was enough when sent, not once it waited 750 ms behind other work
    runner, release, hold = await _hold(client, "gb")
    late = _post(client, "gb", _x([[1.0]]), **{"X-Request-Timeout-Ms": "1000"})
    await _queued(runner, 2)
    await asyncio.sleep(0.75)  # admitted before this, so at most 250 ms are left after it
    release.set()
    await hold
    r = await late
    assert r.status == 504  # dropped by the worker (or, on a slow machine, by its timer)
    assert B.calls == [1]
    # Triton's `timeout` parameter and the header: the shorter one counts
    r = await _post(client, "gb", {**_x([[1.0]]), "parameters": {"timeout": 100_000}},
                    **{"X-Request-Timeout-Ms": "5000"})  # fmt: skip
    assert r.status == 504
    assert "not queued" in (await r.json())["error"]
    for bad in ("0", "-5", "soon", "nan", "inf"):
        r = await _post(client, "gb", _x([[1.0]]), **{"X-Request-Timeout-Ms": bad})
        assert r.status == 400 and "X-Request-Timeout-Ms" in (await r.json())["error"]
    # A figure nothing refreshed for a while is not trusted: the next request runs and measures
    # again (otherwise clients with short timeouts could be refused for ever).
    runner._ran_at -= 60  # as if the model last ran a minute ago
    r = await _post(client, "gb", _x([[1.0]]), **{"X-Request-Timeout-Ms": "100"})
    assert r.status == 504 and "while running" in (await r.json())["error"]
    assert B.runs == 2  # it reached the runtime (counted as a run starts)


# -- policies -------------------------------------------------------------------------------------
async def test_a_lone_request_is_never_held(serve, gated_batch):
    client = await serve({}, gated_batch)
    BatchingGatedBackend.gate.set()
    for i in range(3):  # nothing else ever queues: each runs at once, alone
        r = await _post(client, "gb", _x([[float(i)]]))
        assert r.status == 200
    count, total, buckets = await _batches(client, "gb")
    assert (count, total, buckets["1.0"]) == (3.0, 3.0, 3.0)


async def test_a_configured_queue_delay_waits_for_the_preferred_size(serve, gated_batch):
    # the wait ends when the preferred size is reached, long before the (huge) delay
    cfg = {"batching": {"max_queue_delay_us": 60e6, "preferred_batch_sizes": [3]}}
    client = await serve({"models": {"gb": cfg}}, gated_batch)
    BatchingGatedBackend.gate.set()
    first = _post(client, "gb", _x([[1.0]]))
    await _queued(client.server.app[ENGINE].ready_model("gb").runner, 1)
    rest = [_post(client, "gb", _x([[2.0], [3.0]]))]
    assert [(await f).status for f in [first, *rest]] == [200, 200]
    assert BatchingGatedBackend.calls == [3]


async def test_batching_off_by_config_and_for_a_gated_backend(serve, gated_batch, gated):
    client = await serve(
        {"models": {"gb": {"batching": {"enabled": False}}}}, [*gated_batch, *gated]
    )
    engine = client.server.app[ENGINE]
    assert engine.ready_model("gb").runner.batching is None
    assert engine.ready_model("gated").runner.batching is None  # its backend cannot batch
    BatchingGatedBackend.gate.set()
    runner, release, hold = await _hold(client, "gb")
    futs = [_post(client, "gb", _x([[1.0]])) for _ in range(3)]
    await _queued(runner, 4)
    release.set()
    await hold
    assert [(await f).status for f in futs] == [200] * 3
    assert BatchingGatedBackend.calls == [1, 1, 1]


def _fixed_batch() -> onnx.GraphProto:
    return helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
    )  # fmt: skip


def _flattening() -> onnx.GraphProto:
    """Declares a dynamic first output dimension, but flattens the batch into it."""
    return helper.make_graph(
        [helper.make_node("Reshape", ["x", "flat"], ["y"])], "flatten",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])],
        initializer=[helper.make_tensor("flat", TensorProto.INT64, [1], [-1])],
    )  # fmt: skip


async def test_models_that_cannot_batch_run_unbatched(serve, tmp_path, caplog):
    registry = Registry(tmp_path / "store2")
    registry.add("fixed", _onnx_model(tmp_path / "fixed.onnx", _fixed_batch))
    registry.add("flatten", _onnx_model(tmp_path / "flatten.onnx", _flattening))
    from appliance.server import sources_from_store

    client = await serve({}, sources_from_store(registry.root))
    engine = client.server.app[ENGINE]
    assert engine.ready_model("fixed").runner.batching is None  # no dynamic first dimension
    assert engine.ready_model("flatten").runner.batching is not None  # not known until it runs
    runner, release, hold = await _hold(client, "flatten")
    futs = [_post(client, "flatten", {"inputs": [
        {"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [v, v, v]}]}) for v in (1.0, 2.0)
    ]  # fmt: skip
    await _queued(runner, 3)
    release.set()
    await hold
    # the merged output had no batch dimension: batching went off, each request ran alone
    answers = [(await (await f).json())["outputs"][0] for f in futs]
    assert [(a["shape"], a["data"]) for a in answers] == [([3], [1.0] * 3), ([3], [2.0] * 3)]
    assert runner.batching is None
    assert "batching is off" in caplog.text


# -- both protocols share the batches ------------------------------------------------------------
async def test_http_and_mqtt_requests_share_a_batch(mosquitto, serve, peers):  # noqa: F811
    client = await serve(mqtt_settings(mosquitto))
    peer = peers(mosquitto)
    replies = f"replies/{uuid.uuid4().hex}"
    peer.subscribe(replies)
    peer.subscribe(f"appliance/{DEVICE}/status")
    await peer.wait(online(DEVICE))
    rows = np.asarray([[0.5, -1.0, 2.0, 0.25]], dtype=np.float32)
    runner, release, hold = await _hold(client, "sample")
    http = [_post(client, "sample", _sample_req(rows)) for _ in range(2)]
    for i in range(2):
        peer.publish(
            f"appliance/{DEVICE}/infer/sample",
            orjson.dumps(_sample_req(rows)),
            response_topic=replies,
            correlation=b"m%d" % i,
        )
    await _queued(runner, 5)
    release.set()
    await hold
    assert [(await f).status for f in http] == [200, 200]
    for i in range(2):
        assert (await peer.reply(replies, b"m%d" % i)).status == 200
    assert (await _batches(client, "sample"))[:2] == (1.0, 4.0)


def test_gated_backend_stays_unbatchable() -> None:
    assert not GatedBackend.batchable and BatchingGatedBackend.batchable
