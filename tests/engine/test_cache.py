"""The result cache: hits and misses over real HTTP, never across a version switch, bounded in
bytes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from appliance.codec import InferRequest
from appliance.registry import Registry
from appliance.routing.cache import ResultCache, tensor_key
from tests.engine.test_routing import SAMPLE_REQ, X, metric
from tests.support.flaky import FlakyBackend


async def test_hits_and_misses(serve, flaky):
    client = await serve({"models": {"det": {"cache_bytes": 100_000}}}, flaky("det", "plain"))
    path = "/v2/models/det/infer"
    r = await client.post(path, json=X)
    first = await r.json()
    assert "X-Cache" not in r.headers and "parameters" not in first
    r = await client.post(path, json={**X, "id": "again"})
    again = await r.json()
    assert r.headers["X-Cache"] == "hit" and again["parameters"] == {"cached": True}
    assert again["id"] == "again" and again["outputs"] == first["outputs"]
    assert FlakyBackend.calls["det"] == 1
    # Binary output is a way of sending the same answer: still a hit.
    r = await client.post(path, json={**X, "parameters": {"binary_data_output": True}})
    assert r.headers["X-Cache"] == "hit"
    other = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1, 3]}]}
    r = await client.post(path, json=other)
    assert "X-Cache" not in r.headers and (await r.json())["outputs"][0]["data"] == [2.0, 6.0]
    assert FlakyBackend.calls["det"] == 2
    assert await metric(client, "appliance_cache_hits_total", model="det") == 2
    assert await metric(client, "appliance_cache_misses_total", model="det") == 2
    assert await metric(client, "appliance_cache_entries", model="det") == 2
    assert 0 < await metric(client, "appliance_cache_bytes", model="det") <= 100_000
    # A model without cache_bytes is never cached.
    for _ in range(2):
        r = await client.post("/v2/models/plain/infer", json=X)
        assert "X-Cache" not in r.headers
    assert FlakyBackend.calls["plain"] == 2
    # Failures are not cached.
    bad = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [-1]}]}
    for _ in range(2):
        assert (await client.post(path, json=bad)).status == 500
    assert FlakyBackend.calls["det"] == 4


async def test_never_answers_across_a_version_switch(serve, store: Registry, samples: Path):
    store.add("sample", samples / "sample.onnx", version="2", activate=False)
    client = await serve({"models": {"sample": {"cache_bytes": 1 << 20}}})
    path = "/v2/models/sample/infer"
    r = await client.post(path, json=SAMPLE_REQ)
    assert "X-Cache" not in r.headers
    r = await client.post(path, json=SAMPLE_REQ)
    assert r.headers["X-Cache"] == "hit" and (await r.json())["model_version"] == "1"
    load = {"parameters": {"version": "2"}}
    assert (await client.post("/v2/repository/models/sample/load", json=load)).status == 200
    r = await client.post(path, json=SAMPLE_REQ)
    assert "X-Cache" not in r.headers and (await r.json())["model_version"] == "2"
    r = await client.post(path, json=SAMPLE_REQ)
    assert r.headers["X-Cache"] == "hit" and (await r.json())["model_version"] == "2"
    assert await metric(client, "appliance_cache_entries", model="sample") == 1


def test_lru_stays_within_its_byte_budget():
    cache = ResultCache("m", budget=3 * (100 + 256))
    for key in "abc":
        cache.put(key, key, 100)
    assert cache.get("a") == "a"  # now the most recently used
    cache.put("d", "d", 100)
    assert cache.get("b") is None and [cache.get(k) for k in "acd"] == ["a", "c", "d"]
    assert cache.bytes == 3 * 356 and len(cache) == 3
    cache.put("huge", "x", 10_000)  # larger than the whole budget: not kept, evicts nothing
    assert cache.get("huge") is None and len(cache) == 3
    cache.for_version("2")
    assert len(cache) == 0 and cache.bytes == 0


def test_key_covers_what_changes_an_answer():
    def req(data: list[float], shape: list[int], **kw: object) -> InferRequest:
        array = np.array(data, dtype=np.float32).reshape(shape)
        return InferRequest({"x": array}, datatypes={"x": "FP32"}, **kw)  # type: ignore[arg-type]

    base = tensor_key("m", "1", req([1, 2, 3, 4], [4]))
    assert base == tensor_key("m", "1", req([1, 2, 3, 4], [4], parameters={"timeout": 5}))
    assert base == tensor_key(
        "m", "1", req([1, 2, 3, 4], [4], parameters={"device_id": "a"}), frozenset({"device_id"})
    )
    different = [
        tensor_key("m", "2", req([1, 2, 3, 4], [4])),
        tensor_key("n", "1", req([1, 2, 3, 4], [4])),
        tensor_key("m", "1", req([1, 2, 3, 4], [2, 2])),
        tensor_key("m", "1", req([1, 2, 3, 5], [4])),
        tensor_key("m", "1", req([1, 2, 3, 4], [4], outputs={"y": False})),
        tensor_key("m", "1", req([1, 2, 3, 4], [4], parameters={"threshold": 0.5})),
    ]
    assert len({base, *different}) == 1 + len(different)
