"""Tasks through the other protocols: the OpenAI routes with the official client on the GGUF
test models (prompt templates, the LLM result cache, a fallback), and MQTT against a real
mosquitto broker."""

from __future__ import annotations

import struct
from typing import Any

import openai
import orjson
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from appliance.registry import Registry
from tests.api.test_mqtt import DEVICE, mqtt_settings, peers  # noqa: F401
from tests.api.test_openai import llm_store  # noqa: F401
from tests.engine.test_routing import X, metric
from tests.support.flaky import FlakyBackend
from tests.support.mosquitto import mosquitto_factory_fixture, mosquitto_fixture  # noqa: F401

GREEDY = {"temperature": 0, "seed": 1, "max_tokens": 16}
TEMPLATE = "Write a short note about {topic} for {reader}."
LLM_TASKS = {
    "tasks": {
        "notes": {"variants": [{"model": "tiny"}], "prompt_template": TEMPLATE},
        "pinned": {"variants": [{"model": "tiny", "version": "9"}], "fallback": "tiny"},
        "vectors": {"variants": [{"model": "minilm"}]},
    },
    "models": {"tiny": {"cache_bytes": 1 << 20}, "minilm": {"cache_bytes": 1 << 20}},
}


@pytest.fixture
async def api(serve: Any, llm_store: Registry) -> tuple[Any, openai.AsyncOpenAI]:  # noqa: F811
    client = await serve(LLM_TASKS)
    return client, openai.AsyncOpenAI(
        base_url=str(client.make_url("/v1")), api_key="unused", max_retries=0
    )


async def test_prompt_template_fills_the_user_turn(api):
    _, oai = api
    filled = [{"role": "user", "content": "Write a short note about model stores for operators."}]
    direct = await oai.chat.completions.with_raw_response.create(
        model="tiny", messages=filled, **GREEDY
    )
    assert "X-Cache" not in direct.headers and direct.headers["X-Model-Name"] == "tiny"
    raw = await oai.chat.completions.with_raw_response.create(
        model="notes", messages=[],
        extra_body={"fields": {"topic": "model stores", "reader": "operators"}}, **GREEDY,
    )  # fmt: skip
    out = raw.parse()
    assert out.model == "notes"  # the name the client asked for
    assert raw.headers["X-Model-Name"] == "tiny" and raw.headers["X-Task"] == "notes"
    assert raw.headers["X-Model-Version"] == "1"
    # The very same messages and sampling as the direct request: answered from the cache.
    assert raw.headers["X-Cache"] == "hit"
    assert out.choices[0].message.content == direct.parse().choices[0].message.content

    with pytest.raises(openai.BadRequestError) as err:
        await oai.chat.completions.create(
            model="notes", messages=[], extra_body={"fields": {"topic": "x"}}, **GREEDY
        )
    body = err.value.body
    assert isinstance(body, dict)
    assert body["param"] == "fields" and "missing reader" in body["message"]
    with pytest.raises(openai.BadRequestError):
        await oai.chat.completions.create(
            model="tiny", messages=filled, extra_body={"fields": {"topic": "x"}}, **GREEDY
        )

    # Streamed through the task, then asked again: the cached answer is the streamed text.
    fields = {"fields": {"topic": "breakers", "reader": "engineers"}}
    stream = await oai.chat.completions.create(
        model="notes", messages=[], stream=True, extra_body=fields, **GREEDY
    )
    streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    again = await oai.chat.completions.with_raw_response.create(
        model="notes", messages=[], extra_body=fields, **GREEDY
    )
    assert again.headers["X-Cache"] == "hit"
    assert again.parse().choices[0].message.content == streamed

    # A completion: the template is the prompt.
    done = await oai.completions.with_raw_response.create(
        model="notes", prompt="", extra_body=fields, **GREEDY
    )
    assert done.parse().model == "notes" and done.parse().choices[0].text


async def test_sampling_without_a_seed_is_never_cached(api):
    client, oai = api
    before = await metric(client, "appliance_cache_misses_total", model="tiny")
    for _ in range(2):
        raw = await oai.chat.completions.with_raw_response.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], temperature=0.9,
            max_tokens=4,
        )  # fmt: skip
        assert "X-Cache" not in raw.headers
    assert await metric(client, "appliance_cache_misses_total", model="tiny") == before
    assert await metric(client, "appliance_cache_hits_total", model="tiny") == 0


async def test_llm_fallback_and_embeddings_through_a_task(api):
    client, oai = api
    ids = {m.id async for m in oai.models.list()}
    assert ids == {"tiny", "minilm", "notes", "pinned", "vectors"}
    assert (await oai.models.retrieve("vectors")).id == "vectors"
    # The variant pins version 9, which is not serving: the fallback answers, streaming too.
    raw = await oai.chat.completions.with_raw_response.create(
        model="pinned", messages=[{"role": "user", "content": "hello"}], **GREEDY
    )
    assert raw.headers["X-Fallback"] == "true" and raw.parse().model == "pinned"
    r = await client.post(
        "/v1/chat/completions",
        json={"model": "pinned", "messages": [{"role": "user", "content": "hi"}],
              "stream": True, **GREEDY},
    )  # fmt: skip
    assert r.status == 200 and r.headers["X-Model-Name"] == "tiny"
    assert r.headers["X-Fallback"] == "true" and (await r.text()).endswith("data: [DONE]\n\n")

    first = await oai.embeddings.with_raw_response.create(model="vectors", input=["a", "b"])
    second = await oai.embeddings.with_raw_response.create(model="vectors", input=["a", "b"])
    assert first.parse().model == "vectors" and first.headers["X-Model-Name"] == "minilm"
    assert "X-Cache" not in first.headers and second.headers["X-Cache"] == "hit"
    assert [d.embedding for d in first.parse().data] == [d.embedding for d in second.parse().data]


# -- MQTT -------------------------------------------------------------------------------------
async def test_mqtt_infer_to_a_task(mosquitto, serve, peers, flaky):  # noqa: F811
    config = {
        **mqtt_settings(mosquitto),
        "tasks": {"detect": {"variants": [{"model": "det-v3", "weight": 1},
                                          {"model": "det-v4", "weight": 1}],
                             "sticky_key": "device_id", "fallback": "det-small"}},
    }  # fmt: skip
    client = await serve(config, flaky("det-v3", "det-v4", "det-small"))
    peer = peers(mosquitto)
    replies = await peer.ready()
    topic = f"appliance/{DEVICE}/infer/detect"

    async def ask(payload: bytes, corr: bytes, topic: str = topic, **user: str) -> Any:
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic, props.CorrelationData = replies, corr
        if user:
            props.UserProperty = list(user.items())
        peer.client.publish(topic, payload, qos=1, properties=props)
        reply = await peer.reply(replies, corr)
        assert reply.status == 200, reply.payload
        return reply.json()

    # The same device meets the same variant, by parameter or by MQTT 5 user property.
    seen = set()
    for i in range(3):
        body = {**X, "parameters": {"device_id": "cam-7"}}
        seen.add((await ask(orjson.dumps(body), b"p%d" % i))["model_name"])
        seen.add((await ask(orjson.dumps(X), b"u%d" % i, device_id="cam-7"))["model_name"])
    assert len(seen) == 1
    answer = await ask(orjson.dumps(X), b"plain")
    assert answer["parameters"]["task"] == "detect" and answer["outputs"][0]["data"] == [2, 4]
    # A raw payload takes the signature of the task's models.
    raw = await ask(struct.pack("<3f", 1, 2, 3), b"raw", topic=topic + "/raw")
    assert raw["outputs"][0]["data"] == [2, 4, 6]
    # Broken variants: the fallback answers over MQTT too.
    FlakyBackend.broken.update({"det-v3", "det-v4"})
    answer = await ask(orjson.dumps(X), b"fallback")
    assert answer["model_name"] == "det-small" and answer["parameters"]["fallback"] is True
    labels = {"task": "detect", "model": "det-small", "route": "fallback", "outcome": "success"}
    assert await metric(client, "appliance_task_requests_total", **labels) == 1
