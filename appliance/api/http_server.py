"""The HTTP/1.1 server in front of the aiohttp application: the hot paths, served directly.

Why: for a small model, aiohttp's per-request machinery (request and response objects, router,
middleware chain, header multidicts, its writer) costs several times what the runtime takes, and
under overload even a 503 paid for all of it. This protocol parses plain requests itself and
answers the hot routes (KServe v2 `infer` with a JSON or binary-tensor body, the health and
readiness probes, `/metrics`) straight from the engine, through the same functions as the
aiohttp handlers (api/http_parts.py: auth, the answer's encoding, the error mapping, metrics,
the access log), so the two cannot disagree. A device that only gets these never imports
aiohttp (api/app.py).

Every other request (other routes, HEAD, image and multipart bodies, compressed bodies, odd query
strings) is handed byte for byte to the aiohttp application on the same connection, and the
connection comes back once aiohttp has written its answer. Anything unusual (chunked bodies,
HTTP/1.0, `Expect`, upgrades, absolute URLs, non-ASCII or malformed heads, heads over the size
limit) hands the rest of the connection to aiohttp for good, so its parser decides, exactly as
it would have without this layer. Requests on one connection are answered in order, one at a
time; reading pauses while the client does not read its answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import re
import signal
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import parse_qsl

import orjson

from ..errors import ApplianceError, InferenceFailed
from ..formats import JSON
from ..httphead import STATUS_LINES, DateHeader
from ..httphead import parse_head as read_head
from ..llm import TextModel
from ..request import Request, RequestPath
from . import eager
from .app import ENGINE, LOADER, METRICS, PATH, ROUTER, SETTINGS, App, HttpSettings
from .http_parts import (
    PRIORITY_HEADER,
    TIMEOUT_HEADER,
    check_length,
    encode_answer,
    encode_formatted,
    error_parts,
    ready_answer,
    tensor_request,
)
from .images import text_parameters
from .limits import ConnectionLimits, connection_cap
from .routes import Route, hot_routes

if TYPE_CHECKING:  # imported at the first request handed over (api/app.py)
    from aiohttp import web
    from aiohttp.web_protocol import RequestHandler

log = logging.getLogger("appliance.http")

#: A head (request line and headers) longer than this goes to aiohttp, which refuses it.
MAX_HEAD_BYTES = 8190
#: Seconds a client has to finish its TLS handshake.
TLS_HANDSHAKE_TIMEOUT_S = 10.0
#: How long a timed-out connection drops what its client still sends before it closes.
LINGER_S = 1.0
#: Unanswered bytes buffered per connection before reading pauses (a pipelining client).
MAX_BUFFERED_BYTES = 1 << 20
#: Pipelined requests of one connection answered at once in one loop callback; the rest wait
#: for the next round, so that one client's burst does not hold the loop from the others.
BURST = 8
#: Requests start at once (api/eager.py) only while the server has at most this many
#: connections. Measured here (tiny MLP, inline, server on one CPU, wrk): at 1-2 connections
#: at once is 9-12 % more req/s than a Task per request; at 8 it is 8-10 % fewer, at 32
#: 15-20 % fewer (CPU per request rises though syscalls per request do not change; the
#: cause is not found yet), so a busier server keeps a Task per request.
EAGER_CONNECTIONS = 2
#: The routes this protocol answers itself (api/routes.py marks them), by method.
_HOT: dict[str, list[tuple[Route, re.Pattern[str]]]] = {}
for _method, _route, _pattern in hot_routes():
    _HOT.setdefault(_method, []).append((_route, _pattern))
_LIVE_BODY = b'{"live":true}'
_FULL_BODY = b'{"error":"too many connections"}'
_JSON = b"application/json"


class _Head:
    """A parsed request head: what the hot path needs, the rest only for handing over."""

    __slots__ = ("close", "headers", "length", "match", "method", "path", "query", "req", "route")

    def __init__(
        self, method: str, path: str, query: str, headers: dict[str, str], length: int
    ) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.length = length
        self.close = "close" in _get(headers, "connection", "").lower()
        #: The hot route it goes to, and the names in its path (set by Connection._hot).
        self.route: Route | None = None
        self.match: re.Match[str] | None = None
        #: Its lifecycle record, from the moment its head is in.
        self.req: Request | None = None


#: The names this module looks up are lower case already: no per-lookup `lower()` (the same
#: headers as api/http.begin reads for the aiohttp routes: keep the two in step).
_get = dict.get
_TIMEOUT = TIMEOUT_HEADER.lower()
_PRIORITY = PRIORITY_HEADER.lower()


def parse_head(raw: bytes) -> _Head | None:
    """The head of a plain HTTP/1.1 request, or None when aiohttp should judge it."""
    return read_head(raw, _Head)


class _ToAiohttp(asyncio.Transport):
    """The transport aiohttp's protocol sees for a connection it shares: writes go to the real
    socket; a close while aiohttp answers closes the socket (its error or `Connection: close`),
    one while it is idle (its keep-alive timer) only lets it go."""

    def __init__(self, conn: Connection) -> None:
        super().__init__()
        self._conn = conn
        self._closed = False

    @property
    def _real(self) -> asyncio.Transport:
        transport = self._conn.transport
        assert transport is not None
        return transport

    def request_started(self) -> None:
        """Called by api/http.py's middleware once aiohttp has parsed a head."""
        self._conn.head_since = 0.0
        self._conn.aio_active = True

    def request_done(self, keep_alive: bool | None) -> None:
        """Called by api/http.py's middleware once the answer is written."""
        self._conn.aio_active = False
        if not self._closed:
            self._conn.delegated_done(keep_alive is not False)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._closed:
            self._real.write(data)

    def writelines(self, list_of_data: Any) -> None:
        if not self._closed:
            self._real.writelines(list_of_data)

    def is_closing(self) -> bool:
        return self._closed or self._real.is_closing()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._conn.aiohttp_closed()

    def abort(self) -> None:
        self.close()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._real.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self._conn.pause("aiohttp")

    def resume_reading(self) -> None:
        self._conn.resume("aiohttp")

    def is_reading(self) -> bool:
        return self._real.is_reading()

    def get_write_buffer_size(self) -> int:
        return self._real.get_write_buffer_size()

    def can_write_eof(self) -> bool:
        return False


class Connection(asyncio.Protocol):
    """One client connection (see the module docstring)."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.idle_since = time.monotonic()
        self._buf = bytearray()
        #: A request is being answered (by the hot path or by aiohttp).
        self.busy = False
        self._head: _Head | None = None
        #: Body bytes of the request aiohttp answers, still to pass on as they arrive.
        self._forward = 0
        #: Body bytes of a request refused from its head, still to discard.
        self._skip = 0
        self._close_after = False
        #: aiohttp owns the rest of the connection.
        self.handed_over = False
        self.aio: RequestHandler | None = None
        self._aio_transport: _ToAiohttp | None = None
        self._paused: set[str] = set()
        self._write_paused = False
        #: The request being answered, when it had to wait (eager.start: None when it did not).
        self.task: asyncio.Task[None] | None = None
        #: `_process` is on the stack: a request answered at once returns to its loop.
        self._processing = False
        #: The context each request's copy starts from (eager.start).
        self._context = contextvars.copy_context()
        #: The client's address (the access log).
        self.peer: str | None = None
        #: When the head being read began and when its body began (0: not reading one); the
        #: sweep closes a connection that takes longer than the limits (slowloris).
        self.head_since = 0.0
        self.body_since = 0.0
        #: aiohttp is answering a request of this connection (set by its middleware).
        self.aio_active = False
        #: Timed out: the 408 is out, what the client still sends is dropped until the close.
        self.lingering = False

    # -- asyncio callbacks -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if peer else None
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        server = self.server
        if len(server.connections) >= server.max_connections and not server.make_room():
            # Every connection is busy: refuse this one plainly rather than let it wait.
            self._write(503, _FULL_BODY, _JSON, None, "-", True)
            transport.close()
            return
        server.connections.add(self)
        if not server.settings.fast_path:
            self._hand_over()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        if self.aio is not None:
            self.aio.connection_lost(exc)
            self.aio = None
        self.transport = None

    def pause_writing(self) -> None:
        self._write_paused = True
        if self.aio is not None:
            self.aio.pause_writing()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.aio is not None:
            self.aio.resume_writing()
        if not self.busy:
            self._process()

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            return
        self.idle_since = now = time.monotonic()
        if self.handed_over:
            if not self.aio_active and not self.head_since:
                self.head_since = now
            assert self.aio is not None
            self.aio.data_received(data)
            return
        if self._forward:
            n = min(len(data), self._forward)
            self._forward -= n
            assert self.aio is not None
            self.aio.data_received(data[:n])
            data = data[n:]
            if not self._forward:
                self.body_since = 0.0
        if self._skip:
            n = min(len(data), self._skip)
            self._skip -= n
            data = data[n:]
            if not self._skip:
                self.body_since = 0.0
        if data:
            self._buf += data
            if len(self._buf) > MAX_BUFFERED_BYTES and self.busy:
                self.pause("buffer")
        if not self.busy:
            self._process()

    def eof_received(self) -> bool | None:
        if self.aio is not None:
            self.aio.eof_received()
        return None

    # -- flow control ------------------------------------------------------------------------
    def pause(self, reason: str) -> None:
        if not self._paused and self.transport is not None:
            self.transport.pause_reading()
        self._paused.add(reason)

    def resume(self, reason: str) -> None:
        if reason in self._paused:
            self._paused.discard(reason)
            if not self._paused and self.transport is not None:
                self.transport.resume_reading()

    # -- requests ----------------------------------------------------------------------------
    def _process(self) -> None:
        """Start on the next buffered request, if it is complete enough.

        A request is started at once, here (eager.start): one the engine answers inline is
        answered before this returns, and its `_finished` comes back to this loop for the
        next pipelined request instead of recursing."""
        if self._processing:
            return
        self._processing = True
        try:
            self._next()
        finally:
            self._processing = False

    def _next(self) -> None:
        if len(self._buf) <= MAX_BUFFERED_BYTES:
            self.resume("buffer")
        started = 0
        while (
            not self.busy
            and self._buf
            and not self._skip
            and not self._forward
            and not self._write_paused
            and self.transport is not None
            and not self.transport.is_closing()
        ):
            buf = self._buf
            head = self._head
            if head is None:
                end = buf.find(b"\r\n\r\n", 0, MAX_HEAD_BYTES + 4)
                if end < 0:
                    if len(buf) > MAX_HEAD_BYTES:
                        self._hand_over()
                    elif not self.head_since:
                        self.head_since = time.monotonic()
                    return
                self.head_since = 0.0
                raw = bytes(buf[: end + 4])
                head = parse_head(raw[:-4])
                if head is None:
                    self._hand_over()
                    return
                del buf[: end + 4]
                if not self._hot(head):
                    self._delegate(head, raw)
                    return
                if self._refused(head):
                    continue
                self._head = head
            if len(buf) < head.length:
                if not self.body_since:
                    self.body_since = time.monotonic()
                return  # the body is still coming
            self.body_since = 0.0
            body = bytes(buf[: head.length])
            del buf[: head.length]
            self._head = None
            self.resume("buffer")
            self.busy = True
            # Held here: the loop keeps only a weak reference to a task (one per connection).
            server = self.server
            if len(server.connections) <= EAGER_CONNECTIONS:
                self.task = eager.start(self._infer(head, body), server.loop, self._context)
            else:
                self.task = server.loop.create_task(self._infer(head, body))
            started += 1
            if started >= BURST and not self.busy and self._buf:
                self.server.loop.call_soon(self._process)
                return

    def _hot(self, head: _Head) -> bool:
        """Whether this protocol answers the request itself: a hot route, plainly sent."""
        for route, pattern in _HOT.get(head.method, ()):
            m = pattern.fullmatch(head.path)
            if m is not None:
                head.route, head.match = route, m
                break
        else:
            return False
        if head.method == "POST":
            ctype = _get(head.headers, "content-type", "").lower()
            return not ctype.startswith(("image/", "multipart/")) and (
                "content-encoding" not in head.headers
            )
        return not head.length

    def _begin(self, head: _Head) -> Request:
        assert head.route is not None
        h = head.headers
        head.req = req = self.server.paths.begin(
            "http", head.method, head.path, head.route.path,
            request_id=_get(h, "x-request-id"),
            traceparent=_get(h, "traceparent"),
            remote=self.peer,
            meta=h,
            timeout_ms=_get(h, _TIMEOUT),
            priority=_get(h, _PRIORITY),
            timeout_name=TIMEOUT_HEADER,
            priority_name=PRIORITY_HEADER,
            accept=_get(h, "accept"),
        )  # fmt: skip
        return req

    def _refused(self, head: _Head) -> bool:
        """Answer at once what fails before its body matters (auth, unknown model, a full
        queue, an oversized body), and what needs no body (liveness); the body is then
        skipped, or the connection closed."""
        server = self.server
        req = self._begin(head)
        assert head.route is not None
        if head.method == "GET":  # health, readiness, metrics: no body, answered at once
            self.idle_since = time.monotonic()
            try:
                req.token_name = server.settings.auth.check(
                    _get(head.headers, "authorization"), head.route.scope, self.peer
                )
                body, ctype = server.answer_get(head.route.handler)
            except ApplianceError as exc:
                self._error(head, req, exc)
            else:
                self._write(200, body, ctype, None, req.id, head.close)
                server.paths.finish(req, 200)
            if head.close:
                self._close_now()
            return True
        m = head.match
        assert m is not None
        try:
            req.token_name = server.settings.auth.check(
                _get(head.headers, "authorization"), head.route.scope, self.peer
            )
            server.paths.admit(req, m.group("name"), m.groupdict().get("version"))
            check_length(head.length, server.settings.max_body_bytes)
        except ApplianceError as exc:
            self._error(head, req, exc)
            if exc.status == 413 or head.close:  # 413: the body is not worth reading
                self._close_after = True
                self._close_now()
                return True
            available = min(len(self._buf), head.length)
            del self._buf[:available]
            self._skip = head.length - available
            if self._skip:
                self.body_since = time.monotonic()
            return True
        return False

    async def _infer(self, head: _Head, body: bytes) -> None:
        paths = self.server.paths
        req, m = head.req, head.match
        assert req is not None and m is not None
        name, version = m.group("name"), m.groupdict().get("version")
        try:
            decoded = tensor_request(body, _get(head.headers, "inference-header-content-length"))
            if head.query:
                decoded.parameters.update(
                    text_parameters(parse_qsl(head.query, keep_blank_values=True))
                )
            result = await paths.infer(req, name, version, decoded)
            if req.format == JSON:
                payload, ctype, extra = encode_answer(result, decoded, name)
            else:
                payload, ctype, extra = await encode_formatted(paths, req, result, decoded, name)
                del extra["Content-Type"]  # written by _write
        except ApplianceError as exc:
            self._error(head, req, exc)
        except Exception:
            paths.crashed(req)
            self._error(head, req, InferenceFailed("internal server error"))
        else:
            if req.span is not None:
                extra["traceparent"] = paths.reply_traceparent(req) or ""
            self._write(200, payload, ctype.encode(), extra, req.id, head.close)
            paths.finish(req, 200)
        self._finished(head.close)

    def _error(self, head: _Head, req: Request, exc: ApplianceError) -> None:
        status = self.server.paths.failed(req, exc)
        body, extra = error_parts(exc)
        if req.span is not None:
            extra = {**(extra or {}), "traceparent": self.server.paths.reply_traceparent(req) or ""}
        self._write(status, body, _JSON, extra, req.id, head.close or status == 413)
        self.server.paths.finish(req, status)

    def _write(
        self,
        status: int,
        body: bytes,
        ctype: bytes,
        extra: dict[str, str] | None,
        rid: str,
        close: bool,
    ) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        parts = [
            STATUS_LINES[status],
            b"Content-Type: ",
            ctype,
            b"\r\nContent-Length: ",
            str(len(body)).encode(),
            b"\r\nDate: ",
            self.server.date.get(),
            b"\r\nX-Request-Id: ",
            rid.encode(),
        ]
        if extra:
            for key, value in extra.items():
                parts += (b"\r\n", key.encode(), b": ", value.encode())
        if close:
            parts.append(b"\r\nConnection: close")
        parts += (b"\r\n\r\n", body)
        transport.write(b"".join(parts))

    def _finished(self, close: bool) -> None:
        self.busy = False
        self.idle_since = time.monotonic()
        if close or self._close_after or self.server.closing:
            self._close_now()
            return
        self._process()

    def _close_now(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def timed_out(self, what: str) -> None:
        """The client took too long to send a request: 408, and the connection closes."""
        log.info(
            "closing a connection from %s: its request %s took longer than the limit",
            self.peer,
            what,
            extra={"fields": {"remote": self.peer, "timeout": what}},
        )
        transport = self.transport
        self.server.connections.discard(self)
        # Not while an answer may be on its way; aiohttp reading a body has written nothing.
        if (
            transport is not None
            and not transport.is_closing()
            and (self._forward or not self.busy)
            and transport.can_write_eof()
        ):
            body = b'{"error":"request ' + what.encode() + b' not received in time"}'
            self._write(408, body, _JSON, None, "-", True)
            # A lingering close: closing with the client's bytes unread would send a reset
            # that can overtake the 408; read and drop them for a moment first.
            self.lingering = True
            self._buf.clear()
            transport.write_eof()
            self.server.loop.call_later(LINGER_S, self._close_now)
            return
        self._close_now()

    # -- aiohttp -----------------------------------------------------------------------------
    def _aiohttp(self) -> RequestHandler | None:
        """aiohttp's protocol for this connection; None (a 500 sent, the connection closing)
        if its application cannot be made (it is made at the first request handed over)."""
        if self.aio is None:
            try:
                handler = self.server.handler_factory()
            except Exception:
                log.exception("the aiohttp application could not be made")
                self._write(500, b'{"error":"internal server error"}', _JSON, None, "-", True)
                self._close_now()
                return None
            transport = _ToAiohttp(self)
            handler.connection_made(transport)
            self.aio, self._aio_transport = handler, transport
        return self.aio

    def _delegate(self, head: _Head, raw_head: bytes) -> None:
        """Hand one request to aiohttp: its head as received, and its body as it comes."""
        self.busy = True
        buf = self._buf
        n = min(len(buf), head.length)
        chunk = raw_head + bytes(buf[:n])
        del buf[:n]
        self._forward = head.length - n
        if self._forward:
            self.body_since = time.monotonic()
        handler = self._aiohttp()
        if handler is not None:
            handler.data_received(chunk)

    def _hand_over(self) -> None:
        """aiohttp takes the rest of this connection."""
        self.handed_over = True
        handler = self._aiohttp()
        data = bytes(self._buf)
        self._buf.clear()
        self.resume("buffer")
        if handler is not None:
            handler.data_received(data)

    def delegated_done(self, keep_alive: bool) -> None:
        if self.handed_over:
            return
        self._finished(not keep_alive)

    def aiohttp_closed(self) -> None:
        """aiohttp closed its side: the socket too if it was answering, else only its part."""
        handler = self.aio
        self.aio = self._aio_transport = None
        if self.busy or self.handed_over:
            self._close_now()
        if handler is not None:  # so that aiohttp's server forgets it
            self.server.loop.call_soon(handler.connection_lost, None)
        self.resume("aiohttp")


class WebRunner:
    """aiohttp's `AppRunner` for the app's aiohttp application, made at its first use: the
    first request the fast path hands over (api/app.py says why). `server` is the handler
    factory, as on aiohttp's runner."""

    def __init__(self, app: App, keepalive_s: float) -> None:
        self.app = app
        self._keepalive_s = keepalive_s
        self._runner: web.AppRunner | None = None

    @property
    def started(self) -> bool:
        return self._runner is not None

    @property
    def server(self) -> Callable[[], RequestHandler]:
        if self._runner is None:
            self._runner = self._setup()
        factory = self._runner.server
        assert factory is not None
        return factory

    def _setup(self) -> web.AppRunner:
        t0 = time.perf_counter()
        from aiohttp import web

        app, keepalive_s = self.app.web(), self._keepalive_s
        runner = web.AppRunner(
            app, handle_signals=False, access_log=None, keepalive_timeout=keepalive_s
        )
        # Its setup only runs the aiohttp app's on_startup, which is empty (the lifecycle is
        # api/app.py's): it completes without waiting, so it runs here, in the data callback.
        setup = runner.setup()
        try:
            setup.send(None)
        except StopIteration:
            pass
        else:
            setup.close()
            raise RuntimeError("the aiohttp application must have no on_startup (api/app.py)")
        log.debug("aiohttp application made in %.1f ms", (time.perf_counter() - t0) * 1000)
        return runner

    async def cleanup(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@dataclass
class HttpServer:
    """The listening side: connections, the aiohttp handler factory, graceful close."""

    app: App
    runner: WebRunner
    loop: asyncio.AbstractEventLoop

    def __post_init__(self) -> None:
        self.paths: RequestPath = self.app[PATH]
        self.settings: HttpSettings = self.app[SETTINGS]
        self.engine, self.router, self.metrics = (
            self.app[ENGINE],
            self.app[ROUTER],
            self.app[METRICS],
        )
        self.limits: ConnectionLimits = self.settings.limits
        self.max_connections = connection_cap(self.limits)
        self.date = DateHeader()
        self.connections: set[Connection] = set()
        self.closing = False

    def answer_get(self, handler: str) -> tuple[bytes, bytes]:
        """The body and content type of a hot GET route (api/routes.py names its handler)."""
        if handler == "live":
            return _LIVE_BODY, _JSON
        if handler == "ready":
            return orjson.dumps(ready_answer(self.engine, self.router)), _JSON
        if handler == "metrics":
            return self.metrics.render(), self.metrics.content_type.encode()
        raise AssertionError(f"no fast-path answer for the hot route {handler!r}")

    def handler_factory(self) -> RequestHandler:
        """A new aiohttp protocol for a connection (or a request) handed over."""
        return self.runner.server()

    def protocol(self) -> Connection:
        return Connection(self)

    @property
    def sweep_interval_s(self) -> float:
        """How often `sweep` runs: fine enough for the shortest limit, at most once a second."""
        lim = self.limits
        shortest = min(lim.header_timeout_s, lim.body_timeout_s, lim.keepalive_timeout_s)
        return max(0.05, min(1.0, shortest / 4))

    def sweep(self) -> None:
        """Close connections whose head or body takes longer than its limit (408), and those
        idle for longer than the keep-alive timeout (aiohttp times out the idle ones handed to
        it, which may be streaming an answer while the client is silent)."""
        lim = self.limits
        now = time.monotonic()
        idle_limit = now - lim.keepalive_timeout_s
        for conn in list(self.connections):
            if conn.transport is None:
                continue
            if conn.head_since and now - conn.head_since > lim.header_timeout_s:
                conn.timed_out("head")
            elif conn.body_since and now - conn.body_since > lim.body_timeout_s:
                conn.timed_out("body")
            elif not conn.busy and not conn.handed_over and conn.idle_since < idle_limit:
                conn.transport.close()

    def make_room(self) -> bool:
        """At the connection limit: close the connection idle the longest (between requests,
        nothing of a next one read), so that a new client (a health check) is served while
        idle keep-alive connections pile up. False when none is idle."""
        oldest: Connection | None = None
        for conn in self.connections:
            if (
                not conn.busy
                and not conn.aio_active
                and not conn.head_since
                and not conn.body_since
                and not conn._buf
                and conn.transport is not None
                and (oldest is None or conn.idle_since < oldest.idle_since)
            ):
                oldest = conn
        if oldest is None:
            return False
        self.connections.discard(oldest)
        oldest._close_now()
        return True

    async def drain(self, timeout_s: float) -> None:
        """Stop taking requests; wait for those being answered, then close every connection."""
        self.closing = True
        deadline = time.monotonic() + timeout_s
        handed: list[RequestHandler] = []
        for conn in list(self.connections):
            if conn.handed_over and conn.aio is not None:
                handed.append(conn.aio)  # aiohttp finishes what it is answering, then closes
            elif not conn.busy and conn.transport is not None:
                conn.transport.close()
        shutdowns = asyncio.gather(*(h.shutdown(timeout_s) for h in handed))
        while any(c.busy for c in self.connections) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(shutdowns, max(0.0, deadline - time.monotonic()))
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.close()


class RunningServer:
    """The app served on a socket by this protocol; `close` is the graceful shutdown."""

    def __init__(
        self, app: App, runner: WebRunner, http: HttpServer, server: asyncio.Server, sweeper: Any
    ) -> None:
        self.app = app
        self.runner = runner
        self.http = http
        self.server = server
        self._sweeper = sweeper

    @property
    def port(self) -> int:
        return int(self.server.sockets[0].getsockname()[1])

    async def close(self, timeout_s: float = 10.0) -> None:
        self.server.close()
        self._sweeper.cancel()
        await self.app.shutdown()
        await self.http.drain(timeout_s)
        try:
            await self.runner.cleanup()
        finally:
            await self.app.cleanup()


def _warm_for_text_models(app: App, runner: WebRunner) -> None:
    """Once the models are loaded: a device serving a language or embedding model will get
    OpenAI requests, which aiohttp answers, so it makes aiohttp's application now rather than
    stall its first chat request (and the loop) on the import; a tensor-only device never does."""
    if not runner.started and any(isinstance(m.backend, TextModel) for m in app[ENGINE].models()):
        runner.server  # noqa: B018


async def open_server(
    app: App, sock: socket.socket, ssl_context: ssl.SSLContext | None = None
) -> RunningServer:
    """Start the app (its startup and cleanup contexts) and serve it on `sock`; with
    `ssl_context`, over TLS (api/tls.py): the event loop's TLS transport hands this protocol
    decrypted bytes and encrypts its writes, so the fast path and aiohttp work unchanged.
    aiohttp is started only if a request needs it (`WebRunner`), or at once without the fast
    path (it then answers every request)."""
    loop = asyncio.get_running_loop()
    settings = app[SETTINGS]
    runner = WebRunner(app, settings.limits.keepalive_timeout_s)
    await app.startup()
    try:
        if not settings.fast_path or app.web_built:
            runner.server  # noqa: B018 - made now, on the loop, before the first request
        elif (loader := app.get(LOADER)) is not None:
            loader.add_done_callback(lambda _: _warm_for_text_models(app, runner))
        http = HttpServer(app, runner, loop)
        tls: dict[str, Any] = {}
        if ssl_context is not None:  # a client that stalls its handshake is dropped
            tls = {"ssl": ssl_context, "ssl_handshake_timeout": TLS_HANDSHAKE_TIMEOUT_S}
        server = await loop.create_server(http.protocol, sock=sock, backlog=1024, **tls)
    except BaseException:
        await runner.cleanup()
        await app.cleanup()
        raise

    async def sweep() -> None:
        while True:
            await asyncio.sleep(http.sweep_interval_s)
            http.sweep()

    return RunningServer(app, runner, http, server, loop.create_task(sweep()))


def run(
    app: App,
    sock: socket.socket,
    shutdown_timeout_s: float,
    ssl_context: ssl.SSLContext | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT, then shut down gracefully (what `web.run_app` does)."""

    async def main() -> None:
        running = await open_server(app, sock, ssl_context=ssl_context)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            await running.close(shutdown_timeout_s)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
