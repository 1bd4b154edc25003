"""The plain model's inline path (Router.infer_now -> Engine.infer_now -> ModelRunner.run_now):
the same answers, counts and version switches as the path through the workers. Real HTTP, real
onnxruntime (the sample model is fast enough to run inline once measured)."""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from appliance.registry import Registry

INFER = "/v2/models/sample/infer"
OK = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4],
                  "data": [5.1, 3.5, 1.4, 0.2]}]}  # fmt: skip
LOAD = "/v2/repository/models/sample/load"
#: A generous budget keeps the inline decision deterministic on a busy machine.
INLINE = {"models": {"sample": {"inline_max_us": 100_000}}}
#: The runs measured on the workers before a model may run inline (scheduler._LEARN_RUNS).
LEARN = 16


async def _metric(client: Any, name: str, **labels: str) -> float:
    text = await (await client.get("/metrics")).text()
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


async def _versions(client: Any, n: int) -> list[str]:
    out = []
    for _ in range(n):
        r = await client.post(INFER, json=OK)
        assert r.status == 200, await r.text()
        out.append((await r.json())["model_version"])
    return out


async def test_inline_requests_count_in_the_queue_and_batch_histograms(serve):
    client = await serve(INLINE)
    assert await _versions(client, LEARN + 10) == ["1"] * (LEARN + 10)
    v1 = {"model": "sample", "version": "1"}
    assert await _metric(client, "appliance_inference_inline_requests_total", **v1) == 10
    # every request waited (0 s when inline) and ran in a batch (of 1 when inline)
    assert await _metric(client, "appliance_inference_queue_seconds_count", **v1) == LEARN + 10
    queued_0 = await _metric(client, "appliance_inference_queue_seconds_bucket", le="5e-05", **v1)
    assert queued_0 >= 10
    assert await _metric(client, "appliance_batch_size_count", **v1) == LEARN + 10
    assert await _metric(client, "appliance_batch_size_sum", **v1) == LEARN + 10
    assert await _metric(client, "appliance_batch_size_bucket", le="1.0", **v1) == LEARN + 10
    assert await _metric(client, "appliance_inference_compute_seconds_count", **v1) == LEARN + 10
    assert await _metric(client, "appliance_inference_request_seconds_count", **v1) == LEARN + 10
    ok = await _metric(client, "appliance_inference_requests_total", outcome="success", **v1)
    assert ok == LEARN + 10
    # read twice: the inline requests are added once
    assert await _metric(client, "appliance_batch_size_count", **v1) == LEARN + 10


async def test_a_refused_request_on_the_inline_path_is_answered_and_counted_once(serve):
    client = await serve(INLINE)
    await _versions(client, LEARN + 2)
    bad_shape = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3],
                             "data": [1, 2, 3]}]}  # fmt: skip
    r = await client.post(INFER, json=bad_shape)
    assert r.status == 400
    assert "input 'input': shape [1, 3] does not match" in (await r.json())["error"]
    wrong = {"inputs": [{"name": "nope", "datatype": "FP32", "shape": [1, 4], "data": [1] * 4}]}
    r = await client.post(INFER, json=wrong)
    assert r.status == 400 and "unknown input 'nope'" in (await r.json())["error"]
    assert await _versions(client, 3) == ["1"] * 3  # still inline, still serving
    v1 = {"model": "sample", "version": "1"}
    assert await _metric(client, "appliance_inference_requests_total", outcome="invalid", **v1) == 2
    ok = await _metric(client, "appliance_inference_requests_total", outcome="success", **v1)
    assert ok == LEARN + 5
    assert await _metric(client, "appliance_inference_inline_requests_total", **v1) == 5


async def test_a_version_activated_while_v1_runs_inline_answers_the_next_request(
    serve, store: Registry, samples
):
    store.add("sample", samples / "sample.onnx", version="2", activate=False)
    client = await serve(INLINE)
    await _versions(client, LEARN + 4)
    assert await _metric(client, "appliance_inference_inline_requests_total", version="1") == 4
    r = await client.post(LOAD, json={"parameters": {"version": "2"}})
    assert r.status == 200, await r.text()
    # the very next request: version 2 (measured on its workers first, then inline too)
    assert await _versions(client, LEARN + 3) == ["2"] * (LEARN + 3)
    assert await _metric(client, "appliance_inference_inline_requests_total", version="2") == 3
    r = await client.post(LOAD, json={"parameters": {"version": "1"}})
    assert r.status == 200, await r.text()
    assert await _versions(client, 1) == ["1"]  # back to version 1: a new load, on the workers
    r = await client.post("/v2/repository/models/sample/unload")
    assert r.status == 200, await r.text()
    r = await client.post(INFER, json=OK)
    assert r.status == 404 and "unknown model 'sample'" in (await r.json())["error"]


async def test_a_task_over_a_model_that_runs_inline_is_still_routed_as_a_task(serve):
    """The inline path is for a plain model only: a task's name takes the router's path (its
    variant drawn, its answer saying which task and whether the fallback answered)."""
    client = await serve({**INLINE, "tasks": {"classify": {"variants": [{"model": "sample"}]}}})
    await _versions(client, LEARN + 2)  # the model itself: inline by now
    r = await client.post("/v2/models/classify/infer", json=OK)
    assert r.status == 200, await r.text()
    assert r.headers["X-Task"] == "classify" and r.headers["X-Fallback"] == "false"
    out = await r.json()
    assert out["model_name"] == "sample"
    assert out["parameters"] == {"task": "classify", "fallback": False}
    routed = await _metric(client, "appliance_task_requests_total", task="classify",
                           route="variant", outcome="success")  # fmt: skip
    assert routed == 1
