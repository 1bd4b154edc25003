"""The MQTT leg of `appliance bench --mqtt URL`: QoS 1 request/reply round trips through a broker.

A paho client (TCP_NODELAY, its own network thread) publishes the same KServe v2 JSON request the
HTTP leg sends, with an MQTT 5 Response Topic and Correlation Data, and waits for each reply
before sending the next, so the figure is a sequential round trip like the HTTP one.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from typing import Any

import orjson

from ..api.mqtt import parse_url
from .errors import BenchError


class MqttBenchError(BenchError):
    """The broker or the appliance did not answer as expected."""


def time_mqtt(
    url: str, device_id: str, model: str, body: bytes, warmup: int, requests: int, timeout_s: float
) -> list[int]:
    """Nanoseconds per round trip, after `warmup` untimed ones; every reply must be a result."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    broker = parse_url(url)
    reply_topic = f"bench/{os.getpid()}/reply"
    got = threading.Event()
    subscribed = threading.Event()
    online = threading.Event()
    status_topic = f"appliance/{device_id}/status"
    replies: list[bytes] = []

    from paho.mqtt.enums import CallbackAPIVersion

    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=f"bench-{os.getpid()}", protocol=mqtt.MQTTv5
    )
    if broker.username is not None:
        client.username_pw_set(broker.username, broker.password)
    if broker.tls:
        client.tls_set()

    def on_socket_open(_c: Any, _u: Any, sock: Any) -> None:
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def on_connect(c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if not reason.is_failure:
            c.subscribe([(reply_topic, 1), (status_topic, 1)])

    def on_subscribe(*_args: Any) -> None:
        subscribed.set()

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        if msg.topic == status_topic:  # retained: the appliance is subscribed once it is online
            if orjson.loads(msg.payload).get("status") == "online":
                online.set()
            return
        replies.append(bytes(msg.payload))
        got.set()

    client.on_socket_open = on_socket_open
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.connect(broker.host, broker.port, 60)
    client.loop_start()
    try:
        if not subscribed.wait(timeout_s):
            raise MqttBenchError(f"no subscription acknowledged by the broker at {url}")
        if not online.wait(timeout_s):
            raise MqttBenchError(f"the appliance never reported online on {status_topic}")
        topic = f"appliance/{device_id}/infer/{model}"
        samples: list[int] = []
        for i in range(warmup + requests):
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.ResponseTopic = reply_topic
            props.CorrelationData = str(i).encode()
            got.clear()
            t0 = time.perf_counter_ns()
            client.publish(topic, body, qos=1, properties=props)
            if not got.wait(timeout_s):
                raise MqttBenchError(f"no MQTT reply on {reply_topic} within {timeout_s:g} s")
            elapsed = time.perf_counter_ns() - t0
            reply = orjson.loads(replies.pop())
            if "error" in reply:
                raise MqttBenchError(f"the appliance answered over MQTT: {reply['error']}")
            if i >= warmup:
                samples.append(elapsed)
        return samples
    finally:
        client.loop_stop()
        client.disconnect()
