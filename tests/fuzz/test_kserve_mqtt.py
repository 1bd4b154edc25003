"""KServe v2 requests over MQTT 5 to a real mosquitto and `appliance serve --mqtt`: every
request gets a reply (never silence), its `status` user property is never a 5xx, and a broken
field is a 400 naming it, exactly as over HTTP."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from tests.api.test_mqtt import Msg, Peer
from tests.conftest import ServerProcess
from tests.support.mosquitto import Mosquitto

from . import schemas
from .conftest import DEVICE
from .fronts import assert_clean_log, next_correlation
from .kserve import response_errors, valid_requests
from .mutate import Mutation, dumps, mutations
from .oracle import judge, own_deadline
from .test_kserve_http import GOOD, MODELS

TIMEOUT = 20.0
#: What mosquitto lets a string hold: it drops a client that sends control characters or
#: Unicode noncharacters (and the client's retry of the message then drops it again).
MQTT_TEXT = st.text(
    st.characters(exclude_categories=("Cc", "Cs")).filter(
        lambda c: not (0xFDD0 <= ord(c) <= 0xFDEF or ord(c) & 0xFFFE == 0xFFFE)
    ),
    max_size=6,
)


def _no_delay(client: Any, userdata: Any, sock: Any) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Requester:
    """A paho client that sends one request at a time and waits for its reply."""

    def __init__(self, broker: Mosquitto) -> None:
        self.peer = Peer(broker)
        # paho never sets TCP_NODELAY: without it each round trip waits out a delayed ACK
        self.peer.client.on_socket_open = _no_delay
        self.peer.start()
        self.replies = "fuzz/replies"
        self.peer.subscribe(self.replies)
        self.peer.subscribe(f"appliance/{DEVICE}/status")

    def send(
        self, route: str, payload: bytes, content_type: str | None = None,
        user: list[tuple[str, str]] | None = None, qos: int = 1,
    ) -> tuple[int, Any]:  # fmt: skip
        corr = next_correlation()
        since = self.peer.mark()
        self.peer.publish(
            f"appliance/{DEVICE}/infer/{route}", payload, response_topic=self.replies,
            correlation=corr, content_type=content_type, user=user, qos=qos,
        )  # fmt: skip

        def mine(ms: list[Msg]) -> bool:
            return any(m.correlation == corr for m in ms)

        assert self.peer.connected.is_set(), "the broker dropped the test's client"
        reply = next(m for m in self.peer.wait_for(mine, TIMEOUT, since) if m.correlation == corr)
        assert reply.status is not None, reply
        return reply.status, reply.json()


@pytest.fixture(scope="module")
def mqtt(fast_server: ServerProcess, broker: Mosquitto) -> Iterator[Any]:
    requester = Requester(broker)
    # the appliance is online with every model loaded before the first request
    requester.peer.wait_for(
        lambda ms: any(
            m.topic.endswith("/status") and m.json().get("status") == "online"
            and all(x["status"] == "ready" for x in m.json().get("models", []))
            for m in ms
        ),
        TIMEOUT,
    )  # fmt: skip
    status, first = requester.send("sample", GOOD)
    assert status == 200, first
    seen = [assert_clean_log(fast_server)]

    def check() -> None:
        seen[0] = assert_clean_log(fast_server, seen[0])
        assert requester.send("sample", GOOD) == (200, first)

    requester.check = check  # type: ignore[attr-defined]
    yield requester
    requester.peer.close()
    assert_clean_log(fast_server, seen[0])


@given(data=st.data())
def test_valid_requests_over_mqtt(
    mqtt: Any, signatures: dict[str, Any], data: st.DataObject
) -> None:
    model = data.draw(st.sampled_from(MODELS), label="model")
    request = data.draw(
        valid_requests(signatures[model], binary_inputs=False, binary_outputs=False),
        label="request",
    )
    status, body = mqtt.send(model, orjson.dumps(request.body))
    assert status == 200, body
    assert not response_errors(body), body
    mqtt.check()


@given(data=st.data())
def test_broken_fields_over_mqtt(
    mqtt: Any, signatures: dict[str, Any], data: st.DataObject
) -> None:
    model = data.draw(st.sampled_from(MODELS), label="model")
    request = data.draw(valid_requests(signatures[model], binary_inputs=False), label="request")
    mutation: Mutation = data.draw(mutations(request.body), label="mutation")
    status, body = mqtt.send(model, mutation.wire())
    judge(mutation, status, str(body.get("error")), schemas.oip(), "inference_request")
    mqtt.check()


@given(data=st.data())
def test_any_schema_valid_body_over_mqtt(mqtt: Any, data: st.DataObject) -> None:
    model = data.draw(st.sampled_from(MODELS), label="model")
    body = data.draw(schemas.oip().valid_values("inference_request"), label="body")
    status, reply = mqtt.send(model, dumps(body))
    event(f"status {status}")
    if not own_deadline(body, status, str(reply.get("error"))):
        assert status < 500, (body, status, reply)
    mqtt.check()


@given(data=st.data())
def test_raw_payloads(mqtt: Any, data: st.DataObject) -> None:
    """Raw payloads (the model's one input as bytes, or a picture) and their user properties:
    whatever the bytes, a 4xx or a 200."""
    model = data.draw(st.sampled_from(["sample", "strings", "fp16", "classifier", "multi_io"]))
    payload = data.draw(st.binary(max_size=64), label="payload")
    ctype = data.draw(
        st.sampled_from([None, "application/octet-stream", "image/png", "image/jpeg"])
    )
    user = data.draw(
        st.lists(
            st.tuples(
                st.sampled_from(["top_k", "softmax", "raw_quantized", "request-timeout-ms", "x"]),
                MQTT_TEXT,
            ),
            max_size=3,
        ),
        label="user properties",
    )
    route = model if ctype else f"{model}/raw"
    status, reply = mqtt.send(route, payload, ctype, user)
    event(f"status {status}")
    assert status < 500, (route, payload, ctype, user, status, reply)
    mqtt.check()


@given(payload=st.binary(max_size=200))
def test_bytes_that_are_not_json_over_mqtt(mqtt: Any, payload: bytes) -> None:
    status, reply = mqtt.send("sample", payload)
    assert status == 400, (payload, status, reply)
    mqtt.check()


#: Topic levels after `infer/` that name no model, or name one oddly.
ODD_ROUTES = [
    "", "/", "sample/", "sample/versions", "sample/versions/", "sample/versions/..",
    "sample/versions/ACTIVE", "sample/versions/999", "ACTIVE", "..", "sample/raw/raw",
    "sample//raw", "x" * 300, "sample/versions/1/extra", "\u00e9t\u00e9", " sample",
]  # fmt: skip


@given(
    route=st.sampled_from(ODD_ROUTES) | st.lists(MQTT_TEXT, min_size=1, max_size=4).map("/".join)
)
def test_odd_topics_get_error_replies(mqtt: Any, route: str) -> None:
    """Any topic under the subscribed prefix: a reply (4xx, or 200 for one that names a model
    after all), never silence and never a 5xx."""
    if "+" in route or "#" in route or "\x00" in route:
        route = route.replace("+", "p").replace("#", "h").replace("\x00", "")
    status, reply = mqtt.send(route, GOOD)
    event(f"status {status}")
    assert status == 200 or 400 <= status < 500, (route, status, reply)
    if status != 200:
        assert reply["error"], reply
    mqtt.check()


@pytest.mark.parametrize("qos", [0, 1, 2])
def test_every_qos_gets_its_reply(mqtt: Any, qos: int) -> None:
    assert mqtt.send("sample", GOOD, qos=qos)[0] == 200
    status, reply = mqtt.send("sample", b'{"inputs": 7}', qos=qos)
    assert status == 400 and "inputs" in reply["error"], reply
    mqtt.check()


@pytest.mark.parametrize(
    ("payload", "status"),
    [
        (b"[" * 200_000 + b"]" * 200_000, 400),
        (b'{"inputs": ' + b"[" * 10_000 + b"]" * 10_000 + b"}", 400),
        (GOOD.replace(b"[1,2,3,4]", b"[NaN,2,3,4]"), 400),
        (GOOD.replace(b"[1,2,3,4]", b"[1e999,2,3,4]"), 400),
        (b'{"id": "\\ud800", "inputs": []}', 400),
        (b" " * (16 * 1024 * 1024 + 1), 413),  # past [mqtt] max_payload_bytes (16 MiB)
    ],
    ids=["deep", "deep-field", "nan", "1e999", "surrogate", "oversized"],
)  # fmt: skip
def test_deep_odd_and_oversized_json(mqtt: Any, payload: bytes, status: int) -> None:
    got, reply = mqtt.send("sample", payload)
    assert got == status, (got, reply)
    mqtt.check()


@pytest.fixture(scope="module")
def mqtt311(fast_server: ServerProcess, broker: Mosquitto) -> Iterator[Peer]:
    peer = Peer(broker, v5=False).start()
    peer.subscribe("fuzz/replies311")
    yield peer
    peer.client.disconnect()
    peer.client.loop_stop()


@given(data=st.data())
def test_mqtt_311_requests(
    mqtt311: Peer, mqtt: Any, signatures: dict[str, Any], data: st.DataObject
) -> None:
    """MQTT 3.1.1 (no properties): the reply address is `reply_to` in the JSON. A request
    broken in one place, with its reply_to and id kept: a reply, never a 5xx. Bytes that are
    no JSON have no reply address: no reply, and the server goes on."""
    model = data.draw(st.sampled_from(MODELS), label="model")
    request = data.draw(valid_requests(signatures[model], binary_inputs=False), label="request")
    mutation: Mutation = data.draw(mutations(request.body), label="mutation")
    rid = next_correlation().decode()
    topic = f"appliance/{DEVICE}/infer/{model}"
    try:
        body = orjson.loads(mutation.wire())
    except orjson.JSONDecodeError:
        body = None
    since = mqtt311.mark()
    if isinstance(body, dict):
        body.update(reply_to="fuzz/replies311", id=rid)
        mqtt311.publish(topic, dumps(body), qos=data.draw(st.sampled_from([0, 1, 2])))
        got = mqtt311.wait_for(
            lambda ms: any(m.json().get("id") == rid for m in ms), TIMEOUT, since
        )
        reply = next(m.json() for m in got if m.json().get("id") == rid)
        event(f"status {reply.get('status', 200)}")
        assert reply.get("status", 200) < 500, reply
    else:
        mqtt311.publish(topic, mutation.wire())
    mqtt.check()
