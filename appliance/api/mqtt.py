"""The MQTT interface (paho-mqtt) for IoT devices: the same engine, codec and errors as HTTP.

Topics (prefix and device id from [mqtt]):
  <prefix>/<device>/infer/<model>[/versions/<v>][/raw]   requests (QoS 1 by default); a raw
      payload to a model that declares image pre-processing is a JPEG/PNG, and MQTT 5 user
      properties (top_k, softmax, raw_quantized) are its request parameters
  <prefix>/groups/<group>/infer/<model>...               the same, as a shared subscription
  <prefix>/<device>/status                               retained: online (JSON) / offline (will)
Replies go to the MQTT 5 Response Topic with the Correlation Data copied back, or, in MQTT 3.1.1,
to the `reply_to` topic named in the JSON request (its `id` comes back in the reply).

Event loop integration: paho is driven by the asyncio loop itself (its documented external-loop
mode: `loop_read` when the socket is readable, `loop_write` when there is something to send,
`loop_misc` once a second for keepalive pings), so a request goes from the socket to the engine
and its reply back to the socket on one thread, with no hand-off between threads (two of them
per request cost about a third of the round trip at the floor, issue 22). What keeps the loop
from waiting on the network: the blocking part, connecting (DNS, TCP, the TLS handshake), runs in
a worker thread; afterwards the socket is non-blocking and paho only reads what is there and
writes what the socket takes. Reconnecting is ours, not paho's: exponential backoff with jitter,
so a fleet does not hammer a broker that comes back.

Delivery: requests are acknowledged (manual PUBACK) only once their reply is queued, the session
is persistent (clean start off, a session expiry), so QoS 1 requests that arrive while the
appliance is away, or that were in progress when it lost the broker, are delivered again and
answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import random
import socket
import ssl
import threading
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import numpy as np
import orjson

from .. import __version__
from ..codec import InferRequest, decode_request, encode_response
from ..config import Config, MqttConfig
from ..errors import (
    ApplianceError,
    ConfigError,
    InferenceFailed,
    InvalidInput,
    NotFound,
    Overloaded,
    PayloadTooLarge,
)
from ..formats import JSON as JSON_FORMAT
from ..metrics import Metrics
from ..names import check_name
from ..preprocess.image import check_content_type
from ..request import Request, RequestPath
from ..routing import Router
from ..tensors import DATATYPES
from . import eager
from .images import PARAMETERS, image_input, images_request, text_parameters

log = logging.getLogger("appliance.mqtt")

JSON = "application/json"
RAW = "application/octet-stream"


@dataclass(slots=True)
class Incoming:
    """What a request needs of a received message (read-only; not frozen: a frozen
    dataclass's __init__ costs several times a plain one's, on every message)."""

    topic: str
    payload: bytes
    qos: int
    mid: int
    response_topic: str | None
    correlation: bytes | None
    content_type: str | None
    #: MQTT 5 user properties (request parameters such as top_k for raw payloads; a task's
    #: sticky key may travel as one).
    user_properties: tuple[tuple[str, str], ...] = ()
    #: MQTT 5 message expiry interval (seconds left when the broker delivered it).
    expiry_s: int | None = None


#: MQTT 5 user property with the request's timeout in milliseconds (HTTP's X-Request-Timeout-Ms).
TIMEOUT_PROPERTY = "request-timeout-ms"
#: MQTT 5 user property naming a request in the logs (HTTP's X-Request-Id), sent back in replies.
REQUEST_ID_PROPERTY = "request-id"
#: MQTT 5 user property with the request's priority level (1 = highest), when the JSON body's
#: `parameters.priority` is absent (raw payloads have no body to carry it).
PRIORITY_PROPERTY = "priority"
#: MQTT 5 user property naming the reply's format (json, xml, csv, or one of the model's
#: report templates: appliance/formats), when the JSON body's `parameters.format` is absent
#: (MQTT 3.1.1 clients use that). The reply's Content-Type property says which it is.
FORMAT_PROPERTY = "format"


@dataclass(frozen=True)
class Route:
    model: str
    version: str | None
    raw: bool


@dataclass(frozen=True)
class Broker:
    host: str
    port: int
    tls: bool
    username: str | None
    password: str | None


def parse_url(url: str) -> Broker:
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise ConfigError(f"mqtt.url = {url!r}: expected mqtt://host[:port] or mqtts://host[:port]")
    tls = parts.scheme == "mqtts"
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError:
        raise ConfigError(f"mqtt.url = {url!r}: bad port") from None
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    return Broker(parts.hostname, port, tls, user, password)


def device_id(cfg: MqttConfig) -> str:
    return cfg.device_id or socket.gethostname()


def parse_topic(topic: str, prefixes: list[str]) -> Route:
    """<prefix>/infer/<model>[/versions/<v>][/raw] -> Route; NotFound for any other shape,
    InvalidInput for a model name or version that breaks the name rule (appliance/names.py)."""
    for prefix in prefixes:
        if topic.startswith(prefix + "/infer/"):
            parts = topic[len(prefix) + len("/infer/") :].split("/")
            raw = len(parts) > 1 and parts[-1] == "raw"  # .../infer/raw is a model named raw
            if raw:
                parts = parts[:-1]
            if len(parts) == 1 and parts[0]:
                return Route(check_name(parts[0], "model name"), None, raw)
            if len(parts) == 3 and parts[1] == "versions" and parts[0] and parts[2]:
                model = check_name(parts[0], "model name")
                return Route(model, check_name(parts[2], "version"), raw)
    raise NotFound(f"topic {topic!r} names no model (expected .../infer/<model>)")


def raw_request(
    router: Router, route: Route, payload: bytes, content_type: str | None = None
) -> InferRequest:
    """A raw payload is the whole of a model's single input: bytes for BYTES, or a tensor, or
    an encoded image (JPEG/PNG) for a model that declares image pre-processing."""
    model = router.resolve(route.model, route.version)
    if content_type is not None and content_type.lower().startswith("image/"):
        check_content_type(payload, content_type)
        return images_request(image_input(model), [payload])
    if model.chain is not None and model.chain.image is not None:
        return images_request(model.chain.image.input, [payload])
    inputs = model.signature.inputs
    if len(inputs) != 1:
        raise InvalidInput(
            f"model {route.model!r} has {len(inputs)} inputs: raw payloads need exactly one"
        )
    spec = inputs[0]
    if spec.datatype == "BYTES":
        shape = tuple(1 if d < 0 else d for d in spec.shape)
        if int(np.prod(shape)) != 1:
            raise InvalidInput(f"input {spec.name!r} {list(spec.shape)} takes more than one item")
        item = np.empty(1, dtype=object)
        item[0] = payload
        return InferRequest({spec.name: item.reshape(shape)}, datatypes={spec.name: "BYTES"})
    dtype = DATATYPES[spec.datatype].newbyteorder("<")
    if len(payload) % dtype.itemsize:
        raise InvalidInput(
            f"raw payload of {len(payload)} bytes is not a whole number of {spec.datatype} values"
        )
    count = len(payload) // dtype.itemsize
    fixed = int(np.prod([d for d in spec.shape if d >= 0]))
    dynamic = [i for i, d in enumerate(spec.shape) if d < 0]
    dims = list(spec.shape)
    if dynamic:
        for i in dynamic[1:]:
            dims[i] = 1
        dims[dynamic[0]] = count // fixed if fixed else 0
    if int(np.prod(dims)) != count:
        raise InvalidInput(
            f"raw payload of {count} {spec.datatype} values does not fit input {spec.name!r} "
            f"{list(spec.shape)}"
        )
    tensor = np.frombuffer(payload, dtype=dtype).reshape(dims)
    return InferRequest({spec.name: tensor}, datatypes={spec.name: spec.datatype})


def _utf8(text: str) -> bytes:
    data = text.encode()
    return len(data).to_bytes(2, "big") + data


def reply_properties(
    content_type: str, correlation: bytes | None, user: list[tuple[str, str]]
) -> bytes:
    """A reply's MQTT 5 PUBLISH properties, encoded (MQTT 5.0 section 2.2.2): Content Type,
    Correlation Data, then the User Properties, in the order paho's `Properties.pack` writes
    them. Written here because building a paho `Properties` costs 30-60 µs a reply (each
    attribute is checked against its table by name), about a tenth of the round trip."""
    out = b"\x03" + _utf8(content_type)
    if correlation is not None:  # it came in a PUBLISH: at most 65,535 bytes
        out += b"\x09" + len(correlation).to_bytes(2, "big") + correlation
    for name, value in user:
        out += b"\x26" + _utf8(name) + _utf8(value)
    n, length = len(out), bytearray()  # the length as a Variable Byte Integer
    while True:
        n, digit = divmod(n, 128)
        length.append(digit | 0x80 if n else digit)
        if not n:
            return bytes(length) + out


class PackedProperties:
    """Properties already encoded, in place of a paho `Properties` (paho's publish only calls
    `pack`, again when it resends the message after a reconnect)."""

    __slots__ = ("packed",)

    def __init__(self, packed: bytes) -> None:
        self.packed = packed

    def pack(self) -> bytes:
        return self.packed

    def __str__(self) -> str:  # paho's debug log line
        return f"[packed properties: {len(self.packed)} bytes]"


def _is_image(content_type: str | None) -> bool:
    return content_type is not None and content_type.lower().startswith("image/")


def _no_socket_callback(client: Any, userdata: Any, sock: Any) -> None:
    pass


#: Topics whose parsed route is remembered (a model's answer may differ by topic: a model that
#: was not there may be loaded since, so only the parse is kept, never the model).
ROUTE_CACHE = 256
#: Seconds between two keepalive checks (paho's loop_misc: a PINGREQ when due, and a connection
#: whose PINGRESP is overdue is dropped).
KEEPALIVE_TICK_S = 1.0


class MqttService:
    """One broker connection serving inference requests; see the module docstring."""

    def __init__(self, config: Config, paths: RequestPath, metrics: Metrics) -> None:
        import paho.mqtt.client as mqtt

        self._mqtt = mqtt
        self.cfg = cfg = config.mqtt
        self.broker = parse_url(cfg.url)
        self.paths = paths
        self.engine = paths.engine
        self.metrics = metrics
        self.device = device_id(cfg)
        self.v5 = cfg.protocol == "5"
        base = f"{cfg.topic_prefix}/{self.device}"
        self.status_topic = f"{base}/status"
        self.prefixes = [base]
        self.subscriptions = [f"{base}/infer/#"]
        if cfg.shared_group:
            group = f"{cfg.topic_prefix}/groups/{cfg.shared_group}"
            self.prefixes.append(group)
            self.subscriptions.append(f"$share/{cfg.shared_group}/{group}/infer/#")
        self.connected = threading.Event()
        self._closing = False
        self._attempt = 0
        self._inflight = 0
        #: The requests that had to wait (a queued model): eager.start made them a Task.
        self._tasks: set[asyncio.Task[None]] = set()
        #: paho is reading (`_readable`): the messages it delivers wait in `_arrived` until
        #: `loop_read` returns, and are started then, outside paho's callback lock.
        self._reading = False
        self._arrived: list[Incoming] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._runner: asyncio.Task[None] | None = None
        self._stopped: asyncio.Event | None = None
        self._lost: asyncio.Event | None = None
        #: The socket's descriptor while it is watched by the loop, else None.
        self._fd: int | None = None
        self._tls_sock: Any = None
        self._writer = False
        self._flush_soon = False
        self._keepalive: asyncio.TimerHandle | None = None
        self._routes: dict[str, Route] = {}
        # often enough for paho to ping within a keepalive (the broker allows 1.5 of them)
        keepalive = cfg.keepalive_s
        self._tick_s = min(KEEPALIVE_TICK_S, keepalive / 4) if keepalive > 0 else KEEPALIVE_TICK_S
        self.client = self._make_client()

    # -- paho, driven by the loop ------------------------------------------------------------
    def _make_client(self) -> Any:
        mqtt = self._mqtt
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=self.cfg.client_id or self.device,
            protocol=mqtt.MQTTv5 if self.v5 else mqtt.MQTTv311,
            clean_session=None if self.v5 else False,
            reconnect_on_failure=False,
            manual_ack=True,
        )
        if self.broker.username is not None:
            client.username_pw_set(self.broker.username, self.broker.password)
        if self.broker.tls:
            client.tls_set(
                ca_certs=self.cfg.ca_file or None,
                certfile=self.cfg.cert_file or None,
                keyfile=self.cfg.key_file or None,
            )
        offline = orjson.dumps({"status": "offline", "device_id": self.device})
        client.will_set(self.status_topic, offline, qos=1, retain=True)
        # paho's outgoing queue is unbounded by default: bound it by the work we allow. Replies
        # wait there for their PUBACK, and a burst of (small) overload replies is not bounded by
        # max_inflight: a floor keeps them from being dropped.
        client.max_queued_messages_set(max(self.cfg.max_inflight * 4, 1000))
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        # publish() and ack() only queue their packets; the loop writes them (see _flush).
        client.on_socket_register_write = self._on_want_write
        client.on_socket_unregister_write = _no_socket_callback
        return client

    @staticmethod
    def _on_socket_open(client: Any, userdata: Any, sock: Any) -> None:
        # paho never sets TCP_NODELAY: without it a QoS 1 round trip waits 40-90 ms (Nagle
        # against delayed ACK).
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _connect(self) -> None:
        if self.v5:
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = self.cfg.session_expiry_s
            self.client.connect(
                self.broker.host, self.broker.port, self.cfg.keepalive_s,
                clean_start=False, properties=props,
            )  # fmt: skip
        else:
            self.client.connect(self.broker.host, self.broker.port, self.cfg.keepalive_s)

    async def _backoff(self) -> None:
        """Wait before the next attempt: doubling from reconnect_min_s, capped, full jitter."""
        assert self._stopped is not None
        cap = min(self.cfg.reconnect_max_s, self.cfg.reconnect_min_s * 2**self._attempt)
        self._attempt += 1
        delay = random.uniform(self.cfg.reconnect_min_s, max(cap, 1e-3))  # noqa: S311
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopped.wait(), delay)

    async def _run(self) -> None:
        """Connect, serve until the connection is lost, back off, connect again."""
        assert self._stopped is not None
        while not self._stopped.is_set():
            self._lost = lost = asyncio.Event()
            try:
                # blocking (DNS, TCP, TLS handshake): never on the loop
                await asyncio.to_thread(self._connect)
            except (OSError, ssl.SSLError, ValueError) as exc:
                log.warning("cannot reach the MQTT broker %s:%d: %s", self.broker.host,
                            self.broker.port, exc)  # fmt: skip
                await self._backoff()
                continue
            self._attach()
            if self._stopped.is_set():  # stop() came while connecting: leave at once
                self.client.disconnect()
                self._flush()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(lost.wait(), 2)
                break
            await lost.wait()
            self.connected.clear()
            if not self._stopped.is_set():
                await self._backoff()
        self._detach()

    def _attach(self) -> None:
        """Watch the new connection's socket from the loop and send what connect() queued."""
        sock = self.client.socket()
        loop = self._loop
        if sock is None or loop is None:  # closed already (paho calls on_socket_close)
            if self._lost is not None:
                self._lost.set()
            return
        self._fd = sock.fileno()
        self._tls_sock = sock if isinstance(sock, ssl.SSLSocket) else None
        loop.add_reader(self._fd, self._readable)
        self._keepalive = loop.call_later(self._tick_s, self._tick)
        self._flush()

    def _detach(self) -> None:
        fd, loop = self._fd, self._loop
        if fd is None or loop is None:
            return
        self._fd = self._tls_sock = None
        loop.remove_reader(fd)
        if self._writer:
            loop.remove_writer(fd)
            self._writer = False
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None

    def _on_socket_close(self, client: Any, userdata: Any, sock: Any) -> None:
        # On the loop's thread for a connection it watched (lost, refused, or our DISCONNECT
        # written); a failed connect in the worker thread had nothing watched.
        if threading.get_ident() != self._loop_thread:
            return
        self._detach()
        if self._lost is not None:
            self._lost.set()

    def _readable(self) -> None:
        client = self.client
        self._reading = True
        try:
            client.loop_read()
            # TLS: decrypted bytes already read from the socket wake no reader
            while self._tls_sock is not None and self._tls_sock.pending() > 0:
                if client.loop_read() != self._mqtt.MQTT_ERR_SUCCESS:
                    break
        finally:
            self._reading = False
            arrived = self._arrived
            if arrived:
                self._arrived = []
                for m in arrived:
                    self._dispatch(m, at_once=True)

    def _on_want_write(self, client: Any, userdata: Any, sock: Any) -> None:
        """paho queued a packet: write it soon, from the loop (one flush for all queued in one
        pass of the loop). The worker thread's CONNECT is written by _attach."""
        if (
            self._fd is not None
            and not self._flush_soon
            and not self._writer
            and threading.get_ident() == self._loop_thread
        ):
            assert self._loop is not None
            self._flush_soon = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Write what paho queued; what the socket does not take waits for it to be writable."""
        self._flush_soon = False
        if self._fd is None:
            return
        client = self.client
        if client.want_write():
            client.loop_write()
        loop = self._loop
        assert loop is not None
        fd = self._fd
        if fd is None:  # paho closed it (a DISCONNECT written, or an error)
            return
        if client.want_write():
            if not self._writer:
                loop.add_writer(fd, self._flush)
                self._writer = True
        elif self._writer:
            loop.remove_writer(fd)
            self._writer = False

    def _tick(self) -> None:
        self._keepalive = None
        if self._fd is None:
            return
        self.client.loop_misc()  # may close the connection (no PINGRESP in time)
        if self._fd is not None and self._loop is not None:
            self._keepalive = self._loop.call_later(self._tick_s, self._tick)

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            log.error("the MQTT broker refused the connection: %s", reason)
            return
        self._attempt = 0
        for topic in self.subscriptions:  # paho does not resubscribe by itself
            client.subscribe(topic, qos=self.cfg.qos)
        client.publish(self.status_topic, self._online(), qos=1, retain=True)
        self.connected.set()
        self.metrics.mqtt_connected = 1
        log.info("connected to the MQTT broker %s:%d as %s (session present: %s)",
                 self.broker.host, self.broker.port, self.device,
                 getattr(flags, "session_present", "?"))  # fmt: skip

    def _on_disconnect(
        self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        self.connected.clear()
        self.metrics.mqtt_connected = 0
        if not self._closing:
            log.warning("lost the MQTT broker (%s); reconnecting", reason)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        props = getattr(msg, "properties", None)
        # paho's Properties keeps the properties present as instance attributes: one dict
        # lookup each (getattr with a default raises and catches for each one absent)
        got: dict[str, Any] = vars(props) if props is not None else {}
        m = Incoming(
            msg.topic,
            bytes(msg.payload),
            msg.qos,
            msg.mid,
            got.get("ResponseTopic"),
            got.get("CorrelationData"),
            got.get("ContentType"),
            tuple(got.get("UserProperty") or ()),
            got.get("MessageExpiryInterval"),
        )
        if self._reading:
            self._arrived.append(m)
        else:
            self._dispatch(m, at_once=False)

    def _online(self) -> bytes:
        models = [
            {"name": m.name, "version": m.version, "status": m.status,
             "device": m.placement.device if m.placement else None}
            for m in self.paths.router.models()
        ]  # fmt: skip
        return orjson.dumps({
            "status": "online", "device_id": self.device, "version": __version__,
            "models": models,
            "since": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        })  # fmt: skip

    # -- asyncio side ------------------------------------------------------------------------
    def start(self) -> None:
        """Connect in the background: a broker that is down never delays the HTTP side."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._stopped = asyncio.Event()
        self._runner = self._loop.create_task(self._run())

    async def stop(self) -> None:
        self._closing = True
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(task), 5)
        offline = orjson.dumps({"status": "offline", "device_id": self.device})
        lost = self._lost
        if self.connected.is_set() and self._fd is not None:
            # the goodbye: the offline status, then DISCONNECT (paho closes after writing it)
            self.client.publish(self.status_topic, offline, qos=1, retain=True)
            self.client.disconnect()
            self._flush()
            if lost is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(lost.wait(), 2)
        if self._stopped is not None:
            self._stopped.set()
        if lost is not None:
            lost.set()
        if self._runner is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._runner, 10)
        self._detach()
        self.metrics.mqtt_connected = 0

    def announce(self) -> None:
        """Refresh the retained online status (e.g. once models finished loading)."""
        if self.connected.is_set():
            self.client.publish(self.status_topic, self._online(), qos=1, retain=True)

    def _begin(self, m: Incoming) -> Request:
        """A message into the request lifecycle: what its MQTT 5 user properties carry."""
        user = dict(m.user_properties)  # a repeated property: its last value counts
        return self.paths.begin(
            "mqtt", "PUBLISH", m.topic, "infer",
            request_id=user.get(REQUEST_ID_PROPERTY),
            traceparent=user.get("traceparent"),
            meta=user,
            timeout_ms=user.get(TIMEOUT_PROPERTY),
            priority=user.get(PRIORITY_PROPERTY),
            expiry_s=float(m.expiry_s) if m.expiry_s else None,
            timeout_name=TIMEOUT_PROPERTY,
            priority_name=PRIORITY_PROPERTY,
            format=user.get(FORMAT_PROPERTY),
            format_name=f"the user property {FORMAT_PROPERTY!r}",
        )  # fmt: skip

    def _dispatch(self, m: Incoming, at_once: bool) -> None:
        """Start handling a request. `at_once` (not inside a paho callback: a reply's flush
        may call back into paho, whose callback lock is not reentrant): run it right here
        (eager.start) until it answers or has to wait; else in a Task of its own."""
        if self._inflight >= self.cfg.max_inflight:
            req = self._begin(m)
            exc = Overloaded(
                f"{self._inflight} MQTT requests are in progress (max_inflight "
                f"{self.cfg.max_inflight}); retry later"
            )
            body = None  # an MQTT 3.1.1 request names its reply topic in its JSON
            if (
                not m.response_topic
                and m.content_type != RAW
                and not _is_image(m.content_type)
                and not m.topic.endswith("/raw")
            ):
                with contextlib.suppress(orjson.JSONDecodeError):
                    body = orjson.loads(m.payload)
            address = self._reply_address(m, body)
            self._reply_error(m, req, address, exc)
            self._finish(m, req, exc.status, address)
            return
        self._inflight += 1
        loop = self._loop
        assert loop is not None
        task = eager.start(self._handle(m), loop) if at_once else loop.create_task(self._handle(m))
        if task is None:
            return  # answered already
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _route(self, topic: str) -> Route:
        """parse_topic, remembered for the topics seen (a device's clients use a few)."""
        route = parse_topic(topic, self.prefixes)
        if len(self._routes) >= ROUTE_CACHE:  # a client inventing topics: start again
            self._routes.clear()
        self._routes[topic] = route
        return route

    def _reply_address(self, m: Incoming, body: Any) -> tuple[str | None, str | None]:
        """(reply topic, request id): MQTT 5 properties, else the JSON request's fields."""
        if m.response_topic:
            return m.response_topic, None
        if isinstance(body, dict):
            reply_to = body.get("reply_to")
            rid = body.get("id")
            return (reply_to if isinstance(reply_to, str) and reply_to else None,
                    rid if isinstance(rid, str) else None)  # fmt: skip
        return None, None

    async def _handle(self, m: Incoming) -> None:
        paths = self.paths
        req = self._begin(m)
        status = 200
        address: tuple[str | None, str | None] = (m.response_topic, None)
        try:
            try:
                if not self.engine.loaded:
                    await self._models_loaded()
                if len(m.payload) > self.cfg.max_payload_bytes:
                    raise PayloadTooLarge(
                        f"payload of {len(m.payload)} bytes is larger than the limit of "
                        f"{self.cfg.max_payload_bytes} bytes"
                    )
                route = self._routes.get(m.topic) or self._route(m.topic)
                raw = route.raw or m.content_type == RAW or _is_image(m.content_type)
                if not raw and not m.response_topic:
                    with contextlib.suppress(orjson.JSONDecodeError):
                        envelope = orjson.loads(m.payload)
                        address = self._reply_address(m, envelope)
                        if isinstance(envelope, dict) and paths.tracer is not None:
                            # MQTT 3.1.1: the trace context is a field of the JSON request
                            paths.carry(
                                req, envelope.get("traceparent"), envelope.get("tracestate")
                            )
                if raw:
                    request = raw_request(paths.router, route, m.payload, m.content_type)
                    # Other user properties (trace ids...) are the client's own business.
                    known = [
                        (k, v) for k, v in m.user_properties
                        if k in PARAMETERS and k != FORMAT_PROPERTY
                    ]  # fmt: skip
                    request.parameters.update(text_parameters(known))
                else:
                    request = decode_request(m.payload)
                # Replies are JSON: there is no header to frame binary outputs in.
                request.binary_output = False
                if request.outputs is not None:
                    request.outputs = dict.fromkeys(request.outputs, False)
                response = await paths.infer(req, route.model, route.version, request)
                if req.span is not None and not self.v5:  # no user properties to carry it
                    response = dataclasses.replace(
                        response,
                        parameters={
                            **(response.parameters or {}),
                            "traceparent": paths.reply_traceparent(req),
                        },
                    )
                content_type = JSON
                if req.format == JSON_FORMAT:
                    body, _ = encode_response(response, request)
                else:
                    body, content_type = await paths.encode(req, response, request)
                self._publish(address, body, m.correlation, 200, req, content_type)
            except ApplianceError as exc:
                status = paths.failed(req, exc)
                self._reply_error(m, req, address, exc)
        except Exception:
            paths.crashed(req)
            status = InferenceFailed.status
        finally:
            self._inflight -= 1
            if self._flush_soon:  # the reply leaves now; the PUBACK and the accounting after it
                self._flush()
            self._finish(m, req, status, address)
            if self._flush_soon:
                self._flush()

    async def _models_loaded(self) -> None:
        """Requests kept for us while we were away arrive as soon as we connect, usually before
        the models have loaded: they wait for the loader instead of getting "loading" (503)."""
        while not self.engine.loaded and not self._closing:
            await asyncio.sleep(0.05)

    def _finish(
        self, m: Incoming, req: Request, status: int, address: tuple[str | None, str | None]
    ) -> None:
        """Account for the request and acknowledge it, now that its reply (if any) is queued."""
        self.paths.finish(req, status, answered=bool(address[0]))
        if m.qos > 0:
            with contextlib.suppress(Exception):
                self.client.ack(m.mid, m.qos)

    def _reply_error(self, m: Incoming, req: Request, address: tuple[str | None, str | None],
                     exc: ApplianceError) -> None:  # fmt: skip
        body: dict[str, Any] = {"error": exc.message, "status": exc.status}
        if address[1] is not None:
            body["id"] = address[1]
        if req.span is not None and not self.v5:
            body["traceparent"] = self.paths.reply_traceparent(req)
        self._publish(address, orjson.dumps(body), m.correlation, exc.status, req)

    def _publish(self, address: tuple[str | None, str | None], body: bytes,
                 correlation: bytes | None, status: int, req: Request,
                 content_type: str = JSON) -> None:  # fmt: skip
        topic, _ = address
        if not topic:
            return
        props: Any = None
        if self.v5:
            # the request id: the client's own (a `request-id` user property) or a new one,
            # as HTTP's X-Request-Id; it names the request in the appliance's logs
            user = [("status", str(status)), (REQUEST_ID_PROPERTY, req.id)]
            if req.span is not None:  # the request's span, for the client's trace
                user.append(("traceparent", self.paths.reply_traceparent(req) or ""))
            props = PackedProperties(reply_properties(content_type, correlation, user))
        try:
            info = self.client.publish(topic, body, qos=self.cfg.qos, properties=props)
        except ValueError as exc:  # a wildcard or empty reply topic
            log.warning("cannot reply on %r: %s", topic, exc)
            return
        if info.rc == self._mqtt.MQTT_ERR_QUEUE_SIZE:
            log.warning("reply on %r dropped: the outgoing MQTT queue is full", topic)
