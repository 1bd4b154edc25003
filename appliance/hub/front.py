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
import socket
import time
from collections.abc import Callable
from typing import cast

from aiohttp.web_protocol import RequestHandler

from .. import tracing
from ..errors import PayloadTooLarge
from ..httphead import STATUS_LINES, DateHeader
from ..httphead import parse_head as read_head
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
#: After refusing a body as too large: how long what the client still sends is dropped before
#: the close (closing with its bytes unread sends a reset that can overtake the answer).
LINGER_S = 1.0
#: Beside what the shared parser hands over: the device routes take no compressed bodies.
_HAND_OVER = "content-encoding"


class _Head:
    __slots__ = ("close", "headers", "length", "method", "path", "query")

    def __init__(
        self, method: str, path: str, query: str, headers: dict[str, str], length: int
    ) -> None:
        self.method, self.path, self.query = method, path, query
        self.headers, self.length = headers, length
        self.close = "close" in dict.get(headers, "connection", "").lower()


def parse_head(raw: bytes) -> _Head | None:
    """A plain HTTP/1.1 request for a device route, or None (aiohttp takes the connection)."""
    head = read_head(raw, _Head)
    if head is None or _HAND_OVER in head.headers:
        return None
    if not (
        (head.method == "GET" and head.path == ASSIGNMENTS and not head.length)
        or (head.method == "POST" and head.path == TELEMETRY)
    ):
        return None  # another route or method, or a GET with a body: aiohttp's
    return None if head.query else head  # (a query string: aiohttp's too)


class Front:
    """The listening side: the hub, the aiohttp handler factory, the open connections."""

    def __init__(
        self, hub: Hub, writer: TelemetryWriter, handler_factory: Callable[[], RequestHandler]
    ) -> None:
        self.hub, self.writer, self.handler_factory = hub, writer, handler_factory
        self.connections: set[DeviceConnection] = set()
        self.date = DateHeader()
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
        self.lingering = False
        self.paused = False

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
        if self.lingering:
            return
        self._buf += data
        self.last = time.monotonic()
        if not self.since:
            self.since = self.last
        if not self.busy:
            self._next()
        elif len(self._buf) > self.front.hub.config.max_telemetry_bytes + MAX_HEAD_BYTES:
            self._pause()  # a client pipelining ahead: read on once its answers are out

    def _pause(self) -> None:
        if self.transport is not None and not self.paused:
            self.paused = True
            self.transport.pause_reading()

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
        if self.paused:
            self.paused = False
            transport.resume_reading()
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
                self._error(head, exc, close=True, linger=True)
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

    def _error(self, head: _Head, exc: Exception, close: bool, linger: bool = False) -> None:
        status, payload, headers = error_answer(exc, head.method, head.path)
        extra = b"".join(f"{k}: {v}\r\n".encode() for k, v in headers.items())
        self._write(status, payload, extra, close)
        if linger:
            self._linger()
        elif close:
            self.close()

    def _write(self, status: int, body: bytes, extra: bytes, close: bool) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        parts = [STATUS_LINES[status], b"Date: ", self.front.date.get(), b"\r\n", extra]
        if status != 304:
            parts += (b"Content-Type: application/json\r\nContent-Length: ",)
            parts += (str(len(body)).encode(), b"\r\n")
        if close:
            parts.append(b"Connection: close\r\n")
        parts += (b"\r\n", body)
        transport.write(b"".join(parts))

    def _linger(self) -> None:
        """Answered before the body was read: half-close, drop what comes, then close."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self.lingering = True
        self._buf.clear()
        if transport.can_write_eof():
            transport.write_eof()
        asyncio.get_running_loop().call_later(LINGER_S, self.close)

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
