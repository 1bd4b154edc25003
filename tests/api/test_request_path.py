"""One request lifecycle (appliance/request.py) under every front: the same request id, trace id,
access log line, deadline and priority handling whether a request arrives on the HTTP fast path,
through aiohttp, or over MQTT 5; a malformed value is a 400 naming where it came from."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from appliance.logs import JsonFormatter
from tests.api.test_mqtt import DEVICE, SAMPLE, body, mqtt_settings
from tests.api.test_mqtt import peers as peers  # a fixture
from tests.support.mosquitto import (
    mosquitto_factory_fixture,  # noqa: F401
    mosquitto_fixture,  # noqa: F401
)

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE}-00f067aa0ba902b7-01"
INFER = "/v2/models/sample/infer"


def access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    fmt = JsonFormatter()
    return [
        orjson.loads(fmt.format(rec)) for rec in caplog.records if rec.name == "appliance.access"
    ]


@pytest.fixture(params=[True, False], ids=["fast-path", "aiohttp"])
def fast_path(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


async def test_ids_trace_and_access_log_on_both_http_paths(serve, caplog, fast_path):
    client = await serve({"server": {"fast_path": fast_path}})
    caplog.set_level("INFO", logger="appliance.access")
    headers = {"X-Request-Id": "req-7", "traceparent": TRACEPARENT}
    r = await client.post(INFER, data=body(SAMPLE), headers=headers)
    assert r.status == 200 and r.headers["X-Request-Id"] == "req-7"
    r = await client.post("/v2/models/nope/infer", data=body(SAMPLE), headers=headers)
    assert r.status == 404 and r.headers["X-Request-Id"] == "req-7"
    r = await client.get("/v2/health/live", headers=headers)
    assert r.status == 200
    await client.get("/metrics")  # a later request: the access lines above are written
    lines = [x for x in access_lines(caplog) if x.get("request_id") == "req-7"]
    assert [(x["msg"], x.get("trace_id")) for x in lines] == [
        (f"POST {INFER} 200", TRACE),
        ("POST /v2/models/nope/infer 404", TRACE),
        ("GET /v2/health/live 200", TRACE),
    ]
    text = await (await client.get("/metrics")).text()
    route = 'route="/v2/models/{name}/infer"'
    assert f'appliance_http_responses_total{{{route},status="200"}} 1.0' in text
    assert f'appliance_http_responses_total{{{route},status="404"}} 1.0' in text


@pytest.mark.parametrize(
    ("headers", "params", "named"),
    [
        ({"X-Request-Priority": "high"}, {}, "X-Request-Priority"),
        ({"X-Request-Priority": "-1"}, {}, "X-Request-Priority"),
        ({}, {"priority": "1"}, "parameters.priority"),
        ({}, {"priority": -2}, "parameters.priority"),
        ({}, {"priority": {"level": 1}}, "parameters.priority"),
        ({"X-Request-Timeout-Ms": "soon"}, {}, "X-Request-Timeout-Ms"),
    ],
)
async def test_malformed_priority_and_timeout_are_400_naming_them(
    serve, fast_path, headers, params, named
):
    client = await serve({"server": {"fast_path": fast_path}})
    r = await client.post(INFER, data=body({**SAMPLE, "parameters": params}), headers=headers)
    assert r.status == 400
    assert (await r.json())["error"].startswith(named)
    good = await client.post(INFER, data=body(SAMPLE), headers={"X-Request-Priority": "1"})
    assert good.status == 200


async def test_mqtt_requests_take_the_same_path(mosquitto, serve, peers, caplog):
    from tests.api.test_mqtt import metrics_text

    client = await serve(mqtt_settings(mosquitto))
    caplog.set_level("INFO", logger="appliance.access")
    peer = peers(mosquitto)
    replies = await peer.ready()
    topic = f"appliance/{DEVICE}/infer/sample"
    user = [("request-id", "m-1"), ("traceparent", TRACEPARENT)]
    peer.publish(topic, body(SAMPLE), response_topic=replies, correlation=b"a", user=user)
    reply = await peer.reply(replies, b"a")
    assert reply.status == 200 and reply.user["request-id"] == "m-1"

    # a malformed priority or timeout is refused like HTTP refuses it, naming the property
    bad = [("priority", "urgent")]
    peer.publish(topic, body(SAMPLE), response_topic=replies, correlation=b"b", user=bad)
    reply = await peer.reply(replies, b"b")
    assert reply.status == 400 and reply.json()["error"].startswith("priority must be")
    generated = reply.user["request-id"]
    assert len(generated) == 32  # none given: a new one, as over HTTP
    bad = [("request-timeout-ms", "0")]
    peer.publish(topic, body(SAMPLE), response_topic=replies, correlation=b"c", user=bad)
    reply = await peer.reply(replies, b"c")
    assert reply.status == 400 and reply.json()["error"].startswith("request-timeout-ms")
    good = [("priority", "2")]
    peer.publish(topic, body(SAMPLE), response_topic=replies, correlation=b"d", user=good)
    assert (await peer.reply(replies, b"d")).status == 200

    await metrics_text(client)  # a later request: the access lines above are written
    lines = {x["request_id"]: x for x in access_lines(caplog) if x.get("protocol") == "mqtt"}
    assert lines["m-1"]["trace_id"] == TRACE
    assert lines["m-1"]["msg"] == f"PUBLISH {topic} 200"
    assert lines[generated]["msg"] == f"PUBLISH {topic} 400"
    text = await metrics_text(client)
    assert 'appliance_mqtt_requests_total{outcome="success"} 2.0' in text
    assert 'appliance_mqtt_requests_total{outcome="invalid"} 2.0' in text
