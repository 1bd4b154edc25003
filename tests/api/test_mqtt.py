"""The MQTT interface against a real mosquitto broker, with paho clients on the other side.

The appliance runs in-process (the `serve` fixture) or as an `appliance serve --mqtt`
subprocess; every answer over MQTT is compared with the HTTP answer of the same app. Waits are
on messages, with timeouts, never on elapsed time.
"""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import struct
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from appliance import __version__
from appliance.registry import Registry
from tests.conftest import ServerProcess, start_server_process, stop_server_process
from tests.support.gated import GatedBackend
from tests.support.mosquitto import (
    Mosquitto,
    make_certificates,
    mosquitto_factory_fixture,  # noqa: F401
    mosquitto_fixture,  # noqa: F401
    require_tool,
)

TIMEOUT = 20.0
DEVICE = "dev1"
SAMPLE = {
    "inputs": [
        {"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [0.5, -1.0, 2.0, 0.25]}
    ]
}
MULTI_IO = {
    "inputs": [
        {"name": "x", "datatype": "FP32", "shape": [2, 3], "data": [1.0, -2.0, 3.5, 0, 4, -1]},
        {"name": "y", "datatype": "INT64", "shape": [2, 3], "data": [1, 2, 3, 4, 5, 6]},
        {
            "name": "pixels",
            "datatype": "UINT8",
            "shape": [2, 2, 2],
            "data": [0, 10, 20, 30, 255, 255, 0, 1],
        },
    ]
}


def body(obj: Any) -> bytes:
    return orjson.dumps(obj)


def mqtt_settings(broker: Mosquitto, device: str = DEVICE, **extra: Any) -> dict[str, Any]:
    return {
        "mqtt": {
            "url": broker.url,
            "device_id": device,
            "reconnect_min_s": 0.05,
            "reconnect_max_s": 0.5,
            **extra,
        }
    }


# -- the test's own MQTT client -----------------------------------------------------------------
@dataclass(frozen=True)
class Msg:
    topic: str
    payload: bytes
    retain: bool
    correlation: bytes | None
    user: dict[str, str]
    content_type: str | None

    def json(self) -> Any:
        return orjson.loads(self.payload)

    @property
    def status(self) -> int | None:
        return int(self.user["status"]) if "status" in self.user else None


class Peer:
    """A paho client in its own network thread (loop_start) that records all it receives."""

    def __init__(
        self,
        broker: Mosquitto,
        *,
        v5: bool = True,
        client_id: str = "",
        session_expiry: int | None = None,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self.broker = broker
        self.v5 = v5
        self.persistent = session_expiry is not None
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"peer-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            clean_session=None if v5 else not self.persistent,
        )
        self.connect_props = None
        if v5 and session_expiry is not None:
            self.connect_props = Properties(PacketTypes.CONNECT)
            self.connect_props.SessionExpiryInterval = session_expiry
        if username is not None:
            self.client.username_pw_set(username, password)
        self.client.reconnect_delay_set(1, 1)
        self.messages: list[Msg] = []
        self.topics: dict[str, int] = {}
        self.subacks: set[int] = set()
        self.connected = threading.Event()
        self.cond = threading.Condition()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            return
        for topic, qos in self.topics.items():  # paho does not resubscribe by itself
            client.subscribe(topic, qos)
        self.connected.set()

    def _on_disconnect(self, *args: Any) -> None:
        self.connected.clear()

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, *args: Any) -> None:
        with self.cond:
            self.subacks.add(mid)
            self.cond.notify_all()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        props = getattr(msg, "properties", None)
        m = Msg(
            topic=msg.topic,
            payload=bytes(msg.payload),
            retain=bool(msg.retain),
            correlation=getattr(props, "CorrelationData", None),
            user=dict(getattr(props, "UserProperty", None) or []),
            content_type=getattr(props, "ContentType", None),
        )
        with self.cond:
            self.messages.append(m)
            self.cond.notify_all()

    def start(self) -> Peer:
        kwargs: dict[str, Any] = {}
        if self.v5:
            kwargs["properties"] = self.connect_props
            # mosquitto's persistence file skips sessions that began with clean start, even
            # with a session expiry: a persistent client starts unclean from its first connect.
            kwargs["clean_start"] = not self.persistent
        self.client.connect("127.0.0.1", self.broker.port, 30, **kwargs)
        self.client.loop_start()
        assert self.connected.wait(TIMEOUT), "the test client could not connect"
        return self

    def subscribe(self, topic: str, qos: int = 1) -> None:
        self.topics[topic] = qos
        rc, mid = self.client.subscribe(topic, qos)
        assert rc == mqtt.MQTT_ERR_SUCCESS
        with self.cond:
            assert self.cond.wait_for(lambda: mid in self.subacks, TIMEOUT), "no SUBACK"

    async def ready(self) -> str:
        """Subscribe to a new reply topic and the appliance's status, wait until the appliance
        is online, and return the reply topic."""
        replies = f"replies/{uuid.uuid4().hex}"
        self.subscribe(replies)
        self.subscribe(f"appliance/{DEVICE}/status")
        await self.wait(online(DEVICE))
        return replies

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        response_topic: str | None = None,
        correlation: bytes | None = None,
        content_type: str | None = None,
        user: list[tuple[str, str]] | None = None,
        expiry_s: int | None = None,
    ) -> mqtt.MQTTMessageInfo:
        props = None
        if self.v5 and (response_topic or correlation or content_type or user or expiry_s):
            props = Properties(PacketTypes.PUBLISH)
            if response_topic:
                props.ResponseTopic = response_topic
            if correlation is not None:
                props.CorrelationData = correlation
            if content_type:
                props.ContentType = content_type
            if user:
                props.UserProperty = user
            if expiry_s:
                props.MessageExpiryInterval = expiry_s
        return self.client.publish(topic, payload, qos=qos, properties=props)

    def mark(self) -> int:
        with self.cond:
            return len(self.messages)

    def wait_for(
        self, done: Callable[[list[Msg]], bool], timeout: float = TIMEOUT, since: int = 0
    ) -> list[Msg]:
        """Block until done(messages received since `since`) holds; those messages."""
        with self.cond:
            ok = self.cond.wait_for(lambda: done(self.messages[since:]), timeout)
            seen = list(self.messages[since:])
        if not ok:
            shown = "\n".join(f"  {m.topic}: {m.payload[:200]!r}" for m in seen[-20:])
            pytest.fail(f"timed out after {timeout} s; received {len(seen)}:\n{shown}")
        return seen

    async def wait(
        self, done: Callable[[list[Msg]], bool], timeout: float = TIMEOUT, since: int = 0
    ) -> list[Msg]:
        """wait_for without blocking the event loop (which may run the appliance itself)."""
        return await asyncio.to_thread(self.wait_for, done, timeout, since)

    async def reply(self, topic: str, correlation: bytes, since: int = 0) -> Msg:
        msgs = await self.wait(lambda ms: any(_is(m, topic, correlation) for m in ms), since=since)
        return next(m for m in msgs if _is(m, topic, correlation))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _is(m: Msg, topic: str, correlation: bytes | None) -> bool:
    return m.topic == topic and m.correlation == correlation


@pytest.fixture
def peers() -> Iterator[Callable[..., Peer]]:
    made: list[Peer] = []

    def make(broker: Mosquitto, **kwargs: Any) -> Peer:
        peer = Peer(broker, **kwargs)
        made.append(peer)
        return peer.start()

    yield make
    for peer in made:
        peer.close()


def online(device: str, ready: bool = True) -> Callable[[list[Msg]], bool]:
    """A status message saying `device` is online (with every model ready, if `ready`)."""

    def done(ms: list[Msg]) -> bool:
        for m in ms:
            if m.topic.endswith(f"/{device}/status"):
                s = m.json()
                if s["status"] == "online" and (
                    not ready or (s["models"] and all(x["status"] == "ready" for x in s["models"]))
                ):
                    return True
        return False

    return done


def offline(device: str) -> Callable[[list[Msg]], bool]:
    return lambda ms: any(
        m.topic.endswith(f"/{device}/status") and m.json()["status"] == "offline" for m in ms
    )


async def http_json(client: Any, path: str, payload: bytes) -> tuple[int, Any]:
    r = await client.post(path, data=payload, headers={"Content-Type": "application/json"})
    return r.status, await r.json()


async def metrics_text(client: Any) -> str:
    return str(await (await client.get("/metrics")).text())


def replies_to(topic: str, ms: list[Msg]) -> list[Msg]:
    return [m for m in ms if m.topic == topic]


# -- 1. MQTT 5 request/response -----------------------------------------------------------------
async def test_mqtt5_round_trips_match_http(mosquitto, serve, peers):
    client = await serve(mqtt_settings(mosquitto))
    peer = peers(mosquitto)
    replies = await peer.ready()

    cases = [
        ("sample", "/v2/models/sample/infer", SAMPLE),
        ("sample/versions/1", "/v2/models/sample/versions/1/infer", {**SAMPLE, "id": "v1"}),
        ("multi_io", "/v2/models/multi_io/infer", MULTI_IO),
        (
            "multi_io",
            "/v2/models/multi_io/infer",
            {**MULTI_IO, "outputs": [{"name": "pixel_mean"}, {"name": "sum"}]},
        ),
        ("sample", "/v2/models/sample/infer", {**SAMPLE, "outputs": [{"name": "label"}]}),
        (
            "strings",
            "/v2/models/strings/infer",
            {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["a", "bé"]}]},
        ),
    ]
    for i, (route, path, request) in enumerate(cases):
        status, expected = await http_json(client, path, body(request))
        assert status == 200, expected
        corr = f"corr-{i}".encode() + bytes([0, 255])  # binary correlation data survives
        peer.publish(
            f"appliance/{DEVICE}/infer/{route}",
            body(request),
            response_topic=replies,
            correlation=corr,
        )
        reply = await peer.reply(replies, corr)
        assert reply.status == 200
        assert reply.content_type == "application/json"
        assert reply.json() == expected, route
    outs = [o["name"] for o in reply.json()["outputs"]]
    assert outs == ["echo"]
    text = await metrics_text(client)
    assert f'appliance_mqtt_requests_total{{outcome="success"}} {float(len(cases))}' in text
    assert "appliance_mqtt_connected 1.0" in text


@pytest.mark.parametrize("inline", [True, False], ids=["inline", "queued"])
async def test_requests_start_at_once_and_a_task_only_when_they_wait(
    mosquitto, serve, peers, inline
):
    """api/eager.py: a request to a model the engine runs inline is answered from the read of
    its message, with no Task; one to a queued model goes on in a Task. Answers match either way."""
    budget = 1e6 if inline else 0.0  # µs: every measured run fits, or none does
    client = await serve(
        {**mqtt_settings(mosquitto), "models": {"sample": {"inline_max_us": budget}}}
    )
    peer = peers(mosquitto)
    replies = await peer.ready()
    for _ in range(16):  # the runs the scheduler measures before it runs a model inline
        status, expected = await http_json(client, "/v2/models/sample/infer", body(SAMPLE))
        assert status == 200
    loop = asyncio.get_running_loop()
    made: list[str] = []

    def factory(lp: asyncio.AbstractEventLoop, coro: Any, **kw: Any) -> asyncio.Task[Any]:
        made.append(str(getattr(coro, "__qualname__", None) or getattr(coro, "__name__", "")))
        return asyncio.Task(coro, loop=lp, **kw)

    n = 12
    mark = peer.mark()
    loop.set_task_factory(factory)
    try:
        for i in range(n):
            peer.publish(f"appliance/{DEVICE}/infer/sample", body(SAMPLE), response_topic=replies,
                         correlation=b"c%d" % i)  # fmt: skip
        want = {b"c%d" % i for i in range(n)}
        msgs = await peer.wait(lambda ms: {m.correlation for m in ms} >= want, since=mark)
    finally:
        loop.set_task_factory(None)
    answers = [m for m in msgs if m.correlation in want]
    assert [m.status for m in answers] == [200] * n
    assert all(m.json() == expected for m in answers)
    assert made.count("MqttService._handle") == (0 if inline else n)


# -- 2. MQTT 3.1.1: reply_to and id in the JSON request -----------------------------------------
@pytest.mark.parametrize("appliance_protocol", ["3.1.1", "5"])
async def test_mqtt311_reply_to_and_id(mosquitto, serve, peers, appliance_protocol):
    client = await serve(mqtt_settings(mosquitto, protocol=appliance_protocol))
    peer = peers(mosquitto, v5=False)
    replies = await peer.ready()
    request = {**SAMPLE, "id": "req-311", "reply_to": replies}
    status, expected = await http_json(client, "/v2/models/sample/infer", body(request))
    assert status == 200
    peer.publish(f"appliance/{DEVICE}/infer/sample", body(request))
    msgs = await peer.wait(lambda ms: bool(replies_to(replies, ms)))
    reply = replies_to(replies, msgs)[0].json()
    assert reply["id"] == "req-311"
    assert reply == expected
    # An error carries the id back as well.
    bad = {"id": "req-bad", "reply_to": replies, "inputs": [{"name": "input"}]}
    _, http_err = await http_json(client, "/v2/models/sample/infer", body(bad))
    peer.publish(f"appliance/{DEVICE}/infer/sample", body(bad))
    msgs = await peer.wait(lambda ms: len(replies_to(replies, ms)) >= 2)
    err = replies_to(replies, msgs)[1].json()
    assert err == {"error": http_err["error"], "status": 400, "id": "req-bad"}


# -- 3. errors: the same messages as HTTP, and the connection stays up --------------------------
async def test_errors_match_http_and_connection_stays_up(mosquitto, serve, peers):
    limit = 2000
    client = await serve(
        {**mqtt_settings(mosquitto, max_payload_bytes=limit), "server": {"max_body_bytes": limit}}
    )
    peer = peers(mosquitto)
    replies = await peer.ready()
    wrong_shape = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]
    }
    too_big = b'{"inputs": []' + b" " * (limit + 10) + b"}"
    cases = [
        ("garbage", "sample", "/v2/models/sample/infer", b"not json {", 400),
        ("not an object", "sample", "/v2/models/sample/infer", b"[1, 2]", 400),
        ("wrong shape", "sample", "/v2/models/sample/infer", body(wrong_shape), 400),
        (
            "wrong type",
            "sample",
            "/v2/models/sample/infer",
            body({"inputs": [{**SAMPLE["inputs"][0], "data": ["a", "b", "c", "d"]}]}),
            400,
        ),
        ("unknown model", "nope", "/v2/models/nope/infer", body(SAMPLE), 404),
        (
            "unknown version",
            "sample/versions/7",
            "/v2/models/sample/versions/7/infer",
            body(SAMPLE),
            404,
        ),
        ("too large", "sample", "/v2/models/sample/infer", too_big, 413),
    ]
    for i, (what, route, path, payload, code) in enumerate(cases):
        status, http_err = await http_json(client, path, payload)
        assert status == code, (what, http_err)
        corr = f"err-{i}".encode()
        peer.publish(
            f"appliance/{DEVICE}/infer/{route}", payload, response_topic=replies, correlation=corr
        )
        reply = await peer.reply(replies, corr)
        assert reply.status == code, what
        err = reply.json()
        assert err["status"] == code, what
        if what == "too large":
            # HTTP speaks of a request body, MQTT of a payload; the limit is the same.
            tail = f"of {len(too_big)} bytes is larger than the limit of {limit} bytes"
            assert http_err["error"].endswith(tail) and err["error"].endswith(tail)
        else:
            assert err["error"] == http_err["error"], what
    # A topic that names no model at all.
    peer.publish(
        f"appliance/{DEVICE}/infer/sample/x/y/z",
        body(SAMPLE),
        response_topic=replies,
        correlation=b"topic",
    )
    reply = await peer.reply(replies, b"topic")
    assert reply.status == 404 and "names no model" in reply.json()["error"]

    # Garbage without a reply address: counted, answered by nothing. A watcher on every topic
    # sees what the appliance publishes; the next request's reply comes after any reply the
    # garbage could have had (one connection, handled in order, the garbage without a wait).
    watcher = peers(mosquitto)
    watcher.subscribe("#")
    start = watcher.mark()
    peer.publish(f"appliance/{DEVICE}/infer/sample", b"\x00garbage")
    peer.publish(
        f"appliance/{DEVICE}/infer/sample",
        body(SAMPLE),
        response_topic=replies,
        correlation=b"after",
    )
    reply = await peer.reply(replies, b"after")
    assert reply.status == 200  # the connection is still up and serving
    seen = await watcher.wait(lambda ms: any(_is(m, replies, b"after") for m in ms), since=start)
    published = [m for m in seen if "/infer/" not in m.topic and not m.retain]
    assert [(m.topic, m.correlation) for m in published] == [(replies, b"after")]
    text = await metrics_text(client)
    assert 'appliance_mqtt_requests_total{outcome="invalid_unanswered"} 1.0' in text
    assert 'appliance_mqtt_requests_total{outcome="invalid"} 5.0' in text  # 400s and the 413
    assert 'appliance_mqtt_requests_total{outcome="not_found"} 3.0' in text
    assert "appliance_mqtt_connected 1.0" in text


# -- 4. raw payloads ----------------------------------------------------------------------------
async def test_raw_payloads(mosquitto, serve, peers):
    client = await serve(mqtt_settings(mosquitto))
    peer = peers(mosquitto)
    replies = await peer.ready()
    text = "héllo, wörld".encode()
    _, expected_text = await http_json(
        client,
        "/v2/models/strings/infer",
        body(
            {
                "inputs": [
                    {"name": "text", "datatype": "BYTES", "shape": [1], "data": [text.decode()]}
                ]
            }
        ),
    )
    values = [0.5, -1.0, 2.0, 0.25]
    _, expected_sample = await http_json(client, "/v2/models/sample/infer", body(SAMPLE))

    peer.publish(
        f"appliance/{DEVICE}/infer/strings/raw", text, response_topic=replies, correlation=b"suffix"
    )
    reply = await peer.reply(replies, b"suffix")
    assert reply.status == 200 and reply.json() == expected_text
    peer.publish(
        f"appliance/{DEVICE}/infer/strings",
        text,
        response_topic=replies,
        correlation=b"ctype",
        content_type="application/octet-stream",
    )
    reply = await peer.reply(replies, b"ctype")
    assert reply.status == 200 and reply.json() == expected_text
    peer.publish(
        f"appliance/{DEVICE}/infer/sample/versions/1/raw",
        struct.pack("<4f", *values),
        response_topic=replies,
        correlation=b"floats",
    )
    reply = await peer.reply(replies, b"floats")
    assert reply.status == 200 and reply.json() == expected_sample
    # Two rows of 4 floats make a batch of two.
    peer.publish(
        f"appliance/{DEVICE}/infer/sample/raw",
        struct.pack("<8f", *values, *values),
        response_topic=replies,
        correlation=b"batch",
    )
    reply = await peer.reply(replies, b"batch")
    probs = next(o for o in reply.json()["outputs"] if o["name"] == "probabilities")
    assert probs["shape"] == [2, 3]

    # What a raw payload cannot be.
    peer.publish(
        f"appliance/{DEVICE}/infer/sample/raw",
        b"\x00" * 15,
        response_topic=replies,
        correlation=b"odd",
    )
    reply = await peer.reply(replies, b"odd")
    assert reply.status == 400
    assert reply.json()["error"] == "raw payload of 15 bytes is not a whole number of FP32 values"
    peer.publish(
        f"appliance/{DEVICE}/infer/sample/raw",
        b"\x00" * 12,
        response_topic=replies,
        correlation=b"short",
    )
    reply = await peer.reply(replies, b"short")
    assert reply.status == 400 and "does not fit input 'input'" in reply.json()["error"]
    peer.publish(
        f"appliance/{DEVICE}/infer/multi_io/raw",
        b"\x00" * 12,
        response_topic=replies,
        correlation=b"multi",
    )
    reply = await peer.reply(replies, b"multi")
    assert reply.status == 400 and "raw payloads need exactly one" in reply.json()["error"]


# -- 5. retained status and the last will -------------------------------------------------------
def appliance_process(
    store: Registry, broker: Mosquitto, device: str, url: str | None = None
) -> ServerProcess:
    env = {"APPLIANCE_MQTT__RECONNECT_MIN_S": "0.05", "APPLIANCE_MQTT__RECONNECT_MAX_S": "0.5"}
    args = ["--models", str(store.root), "--mqtt", url or broker.url, "--device-id", device]
    return start_server_process(args, env=env)


def test_status_online_then_offline_by_will_and_by_shutdown(store, mosquitto, peers):
    peer = peers(mosquitto)
    peer.subscribe("appliance/+/status")
    server = appliance_process(store, mosquitto, "killed")
    try:
        msgs = peer.wait_for(online("killed"))
        status = [m for m in msgs if m.topic == "appliance/killed/status"][-1].json()
        assert status["version"] == __version__ and status["device_id"] == "killed"
        assert {"name": "sample", "version": "1", "status": "ready", "device": "cpu"} in (
            status["models"]
        )
        # A new subscriber gets the retained status.
        late = peers(mosquitto)
        late.subscribe("appliance/killed/status")
        retained = late.wait_for(lambda ms: bool(ms))[0]
        assert retained.retain and retained.json()["status"] == "online"
        mark = peer.mark()
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(TIMEOUT)
        peer.wait_for(offline("killed"), since=mark)  # the last will
    finally:
        stop_server_process(server)
    late = peers(mosquitto)
    late.subscribe("appliance/killed/status")
    retained = late.wait_for(lambda ms: bool(ms))[0]
    assert retained.retain and retained.json() == {"status": "offline", "device_id": "killed"}

    server = appliance_process(store, mosquitto, "stopped")
    mark = peer.mark()
    try:
        peer.wait_for(online("stopped"))
    finally:
        assert stop_server_process(server) == 0
    peer.wait_for(offline("stopped"), since=mark)
    late = peers(mosquitto)
    late.subscribe("appliance/stopped/status")
    retained = late.wait_for(lambda ms: bool(ms))[0]
    assert retained.retain and retained.json()["status"] == "offline"


# -- 6. reliability -----------------------------------------------------------------------------
async def test_broker_restart_in_the_middle_of_a_request_stream(mosquitto, serve, peers):
    await serve(mqtt_settings(mosquitto))
    # A persistent session: replies that come while the test client is away are kept for it.
    peer = peers(mosquitto, client_id="stream-tester", session_expiry=600)
    replies = await peer.ready()
    n, stop_at, start_at = 40, 15, 25
    for i in range(n):
        if i == stop_at:
            await asyncio.to_thread(mosquitto.stop)  # SIGTERM: the broker saves its sessions
        if i == start_at:
            await asyncio.to_thread(mosquitto.start)
        peer.publish(
            f"appliance/{DEVICE}/infer/sample",
            body(SAMPLE),
            response_topic=replies,
            correlation=b"s%d" % i,
        )
        await asyncio.sleep(0.02)  # a steady pace, not a burst
    want = {b"s%d" % i for i in range(n)}
    msgs = await peer.wait(lambda ms: {m.correlation for m in replies_to(replies, ms)} >= want)
    got = replies_to(replies, msgs)
    assert all(m.status == 200 for m in got), [(m.correlation, m.payload) for m in got]
    duplicates = len(got) - len({m.correlation for m in got})
    assert len(got) >= n, f"{len(got)} replies for {n} requests ({duplicates} duplicates)"


def test_requests_queued_while_the_appliance_is_away_are_answered(store, mosquitto, peers):
    peer = peers(mosquitto)
    replies = f"replies/{uuid.uuid4().hex}"
    peer.subscribe(replies)
    peer.subscribe("appliance/away/status")
    # Connect once, so the broker keeps the appliance's session (and subscription) for it.
    server = appliance_process(store, mosquitto, "away")
    peer.wait_for(online("away"))
    mark = peer.mark()
    assert stop_server_process(server) == 0
    peer.wait_for(offline("away"), since=mark)
    n = 20
    infos = [
        peer.publish(
            "appliance/away/infer/sample",
            body(SAMPLE),
            response_topic=replies,
            correlation=b"q%d" % i,
        )
        for i in range(n)
    ]
    for info in infos:
        info.wait_for_publish(TIMEOUT)  # the broker holds them (PUBACK)
    assert not replies_to(replies, peer.messages)
    server = appliance_process(store, mosquitto, "away")
    try:
        want = {b"q%d" % i for i in range(n)}
        msgs = peer.wait_for(lambda ms: {m.correlation for m in replies_to(replies, ms)} >= want)
    finally:
        stop_server_process(server)
    got = replies_to(replies, msgs)
    bad = [(m.correlation, m.payload) for m in got if m.status != 200]
    assert not bad, f"queued requests answered with errors: {bad}"


# -- 7. a broker that is down at start-up -------------------------------------------------------
async def test_broker_down_at_start_up(mosquitto_factory, serve, peers, caplog):
    caplog.set_level(logging.INFO, logger="appliance.mqtt")
    broker = mosquitto_factory(start=False)
    client = await serve(mqtt_settings(broker))
    r = await client.get("/v2/health/ready")
    assert r.status == 200  # the HTTP side does not wait for the broker
    status, _ = await http_json(client, "/v2/models/sample/infer", body(SAMPLE))
    assert status == 200
    assert "appliance_mqtt_connected 0.0" in await metrics_text(client)
    await asyncio.to_thread(broker.start)
    peer = peers(broker)
    replies = await peer.ready()  # it connected by itself
    peer.publish(
        f"appliance/{DEVICE}/infer/sample",
        body(SAMPLE),
        response_topic=replies,
        correlation=b"late",
    )
    assert (await peer.reply(replies, b"late")).status == 200
    assert "appliance_mqtt_connected 1.0" in await metrics_text(client)
    assert any("cannot reach the MQTT broker" in r.getMessage() for r in caplog.records)


# -- 8. overload --------------------------------------------------------------------------------
GATED = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1, 2]}]}


async def test_overload_is_answered_with_503(mosquitto, serve, peers, gated):
    client = await serve(mqtt_settings(mosquitto, max_inflight=1), gated)
    peer = peers(mosquitto)
    old = peers(mosquitto, v5=False)
    replies = f"replies/{uuid.uuid4().hex}"
    peer.subscribe(replies)
    old.subscribe(replies)
    peer.subscribe(f"appliance/{DEVICE}/status")
    await peer.wait(online(DEVICE))
    topic = f"appliance/{DEVICE}/infer/gated"
    peer.publish(topic, body(GATED), response_topic=replies, correlation=b"first")
    assert await asyncio.to_thread(GatedBackend.started.acquire, True, TIMEOUT), "never ran"
    # The one request allowed is running: the next ones are refused at once, never ignored.
    peer.publish(topic, body(GATED), response_topic=replies, correlation=b"second")
    reply = await peer.reply(replies, b"second")
    assert reply.status == 503 and "max_inflight 1" in reply.json()["error"]
    old.publish(topic, body({**GATED, "id": "third", "reply_to": replies}))
    msgs = await old.wait(lambda ms: any(m.json().get("id") == "third" for m in ms))
    third = next(m.json() for m in msgs if m.json().get("id") == "third")
    assert third["status"] == 503 and "max_inflight 1" in third["error"]
    GatedBackend.gate.set()
    reply = await peer.reply(replies, b"first")
    assert reply.status == 200 and reply.json()["outputs"][0]["data"] == [2.0, 4.0]

    # A burst: every request gets a result or an overload reply, none is left unanswered.
    GatedBackend.delay = 0.005
    n = 20
    mark = peer.mark()
    for i in range(n):
        peer.publish(topic, body(GATED), response_topic=replies, correlation=b"b%d" % i)
    want = {b"b%d" % i for i in range(n)}
    msgs = await peer.wait(lambda ms: {m.correlation for m in ms} >= want, since=mark)
    statuses = [m.status for m in msgs if m.correlation in want]
    assert len(statuses) == n and set(statuses) <= {200, 503}, statuses
    text = await metrics_text(client)
    assert re.search(r'appliance_mqtt_requests_total\{outcome="overloaded"\} [1-9]', text)


async def test_client_deadlines_by_user_property_and_message_expiry(mosquitto, serve, peers, gated):
    """A request that cannot finish in time is answered 504 (the model here never finishes
    while the gate is shut); a bad timeout is a 400 naming the property."""
    await serve(mqtt_settings(mosquitto), gated)
    peer = peers(mosquitto)
    replies = await peer.ready()
    topic = f"appliance/{DEVICE}/infer/gated"
    peer.publish(topic, body(GATED), response_topic=replies, correlation=b"bad",
                 user=[("request-timeout-ms", "soon")])  # fmt: skip
    reply = await peer.reply(replies, b"bad")
    assert reply.status == 400
    assert reply.json()["error"] == (
        "request-timeout-ms must be a positive number of milliseconds, got 'soon'"
    )
    peer.publish(topic, body(GATED), response_topic=replies, correlation=b"ms",
                 user=[("request-timeout-ms", "300")])  # fmt: skip
    reply = await peer.reply(replies, b"ms")
    assert reply.status == 504 and "timed out after 0.3 s" in reply.json()["error"]
    peer.publish(topic, body(GATED), response_topic=replies, correlation=b"expiry", expiry_s=1)
    reply = await peer.reply(replies, b"expiry")
    assert reply.status == 504 and "timed out after 1 s" in reply.json()["error"]
    GatedBackend.gate.set()


# -- 9. TLS with a self-made CA and a password --------------------------------------------------
async def test_tls_and_password(mosquitto_factory, serve, peers, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="appliance.mqtt")
    certs = make_certificates(tmp_path / "certs")
    broker = mosquitto_factory(users={"appliance": "s3cret:/@", "tester": "pw"}, tls=certs)
    peer = peers(broker, username="tester", password="pw")
    replies = f"replies/{uuid.uuid4().hex}"
    peer.subscribe(replies)
    peer.subscribe("appliance/+/status")
    url = f"mqtts://appliance:s3cret%3A%2F%40@127.0.0.1:{broker.tls_port}"
    await serve({"mqtt": {**mqtt_settings(broker)["mqtt"], "url": url, "ca_file": str(certs.ca)}})
    await peer.wait(online(DEVICE))
    peer.publish(
        f"appliance/{DEVICE}/infer/sample", body(SAMPLE), response_topic=replies, correlation=b"tls"
    )
    assert (await peer.reply(replies, b"tls")).status == 200

    # A wrong password: refused, logged, and HTTP goes on serving.
    bad_url = f"mqtts://appliance:wrong@127.0.0.1:{broker.tls_port}"
    client = await serve(
        {
            "mqtt": {
                **mqtt_settings(broker, "refused")["mqtt"],
                "url": bad_url,
                "ca_file": str(certs.ca),
            }
        }
    )
    for _ in range(int(TIMEOUT / 0.05)):
        if any("refused the connection" in r.getMessage() for r in caplog.records):
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail("the refusal was never logged")
    status, _ = await http_json(client, "/v2/models/sample/infer", body(SAMPLE))
    assert status == 200
    assert (await client.get("/v2/health/ready")).status == 200
    assert "appliance_mqtt_connected 0.0" in await metrics_text(client)


# -- 10. shared subscription --------------------------------------------------------------------
async def test_shared_group_answers_each_request_once(mosquitto, serve, peers):
    a = await serve(mqtt_settings(mosquitto, "dev-a", shared_group="g"))
    b = await serve(mqtt_settings(mosquitto, "dev-b", shared_group="g"))
    peer = peers(mosquitto)
    replies = f"replies/{uuid.uuid4().hex}"
    peer.subscribe(replies)
    peer.subscribe("appliance/+/status")
    await peer.wait(lambda ms: online("dev-a")(ms) and online("dev-b")(ms))
    n = 20
    for i in range(n):
        peer.publish(
            "appliance/groups/g/infer/sample",
            body(SAMPLE),
            response_topic=replies,
            correlation=b"g%d" % i,
        )
    want = {b"g%d" % i for i in range(n)}
    await peer.wait(lambda ms: {m.correlation for m in replies_to(replies, ms)} >= want)
    # A request straight to each device, then count: a duplicate would have come first.
    for dev in ("dev-a", "dev-b"):
        peer.publish(
            f"appliance/{dev}/infer/sample",
            body(SAMPLE),
            response_topic=replies,
            correlation=dev.encode(),
        )
        await peer.reply(replies, dev.encode())
    got = [m.correlation for m in replies_to(replies, peer.messages)]
    assert sorted(c for c in got if c in want) == sorted(want)  # each exactly once
    served = []
    for client in (a, b):
        m = re.search(
            r'appliance_mqtt_requests_total\{outcome="success"\} (\d+)', await metrics_text(client)
        )
        assert m is not None
        served.append(int(m.group(1)) - 1)  # less the direct request
    assert sum(served) == n and min(served) > 0, served


# -- the README's command-line examples ---------------------------------------------------------
async def test_mosquitto_pub_examples(mosquitto, serve, peers):
    pub = require_tool("mosquitto_pub")
    await serve(mqtt_settings(mosquitto))
    peer = peers(mosquitto)
    peer.subscribe("replies/me")
    peer.subscribe(f"appliance/{DEVICE}/status")
    await peer.wait(online(DEVICE))
    request = {
        "inputs": [
            {"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [5.1, 3.5, 1.4, 0.2]}
        ]
    }
    topic = f"appliance/{DEVICE}/infer/sample"
    port = str(mosquitto.port)
    v5 = [
        pub,
        "-p",
        port,
        "-V",
        "5",
        "-q",
        "1",
        "-t",
        topic,
        "-D",
        "publish",
        "response-topic",
        "replies/me",
        "-D",
        "publish",
        "correlation-data",
        "req-1",
        "-m",
        orjson.dumps(request).decode(),
    ]
    v311 = [
        pub,
        "-p",
        port,
        "-V",
        "311",
        "-q",
        "1",
        "-t",
        topic,
        "-m",
        orjson.dumps({"reply_to": "replies/me", "id": "req-2", **request}).decode(),
    ]
    for argv in (v5, v311):
        proc = await asyncio.create_subprocess_exec(*argv)
        assert await asyncio.wait_for(proc.wait(), TIMEOUT) == 0
    msgs = await peer.wait(lambda ms: len(replies_to("replies/me", ms)) >= 2)
    first, second = replies_to("replies/me", msgs)
    assert first.correlation == b"req-1" and first.status == 200
    assert second.json()["id"] == "req-2" and second.json()["model_name"] == "sample"


# -- large replies under load -------------------------------------------------------------------
@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
async def test_large_replies_under_load(mosquitto_factory, serve, peers, tmp_path, tls):
    """Many large replies at once: only the network thread may write to the socket (writes
    from the event loop's thread as well interleaved packets and crashed OpenSSL)."""
    certs = make_certificates(tmp_path / "certs") if tls else None
    broker = mosquitto_factory(tls=certs)
    settings = mqtt_settings(broker)
    if certs is not None:
        settings["mqtt"].update(url=f"mqtts://127.0.0.1:{broker.tls_port}", ca_file=str(certs.ca))
    await serve(settings)
    peer = peers(broker)
    replies = await peer.ready()
    payload = b"x" * 3_000_000
    n = 40
    for i in range(n):
        peer.publish(
            f"appliance/{DEVICE}/infer/strings/raw",
            payload,
            response_topic=replies,
            correlation=b"%d" % i,
        )
    want = {b"%d" % i for i in range(n)}
    msgs = await peer.wait(
        lambda ms: {m.correlation for m in replies_to(replies, ms)} >= want, timeout=60
    )
    for m in replies_to(replies, msgs):
        assert m.status == 200
        assert len(m.payload) > len(payload)


# -- the event loop drives paho -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("content_type", "correlation", "user"),
    [
        ("application/json", b"7", [("status", "200"), ("request-id", "0" * 32)]),
        ("text/csv; charset=utf-8", None, [("status", "404"), ("request-id", "r-1")]),
        # a length past 127 bytes takes two bytes; text beyond ASCII counts in UTF-8 bytes
        ("application/json", bytes(range(256)) * 3, [("status", "200"), ("request-id", "ü" * 60),
         ("traceparent", "00-" + "a" * 32 + "-" + "b" * 16 + "-01")]),
    ],
)  # fmt: skip
def test_reply_properties_are_what_paho_would_send(content_type, correlation, user):
    """The replies' properties, encoded by the appliance, byte for byte as paho's Properties
    would encode them, and read back by paho as set."""
    from appliance.api.mqtt import reply_properties

    props = Properties(PacketTypes.PUBLISH)
    props.ContentType = content_type
    if correlation is not None:
        props.CorrelationData = correlation
    props.UserProperty = user
    packed = reply_properties(content_type, correlation, user)
    assert packed == props.pack()
    back = Properties(PacketTypes.PUBLISH)
    back.unpack(packed)
    assert getattr(back, "ContentType", None) == content_type
    assert getattr(back, "UserProperty", None) == user
    assert getattr(back, "CorrelationData", None) == correlation


async def test_keepalive_pings_from_the_event_loop(mosquitto_factory, serve, peers, caplog):
    """paho's keepalive pings come from a timer on the event loop: an idle connection pings
    the broker once a keepalive and stays up."""
    caplog.set_level(logging.INFO, logger="appliance.mqtt")
    broker: Mosquitto = mosquitto_factory(debug=True)
    await serve(mqtt_settings(broker, keepalive_s=1))
    peer = peers(broker)
    replies = await peer.ready()
    mark = peer.mark()

    def pings() -> int:
        return broker.log_text().count(f"Received PINGREQ from {DEVICE}")

    async def two_pings() -> None:
        while pings() < 2:  # mosquitto writes its log as it goes
            await asyncio.sleep(0.1)

    await asyncio.wait_for(two_pings(), TIMEOUT)
    peer.publish(f"appliance/{DEVICE}/infer/sample", body(SAMPLE), response_topic=replies,
                 correlation=b"after")  # fmt: skip
    assert (await peer.reply(replies, b"after", since=mark)).status == 200
    assert not offline(DEVICE)(peer.messages[mark:])
    assert not any("lost the MQTT broker" in r.getMessage() for r in caplog.records)
