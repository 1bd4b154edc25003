"""Traces (appliance/tracing/) received by a real OTLP/HTTP receiver: the spans, their parents
and attributes as documented, the client's sampled traceparent honoured, the trace setting API;
with tracing off nothing of OpenTelemetry is imported."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest

from appliance.config import load_config
from appliance.errors import ConfigError
from tests.api.test_mqtt import DEVICE, MULTI_IO, SAMPLE, body, mqtt_settings
from tests.api.test_mqtt import peers as peers  # a fixture
from tests.support.mosquitto import (
    mosquitto_factory_fixture,  # noqa: F401
    mosquitto_fixture,  # noqa: F401
)
from tests.tracing.receiver import Receiver

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
SAMPLED = f"00-{TRACE}-{PARENT}-01"
UNSAMPLED = f"00-{TRACE}-{PARENT}-00"
INFER = "/v2/models/sample/infer"
SERVER, INTERNAL = 2, 1  # SpanKind in the protobuf


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = await Receiver().start()
    yield r
    assert r.runner is not None
    await r.runner.cleanup()


def traced(receiver: Receiver, ratio: float = 0.0, **extra: Any) -> dict[str, Any]:
    return {
        "tracing": {
            "enabled": True,
            "endpoint": receiver.url,
            "sampling_ratio": ratio,
            "schedule_delay_ms": 20,
            "device_id": "dev-7",
            "resource": {"deployment.environment": "test"},
        },
        **extra,
    }


@pytest.fixture(params=[True, False], ids=["fast-path", "aiohttp"])
def fast_path(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


async def test_a_sampled_traceparent_is_traced_with_its_children(serve, receiver, fast_path):
    client = await serve(traced(receiver, 0.0, server={"fast_path": fast_path}))
    r = await client.post(INFER, data=body(SAMPLE), headers={"traceparent": SAMPLED,
                                                              "tracestate": "k=v"})  # fmt: skip
    assert r.status == 200
    request = (await receiver.wait_for(1, f"POST {INFER.replace('sample', '{name}')}"))[0]
    compute = (await receiver.wait_for(1, "compute"))[0]
    # the request span: under the client's, kind SERVER, its attributes
    assert (request.trace_id, request.parent, request.kind) == (TRACE, PARENT, SERVER)
    a = request.attributes
    assert a["http.request.method"] == "POST" and a["url.path"] == INFER
    assert a["http.response.status_code"] == 200 and a["appliance.model.name"] == "sample"
    assert a["appliance.model.version"] == "1" and a["appliance.protocol"] == "http"
    assert request.resource["service.name"] == "appliance"
    assert request.resource["device.id"] == "dev-7"
    assert request.resource["deployment.environment"] == "test"
    # compute: a child of the request, inside it in time, with the model and the batch
    assert (compute.trace_id, compute.parent, compute.kind) == (TRACE, request.span_id, INTERNAL)
    assert compute.attributes["appliance.model.name"] == "sample"
    assert compute.attributes["appliance.batch_size"] == 1
    assert request.start_ns <= compute.start_ns <= compute.end_ns <= request.end_ns
    # the answer carries the request span's context back
    assert r.headers["traceparent"] == f"00-{TRACE}-{request.span_id}-01"


async def test_unsampled_and_unsent_traceparents_follow_the_ratio(serve, receiver, fast_path):
    client = await serve(traced(receiver, 1.0, server={"fast_path": fast_path}))
    r = await client.post(INFER, data=body(SAMPLE), headers={"traceparent": UNSAMPLED})
    assert r.status == 200 and "traceparent" not in r.headers  # the parent said no
    r = await client.post(INFER, data=body(SAMPLE))  # none: sampled at 1/1, a new trace
    assert r.status == 200
    (request,) = await receiver.wait_for(1, "POST /v2/models/{name}/infer")
    assert request.parent == "" and request.trace_id != TRACE
    assert r.headers["traceparent"].split("-")[1] == request.trace_id
    # a request refused before it runs is traced too, with its status
    r = await client.post("/v2/models/nope/infer", data=body(SAMPLE))
    assert r.status == 404
    spans = await receiver.wait_for(2, "POST /v2/models/{name}/infer")
    assert spans[1].attributes["http.response.status_code"] == 404
    assert r.headers["traceparent"].split("-")[2] == spans[1].span_id


async def test_queue_span_when_a_request_waits(serve, receiver):
    """A request that goes through the model's queue: a `queue` span before compute."""
    client = await serve(traced(receiver, 1.0))  # a new model's first runs go through its queue
    assert (await client.post(INFER, data=body(SAMPLE))).status == 200
    (queue,) = await receiver.wait_for(1, "queue")
    (compute,) = await receiver.wait_for(1, "compute")
    assert queue.parent == compute.parent and queue.end_ns <= compute.start_ns + 1000
    assert queue.attributes["appliance.model.name"] == "sample"


async def test_each_step_is_a_span(serve, receiver, image_store):
    from appliance.server import sources_from_store
    from tests.support.images import encode, picture

    client = await serve(traced(receiver, 0.0), sources=sources_from_store(image_store.root))
    data = encode(picture(64, 48, 1), "JPEG", quality=90)
    headers = {"Content-Type": "image/jpeg", "traceparent": SAMPLED}
    r = await client.post("/v2/models/classifier/infer?top_k=2", data=data, headers=headers)
    assert r.status == 200
    (request,) = await receiver.wait_for(1, "POST /v2/models/{name}/infer")
    await receiver.wait_for(1, "compute")
    steps = [s for s in receiver.spans if s.name.startswith("step ")]
    assert len(steps) >= 2, [s.name for s in receiver.spans]
    assert {s.attributes["appliance.step.type"] for s in steps} == {"image", "classification"}
    for span in steps:
        assert (span.trace_id, span.parent) == (TRACE, request.span_id)
        assert request.start_ns <= span.start_ns <= span.end_ns <= request.end_ns


async def test_mqtt5_user_properties_carry_the_context(mosquitto, serve, peers, receiver):
    await serve(traced(receiver, 0.0, **mqtt_settings(mosquitto)))
    peer = peers(mosquitto)
    replies = await peer.ready()
    topic = f"appliance/{DEVICE}/infer/sample"
    user = [("traceparent", SAMPLED), ("tracestate", "k=v")]
    peer.publish(topic, body(SAMPLE), response_topic=replies, correlation=b"a", user=user)
    reply = await peer.reply(replies, b"a")
    assert reply.status == 200
    (request,) = await receiver.wait_for(1, "PUBLISH infer")
    assert (request.trace_id, request.parent, request.kind) == (TRACE, PARENT, SERVER)
    assert request.attributes["messaging.system"] == "mqtt"
    assert request.attributes["messaging.destination.name"] == topic
    assert reply.user["traceparent"] == f"00-{TRACE}-{request.span_id}-01"


async def test_mqtt311_json_fields_carry_the_context(mosquitto, serve, peers, receiver):
    await serve(traced(receiver, 0.0, **mqtt_settings(mosquitto, protocol="3.1.1")))
    peer = peers(mosquitto, v5=False)
    replies = await peer.ready()
    request = {**SAMPLE, "id": "r-311", "reply_to": replies, "traceparent": SAMPLED}
    peer.publish(f"appliance/{DEVICE}/infer/sample", body(request))
    msgs = await peer.wait(lambda ms: any(m.topic == replies for m in ms))
    reply = next(m for m in msgs if m.topic == replies).json()
    (span,) = await receiver.wait_for(1, "PUBLISH infer")
    assert (span.trace_id, span.parent) == (TRACE, PARENT)
    assert reply["id"] == "r-311"
    assert reply["parameters"]["traceparent"] == f"00-{TRACE}-{span.span_id}-01"
    # an error answer carries it too
    bad = {"id": "r-bad", "reply_to": replies, "traceparent": SAMPLED, "inputs": [{"name": "x"}]}
    peer.publish(f"appliance/{DEVICE}/infer/sample", body(bad))
    msgs = await peer.wait(lambda ms: len([m for m in ms if m.topic == replies]) >= 2)
    err = [m for m in msgs if m.topic == replies][1].json()
    assert err["status"] == 400 and err["traceparent"].split("-")[1] == TRACE


async def test_trace_setting_api(serve, receiver):
    client = await serve(traced(receiver, 0.5))
    got = await (await client.get("/v2/trace/setting")).json()
    assert got == {"trace_level": ["TIMESTAMPS"], "trace_rate": "2", "trace_count": "-1",
                   "trace_mode": "opentelemetry"}  # fmt: skip
    # one model off: not traced even when the client's parent is sampled
    r = await client.post("/v2/models/sample/trace/setting", json={"trace_level": ["OFF"]})
    assert r.status == 200 and (await r.json())["trace_level"] == ["OFF"]
    assert await client.get("/v2/trace/setting")  # the server's stays on
    await client.post(INFER, data=body(SAMPLE), headers={"traceparent": SAMPLED})
    # every request of the other models; two, then none (trace_count)
    r = await client.post("/v2/trace/setting", json={"trace_rate": "1", "trace_count": 2})
    assert (await r.json())["trace_rate"] == "1"
    for _ in range(3):
        r = await client.post("/v2/models/multi_io/infer", data=body(MULTI_IO))
        assert r.status == 200
    # the model back to the server's setting
    r = await client.post("/v2/models/sample/trace/setting", json={"trace_level": None})
    assert (await r.json())["trace_level"] == ["TIMESTAMPS"]
    spans = await receiver.wait_for(2, "POST /v2/models/{name}/infer")
    assert [s.attributes["appliance.model.requested"] for s in spans] == ["multi_io"] * 2
    # malformed settings: 400 naming the key; an unknown model: 404
    for bad, key in (({"trace_rate": "often"}, "trace_rate"), ({"trace_level": ["LOUD"]},
                     "trace_level"), ({"trace_file": "x"}, "trace_file"),
                     ({"trace_count": -5}, "trace_count")):  # fmt: skip
        r = await client.post("/v2/trace/setting", json=bad)
        assert r.status == 400 and (await r.json())["error"].startswith(key), bad
    r = await client.post("/v2/models/nope/trace/setting", json={"trace_rate": "1"})
    assert r.status == 404


async def test_off_by_default(serve):
    client = await serve()
    got = await (await client.get("/v2/trace/setting")).json()
    assert got["trace_level"] == ["OFF"]
    r = await client.post("/v2/trace/setting", json={"trace_level": ["TIMESTAMPS"]})
    assert r.status == 400 and "tracing is off" in (await r.json())["error"]
    r = await client.post(INFER, data=body(SAMPLE), headers={"traceparent": SAMPLED})
    assert r.status == 200 and "traceparent" not in r.headers


def test_off_imports_nothing_of_opentelemetry(store):
    """A served app with tracing off (the default) imports no OpenTelemetry module."""
    code = (
        "import sys, asyncio\n"
        "from appliance.config import load_config\n"
        "from appliance.server import build, sources_from_store\n"
        f"c = load_config(None, {{'store': {{'path': {str(store.root)!r}}}}}, {{}})\n"
        f"build(c, sources_from_store(c.store.path and __import__('pathlib').Path(c.store.path)))\n"
        "import appliance.tracing as t\n"
        "assert t.tracer is None\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"sampling_ratio": 1.5}, "tracing.sampling_ratio"),
        ({"endpoint": "grpc://x:4317"}, "tracing.endpoint"),
        ({"resource": {"a": 1}}, "tracing.resource.a"),
        ({"max_queue_size": 10, "max_export_batch_size": 20}, "tracing.max_export_batch_size"),
        ({"device_id": "bad id"}, "tracing.device_id"),
    ],
)
def test_bad_tracing_config_is_refused_naming_the_key(table, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, {"tracing": table}, {})
    assert str(err.value).startswith(key)


async def test_a_request_run_inline_has_a_compute_span_and_no_queue_span(serve, receiver):
    """Once measured (16 runs on the workers), the model answers on the loop thread with no
    coroutine below the request path (Engine.infer_now): its compute span is still there."""
    client = await serve(traced(receiver, 0.0, models={"sample": {"inline_max_us": 100_000}}))
    for _ in range(16):
        assert (await client.post(INFER, data=body(SAMPLE))).status == 200
    r = await client.post(INFER, data=body(SAMPLE), headers={"traceparent": SAMPLED})
    assert r.status == 200
    (request,) = await receiver.wait_for(1, "POST /v2/models/{name}/infer")
    (compute,) = await receiver.wait_for(1, "compute")
    assert compute.attributes["appliance.inline"] is True
    assert compute.attributes["appliance.batch_size"] == 1
    assert (compute.trace_id, compute.parent) == (TRACE, request.span_id)
    assert request.start_ns <= compute.start_ns <= compute.end_ns <= request.end_ns
    assert not [s for s in receiver.spans if s.name == "queue"]
