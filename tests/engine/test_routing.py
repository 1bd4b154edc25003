"""Tasks over real HTTP: weighted A/B splits, sticky keys, fallbacks, retries, and that a task
follows its model through a version switch. Failures come from the flaky test backend
(tests/support/flaky.py), answers from real onnxruntime where the model does not matter."""

from __future__ import annotations

import asyncio
import math
import re
from pathlib import Path
from typing import Any

import pytest

from appliance.api.http import ROUTER
from appliance.config import load_config
from appliance.errors import ConfigError
from appliance.registry import Registry
from tests.support.flaky import FlakyBackend

X = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1, 2]}]}
SAMPLE_REQ = {
    "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [5.1, 3.5, 1.4, 0.2]}]
}


def tasks(**tables: dict[str, Any]) -> dict[str, Any]:
    return {"tasks": tables}


def variants(*pairs: tuple[str, float]) -> list[dict[str, Any]]:
    return [{"model": m, "weight": w} for m, w in pairs]


async def metric(client: Any, name: str, **labels: str) -> float:
    """One sample of /metrics (0 when absent)."""
    text = await (await client.get("/metrics")).text()
    for line in text.splitlines():
        m = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if m is None or m.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(m.group(3))
    return 0.0


def within_binomial(count: int, n: int, p: float, sds: float = 4.0) -> bool:
    """count is within `sds` binomial standard deviations of n*p (a false alarm at 4 sd is
    about 6 in 100,000)."""
    return abs(count - n * p) <= sds * math.sqrt(n * p * (1 - p))


async def post_many(client: Any, path: str, n: int, **kwargs: Any) -> list[Any]:
    out: list[Any] = []
    for start in range(0, n, 50):
        batch = [client.post(path, **kwargs) for _ in range(min(50, n - start))]
        for r in await asyncio.gather(*batch):
            assert r.status == 200, await r.text()
            out.append(r)
    return out


# -- split ------------------------------------------------------------------------------------
async def test_weighted_split_matches_the_weights(serve, flaky):
    client = await serve(
        tasks(detect={"variants": variants(("det-v3", 70), ("det-v4", 30))}),
        flaky("det-v3", "det-v4"),
    )
    n = 2000
    responses = await post_many(client, "/v2/models/detect/infer", n, json=X)
    by_model = {"det-v3": 0, "det-v4": 0}
    for r in responses:
        body = await r.json()
        assert r.headers["X-Model-Name"] == body["model_name"]
        assert r.headers["X-Task"] == "detect" and r.headers["X-Fallback"] == "false"
        assert body["parameters"] == {"task": "detect", "fallback": False}
        assert body["outputs"][0]["data"] == [2.0, 4.0]
        by_model[body["model_name"]] += 1
    assert within_binomial(by_model["det-v4"], n, 0.3), by_model
    for model, count in by_model.items():
        labels = {"task": "detect", "model": model, "route": "variant", "outcome": "success"}
        assert await metric(client, "appliance_task_requests_total", **labels) == count
    assert FlakyBackend.calls == by_model


async def test_sticky_key_keeps_a_device_on_one_variant(serve, flaky):
    client = await serve(
        tasks(detect={"variants": variants(("det-v3", 1), ("det-v4", 1)),
                      "sticky_key": "device_id"}),
        flaky("det-v3", "det-v4"),
    )  # fmt: skip
    path = "/v2/models/detect/infer"
    devices = [f"cam-{i}" for i in range(300)]
    chosen: dict[str, str] = {}
    for device in devices:
        seen = set()
        r = await client.post(path, json=X, headers={"X-Device-Id": device})
        seen.add((await r.json())["model_name"])
        for _ in range(2):  # as a request parameter too: the same key, the same variant
            r = await client.post(path, json={**X, "parameters": {"device_id": device}})
            seen.add((await r.json())["model_name"])
        assert len(seen) == 1, (device, seen)
        chosen[device] = seen.pop()
    on_v4 = sum(1 for m in chosen.values() if m == "det-v4")
    assert within_binomial(on_v4, len(devices), 0.5), on_v4
    r = await client.post(path, json={**X, "parameters": {"device_id": ["x"]}})
    assert r.status == 400 and "sticky key" in (await r.json())["error"]


# -- fallback ---------------------------------------------------------------------------------
async def test_fallback_answers_when_the_primary_raises(serve, flaky):
    task = {"variants": variants(("det-v3", 1)), "fallback": "det-small"}
    client = await serve(tasks(detect=task, bare={"variants": variants(("det-v3", 1))}),
                         flaky("det-v3", "det-small"))  # fmt: skip
    r = await client.post("/v2/models/detect/infer", json=X)
    assert r.status == 200 and r.headers["X-Model-Name"] == "det-v3"
    FlakyBackend.broken.add("det-v3")
    r = await client.post("/v2/models/detect/infer", json=X)
    body = await r.json()
    assert r.status == 200, body
    assert body["model_name"] == "det-small" and body["outputs"][0]["data"] == [2.0, 4.0]
    assert body["parameters"] == {"task": "detect", "fallback": True}
    assert r.headers["X-Model-Name"] == "det-small" and r.headers["X-Fallback"] == "true"
    labels = {"task": "detect", "model": "det-v3", "reason": "error"}
    assert await metric(client, "appliance_task_fallbacks_total", **labels) == 1
    labels = {"task": "detect", "model": "det-small", "route": "fallback", "outcome": "success"}
    assert await metric(client, "appliance_task_requests_total", **labels) == 1
    # No fallback: the runtime's error, as for the model itself.
    r = await client.post("/v2/models/bare/infer", json=X)
    assert r.status == 500 and "broken" in (await r.json())["error"]
    # A client's mistake never goes to the fallback.
    bad = {"inputs": [{"name": "x", "datatype": "INT64", "shape": [1], "data": [1]}]}
    r = await client.post("/v2/models/detect/infer", json=bad)
    assert r.status == 400 and "datatype" in (await r.json())["error"]
    # Both failing: one error naming both.
    FlakyBackend.broken.add("det-small")
    r = await client.post("/v2/models/detect/infer", json=X)
    error = (await r.json())["error"]
    assert r.status == 500 and "'det-v3'" in error and "fallback 'det-small'" in error


async def test_fallback_answers_when_the_primary_is_not_loaded(serve, flaky):
    task = {"variants": [{"model": "det-v3", "version": "7"}], "fallback": "det-small"}
    client = await serve(tasks(detect=task), flaky("det-v3", "det-small"))
    r = await client.post("/v2/models/detect/infer", json=X)  # pinned version 7: not serving
    assert r.status == 200 and (await r.json())["model_name"] == "det-small"
    labels = {"task": "detect", "model": "det-v3", "reason": "not_ready"}
    assert await metric(client, "appliance_task_fallbacks_total", **labels) == 1
    r = await client.post("/v2/models/detect/versions/1/infer", json=X)
    assert r.status == 404 and "is a task" in (await r.json())["error"]


# -- retries ----------------------------------------------------------------------------------
async def test_retries_are_bounded_and_only_for_transient_faults(serve, flaky):
    cfg = {"retries": 2, "retry_backoff_s": 0.001, "retry_backoff_max_s": 0.002}
    client = await serve({"models": {"det": cfg}}, flaky("det"))
    FlakyBackend.fail_next["det"] = 2
    r = await client.post("/v2/models/det/infer", json=X)
    assert r.status == 200, await r.text()
    assert FlakyBackend.calls["det"] == 3
    assert await metric(client, "appliance_inference_retries_total", model="det") == 2
    FlakyBackend.fail_next["det"] = 3  # one more fault than retries: the error comes back
    r = await client.post("/v2/models/det/infer", json=X)
    assert r.status == 500 and "transient" in (await r.json())["error"]
    assert FlakyBackend.calls["det"] == 6
    # 4xx: never run again (here refused before the runtime is reached at all).
    bad = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]}
    r = await client.post("/v2/models/det/infer", json=bad)
    assert r.status == 400
    assert FlakyBackend.calls["det"] == 6
    assert await metric(client, "appliance_inference_retries_total", model="det") == 4


# -- a task follows its model's version switch ------------------------------------------------
async def test_a_task_follows_a_version_switch(serve, store: Registry, samples: Path):
    store.add("sample", samples / "sample.onnx", version="2", activate=False)
    client = await serve(tasks(classify={"variants": variants(("sample", 1))}))
    r = await client.post("/v2/models/classify/infer", json=SAMPLE_REQ)
    assert (await r.json())["model_version"] == "1"
    load = {"parameters": {"version": "2"}}
    r = await client.post("/v2/repository/models/sample/load", json=load)
    assert r.status == 200
    r = await client.post("/v2/models/classify/infer", json=SAMPLE_REQ)
    assert (await r.json())["model_version"] == "2" and r.headers["X-Model-Version"] == "2"
    meta = await (await client.get("/v2/models/classify")).json()
    assert meta["name"] == "classify" and meta["parameters"]["task"]["variants"][0]["model"] == (
        "sample"
    )
    ready = await client.get("/v2/models/classify/ready")
    assert ready.status == 200


async def test_plain_models_report_who_answered(serve):
    client = await serve()
    r = await client.post("/v2/models/sample/infer", json=SAMPLE_REQ)
    assert r.headers["X-Model-Name"] == "sample" and r.headers["X-Model-Version"] == "1"
    assert "X-Task" not in r.headers and "parameters" not in await r.json()


# -- configuration ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"variants": []}, "tasks.t.variants = []: must list at least one"),
        ({"variants": [{"model": "a", "weight": 0}]}, "tasks.t.variants[0].weight = 0.0"),
        ({"variants": [{"model": "a", "wat": 1}]}, "tasks.t.variants[0].wat: unknown key"),
        ({"variants": "a"}, "tasks.t.variants = 'a': must be a list"),
        ({"variants": [{"model": "../a"}]}, "tasks.t.variants[0].model = '../a'"),
        ({"variants": [{"model": "a"}], "sticky_key": "a-b"}, "tasks.t.sticky_key = 'a-b'"),
        ({"variants": [{"model": "a"}], "prompt_template": "{x.y}"}, "prompt_template"),
        ({"variants": [{"model": "a"}], "prompt_template": "{"}, "not a valid template"),
    ],
)
def test_task_config_errors_name_the_key_and_value(table, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, tasks(t=table), {})


def test_breaker_and_retry_config_errors():
    for over, message in [
        ({"breaker": {"error_rate": 1.5}}, "models.m.breaker.error_rate = 1.5"),
        ({"breaker": {"min_requests": 0}}, "models.m.breaker.min_requests = 0"),
        ({"retry_backoff_max_s": 0.01}, "models.m.retry_backoff_max_s = 0.01"),
        ({"cache_bytes": -1}, "models.m.cache_bytes = -1"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(None, {"models": {"m": over}}, {})


async def test_a_task_may_not_shadow_a_model(serve, flaky):
    with pytest.raises(ConfigError, match="a model is also called 'det'"):
        await serve(tasks(det={"variants": variants(("x", 1))}), flaky("det"))


def test_tasks_from_the_environment():
    env = {"APPLIANCE_TASKS__T__STICKY_KEY": "serial", "APPLIANCE_TASKS__T__FALLBACK": "small"}
    config = load_config(None, tasks(t={"variants": variants(("a", 1))}), env)
    task = config.task_config("t")
    assert (task.sticky_key, task.fallback) == ("serial", "small")


def test_documented_task_examples_load(tmp_path: Path):
    root = Path(__file__).resolve().parents[2]
    shipped = (root / "packaging" / "config.toml").read_text()
    example = shipped[shipped.index("#   [tasks.") :]
    readme = (root / "README.md").read_text()
    start = readme.index("```toml\n[tasks.defect-detect]") + len("```toml\n")
    for i, text in enumerate(
        [
            "\n".join(line[4:] for line in example.splitlines()),
            readme[start : readme.index("```", start)],
        ]
    ):
        path = tmp_path / f"example{i}.toml"
        path.write_text(text)
        config = load_config(path, environ={})
        assert config.task_config("defect-detect").fallback == "det-small"


async def test_a_full_queue_is_retried_within_the_deadline(serve, gated):
    from tests.support.gated import GatedBackend

    cfg = {"max_concurrency": 1, "max_queue": 0, "retries": 1000, "retry_backoff_s": 0.002,
           "retry_backoff_max_s": 0.005}  # fmt: skip
    client = await serve({"models": {"gated": cfg}}, gated)
    router = client.app[ROUTER]
    path = "/v2/models/gated/infer"
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]}
    first = asyncio.ensure_future(client.post(path, json=body))
    assert await asyncio.to_thread(GatedBackend.started.acquire, True, 10)
    # With a 50 ms deadline the retries stop well before the thousandth: 503, not 504.
    r = await client.post(path, json={**body, "parameters": {"timeout": 50_000}})
    assert r.status == 503 and "at capacity" in (await r.json())["error"]
    assert 0 < router.retries["gated"] < 1000
    before = router.retries["gated"]
    second = asyncio.ensure_future(client.post(path, json=body))
    while router.retries["gated"] < before + 2:  # refused, retrying
        await asyncio.sleep(0.001)
    GatedBackend.gate.set()
    assert (await first).status == 200
    r = await second
    assert r.status == 200 and (await r.json())["outputs"][0]["data"] == [2.0]
