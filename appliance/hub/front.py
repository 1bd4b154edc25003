"""A lean HTTP/1.1 front for the two routes a fleet calls all the time: polls and uploads.

Why: once a poll costs no database query (polls.py), aiohttp's own machinery per request
(request and response objects, router, middleware chain, header multidicts) is most of what
the hub spends, about 75 µs of CPU per request here against about 20 µs for a bare asyncio
protocol. This protocol reads plain requests for `GET /api/v1/device/assignments` and
`POST /api/v1/device/telemetry` itself and answers them through the same functions as the
aiohttp handlers (server.py: `device_for`, `poll`, `upload`, `error_answer`), so the two
cannot disagree.

Anything else on a connection (another route, chunked or compressed bodies, `Expect`, HTTP/1.0,
odd or oversized heads, a tracer running) hands the rest of that connection to the aiohttp
application for good, bytes as received: its parser and middleware then decide, exactly as
without this layer. Requests on one connection are answered in order. Idle connections close
after `KEEPALIVE_S`; one that takes over `REQUEST_TIMEOUT_S` to send a request is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import time
from collections.abc import Callable
from email.utils import formatdate
from http import HTTPStatus
from typing import cast

from aiohttp.web_protocol import RequestHandler

from .. import tracing
from ..errors import PayloadTooLarge
from .errors import Forbidden
from .ingest import TelemetryWriter
from .server import device_for, error_answer, poll, upload
from .service import Hub

log = logging.getLogger("appliance.hub.front")

ASSIGNMENTS = "/api/v1/device/assignments"
TELEMETRY = "/api/v1/device/telemetry"
#: A head longer than this goes to aiohttp, which refuses it.
MAX_HEAD_BYTES = 8190
#: aiohttp's default keep-alive.
KEEPALIVE_S = 75.0
#: A request's head and body must arrive within this.
REQUEST_TIMEOUT_S = 30.0
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_SINGLE = frozenset({"content-length", "content-type", "authorization", "host"})
_HAND_OVER = frozenset({"transfer-encoding", "expect", "upgrade", "content-encoding"})
_STATUS = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in HTTPStatus}


class _Head:
    __slots__ = ("close", "headers", "length", "method", "path")

    def __init__(self, method: str, path: str, headers: dict[str, str], length: int) -> None:
        self.method, self.path, self.headers, self.length = method, path, headers, length
        self.close = "close" in headers.get("connection", "").lower()


def parse_head(raw: bytes) -> _Head | None:
    """A plain HTTP/1.1 request for a device route, or None (aiohttp takes the connection)."""
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        return None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or parts[2] != "HTTP/1.1":
        return None
    method, path = parts[0], parts[1]
    if not ((method == "GET" and path == ASSIGNMENTS) or (method == "POST" and path == TELEMETRY)):
        return None  # a query string, another route or method: aiohttp's
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not _TOKEN.fullmatch(name):
            return None
        key = name.lower()
        value = value.strip(" \t")
        if key in headers:
            if key in _SINGLE:
                return None
            value = headers[key] + ", " + value
        headers[key] = value
    if not _HAND_OVER.isdisjoint(headers) or "upgrade" in headers.get("connection", "").lower():
        return None
    raw_length = headers.get("content-length", "0")
    if not raw_length.isascii() or not raw_length.isdigit():
        return None
    length = int(raw_length)
    if method == "GET" and length:
        return None
    return _Head(method, path, headers, length)


class _Date:
    """The Date header, formatted once a second."""

    def __init__(self) -> None:
        self._second, self._value = 0, b""

    def get(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second, self._value = now, formatdate(now, usegmt=True).encode()
        return self._value


class Front:
    """The listening side: the hub, the aiohttp handler factory, the open connections."""

    def __init__(
        self, hub: Hub, writer: TelemetryWriter, handler_factory: Callable[[], RequestHandler]
    ) -> None:
        self.hub, self.writer, self.handler_factory = hub, writer, handler_factory
        self.connections: set[DeviceConnection] = set()
        self.date = _Date()
        self._sweeper: asyncio.Task[None] | None = None

    def protocol(self) -> DeviceConnection:
        if self._sweeper is None:
            self._sweeper = asyncio.ensure_future(self._sweep())
        return DeviceConnection(self)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(min(5.0, REQUEST_TIMEOUT_S / 2))
            now = time.monotonic()
            for conn in list(self.connections):
                conn.check(now)

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for conn in list(self.connections):
            conn.close()


class DeviceConnection(asyncio.Protocol):
    """One client connection (see the module docstring)."""

    def __init__(self, front: Front) -> None:
        self.front = front
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._head: _Head | None = None
        self.busy = False
        self.last = time.monotonic()
        #: When the request now arriving began (0: none is arriving).
        self.since = 0.0
        self.task: asyncio.Task[None] | None = None

    # -- asyncio callbacks -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.front.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.front.connections.discard(self)
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self._buf += data
        self.last = time.monotonic()
        if not self.since:
            self.since = self.last
        if not self.busy:
            self._next()

    def check(self, now: float) -> None:
        """The sweep: close what idles too long or sends a request too slowly."""
        if self.busy:
            return
        if (self._buf or self._head) and self.since and now - self.since > REQUEST_TIMEOUT_S:
            log.info("closing a device connection whose request took over %gs", REQUEST_TIMEOUT_S)
            self.close()
        elif not self._buf and now - self.last > KEEPALIVE_S:
            self.close()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    # -- requests ----------------------------------------------------------------------------
    def _next(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        head = self._head
        buf = self._buf
        if head is None:
            if not buf:
                self.since = 0.0
                return
            end = buf.find(b"\r\n\r\n", 0, MAX_HEAD_BYTES + 4)
            if end < 0:
                if len(buf) > MAX_HEAD_BYTES:
                    self._hand_over()
                return
            head = parse_head(bytes(buf[:end]))
            if head is None or tracing.tracer is not None:  # spans come from the middleware
                self._hand_over()
                return
            del buf[: end + 4]
            limit = self.front.hub.config.max_telemetry_bytes
            if head.length > limit:
                exc = PayloadTooLarge(f"request body is over the limit of {limit} bytes")
                self._error(head, exc, close=True)
                return
            self._head = head
        if len(buf) < head.length:
            return  # the body is still coming
        body = bytes(buf[: head.length])
        del buf[: head.length]
        self._head = None
        self.since = time.monotonic() if buf else 0.0
        self.busy = True
        self.task = asyncio.get_running_loop().create_task(self._answer(head, body))

    async def _answer(self, head: _Head, body: bytes) -> None:
        front, h = self.front, head.headers
        try:
            scheme, _, given = h.get("authorization", "").partition(" ")
            token = given.strip() if scheme.lower() == "bearer" else ""
            if token and front.hub.is_admin(token):
                raise Forbidden("the device API takes a device token, not the admin token")
            device = await device_for(front.hub, token, h.get("x-device-id"))
            if head.method == "GET":
                status, payload, etag = await poll(front.hub, device, h.get("if-none-match", ""))
                extra = b"ETag: " + etag.encode() + b"\r\nCache-Control: no-cache\r\n"
                self._write(status, payload, extra, head.close)
            else:
                payload = await upload(front.hub, front.writer, device, body)
                self._write(200, payload, b"", head.close)
        except Exception as exc:
            self._error(head, exc, head.close)
            if head.close:
                return
        self.busy = False
        self.last = time.monotonic()
        if head.close:
            self.close()
            return
        self._next()

    def _error(self, head: _Head, exc: Exception, close: bool) -> None:
        status, payload, headers = error_answer(exc, head.method, head.path)
        extra = b"".join(f"{k}: {v}\r\n".encode() for k, v in headers.items())
        self._write(status, payload, extra, close)
        if close:
            self.close()

    def _write(self, status: int, body: bytes, extra: bytes, close: bool) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        parts = [_STATUS[status], b"Date: ", self.front.date.get(), b"\r\n", extra]
        if status != 304:
            parts += (b"Content-Type: application/json\r\nContent-Length: ",)
            parts += (str(len(body)).encode(), b"\r\n")
        if close:
            parts.append(b"Connection: close\r\n")
        parts += (b"\r\n", body)
        transport.write(b"".join(parts))

    def _hand_over(self) -> None:
        """aiohttp takes the rest of this connection, starting with the bytes buffered."""
        transport = self.transport
        if transport is None:
            return
        self.front.connections.discard(self)
        handler = self.front.handler_factory()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        data = bytes(self._buf)
        self._buf.clear()
        self.transport = None
        if data:
            handler.data_received(data)
