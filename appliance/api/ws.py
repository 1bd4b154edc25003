"""WebSocket streams: `GET /v2/models/{name}[/versions/{v}]/stream` upgrades to a WebSocket on
which each message is one inference request, for continuous inputs (camera frames, sensor
windows, audio chunks) without an HTTP request per frame.

Messages from the client (each answered, in order, with its `id`):
- a text message: a KServe v2 request as JSON (the body of `POST .../infer`);
- a binary message: a 4-byte little-endian length N, N bytes of KServe v2 JSON whose inputs
  say `"parameters": {"binary_data_size": ...}`, then the tensors' bytes (KServe's binary
  tensor extension with the `Inference-Header-Content-Length` header moved into the frame);
- a binary message that is a JPEG or PNG file, for a model that declares image
  pre-processing (told apart by its magic bytes: as a length they would exceed any message).

Answers: a text message with the KServe v2 JSON answer (its `id` is the request's; one made up
when the request had none); a binary message framed as above when the request asked for binary
outputs, or for a format other than JSON (appliance/formats: the header then holds `id`,
`model_name`, `model_version` and `content_type`); `{"id", "error", "status"}` for a request
that failed (the connection goes on). A message larger than `max_message_bytes` closes the
connection with code 1009, as the WebSocket protocol says.

Flow: at most `max_inflight` requests of a connection run at once; up to `queue` more wait.
When the client sends faster than the model runs, `policy` decides: `drop_oldest` (the default,
for frames: the oldest waiting request is dropped, and a message `{"dropped": [ids]}` goes out
before the next answer) or `backpressure` (the server stops reading the socket until there is
room, so TCP slows the client down). Either way a connection holds a bounded amount of work.

Auth, request ids and the traceparent are the upgrade request's (bearer header, as on every
route); each message is a request of its own in the lifecycle (appliance/request.py), counted in
`appliance_ws_messages` by outcome, drops in `appliance_ws_dropped`.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import WSMsgType, web

from ..codec import InferRequest, decode_request, encode_response
from ..errors import ApplianceError, InferenceFailed, InvalidInput
from ..formats import JSON
from ..request import Request, RequestPath
from .images import image_input, images_request
from .ws_settings import Policy, WsSettings

_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")


def frame(head: dict[str, Any], payload: bytes = b"") -> bytes:
    """A binary message: the header's length (4 bytes, little-endian), the header, the data."""
    raw = orjson.dumps(head)
    return len(raw).to_bytes(4, "little") + raw + payload


class _Item:
    """One message: its lifecycle record, what it asks (or why it cannot be run)."""

    __slots__ = ("body", "error", "req", "task", "wire_id")

    def __init__(
        self, req: Request, body: InferRequest | None, error: ApplianceError | None, wire_id: Any
    ) -> None:
        self.req = req
        self.body = body
        self.error = error
        self.wire_id = wire_id
        self.task: asyncio.Task[tuple[bytes, bool]] | None = None


class _Session:
    def __init__(
        self,
        ws: web.WebSocketResponse,
        paths: RequestPath,
        name: str,
        version: str | None,
        settings: WsSettings,
        begin: Callable[[str | None], Request],
    ) -> None:
        self.ws = ws
        self.paths = paths
        self.name = name
        self.version = version
        self.settings = settings
        self.begin = begin
        #: Accepted and not answered yet, in order; the started ones come first.
        self.queue: deque[_Item] = deque()
        self.running = 0
        self.waiting = 0
        self.dropped: list[Any] = []
        self.changed = asyncio.Event()
        self.room = asyncio.Event()
        self.metrics = paths.metrics

    # -- reading -----------------------------------------------------------------------------
    def parse(self, data: str | bytes) -> _Item:
        if isinstance(data, str):
            raw, length, image = data.encode(), None, False
        elif data.startswith(_MAGIC):
            raw, length, image = data, None, True
        elif len(data) < 4:
            raw, length, image = b"", -1, False
        else:
            raw, length, image = data[4:], int.from_bytes(data[:4], "little"), False
        body: InferRequest | None = None
        error: ApplianceError | None = None
        try:
            if image:
                model = self.paths.router.resolve(self.name, self.version)
                body = images_request(image_input(model), [raw])
            elif length is not None and not 0 <= length <= len(raw):
                raise InvalidInput(
                    "a binary message is a 4-byte little-endian header length, the JSON header, "
                    f"then the tensor data: the header length {length} exceeds the message"
                )
            else:
                body = decode_request(raw, length)
        except ApplianceError as exc:
            error = exc
        wire_id = body.id if body is not None else _lenient_id(raw, length)
        req = self.begin(wire_id if isinstance(wire_id, str) else None)
        if body is not None and body.id is None:
            body.id = req.id
        return _Item(req, body, error, wire_id if body is None else body.id)

    async def accept(self, item: _Item) -> None:
        queue = self.queue
        if self.waiting >= self.settings.queue and self.running >= self.settings.max_inflight:
            if self.settings.policy == "backpressure":
                while self.waiting >= self.settings.queue:
                    self.room.clear()
                    await self.room.wait()
            else:
                old = queue[self.running]  # the oldest waiting one
                del queue[self.running]
                self.waiting -= 1
                self.dropped.append(old.wire_id)
                self.metrics.ws_dropped += 1
        queue.append(item)
        self.waiting += 1
        self.start_more()

    def start_more(self) -> None:
        queue, limit = self.queue, self.settings.max_inflight
        while self.waiting and self.running < limit:
            item = queue[self.running]
            item.task = asyncio.ensure_future(self.run(item))
            item.task.add_done_callback(self._ran)
            self.running += 1
            self.waiting -= 1
        self.room.set()
        self.changed.set()

    def _ran(self, _task: asyncio.Task[tuple[bytes, bool]]) -> None:
        self.changed.set()

    # -- running -----------------------------------------------------------------------------
    async def run(self, item: _Item) -> tuple[bytes, bool]:
        """The message's answer, ready to send: (bytes, binary)."""
        paths, req = self.paths, item.req
        out: tuple[bytes, bool]
        try:
            if item.error is not None:
                raise item.error
            body = item.body
            assert body is not None
            result = await paths.infer(req, self.name, self.version, body)
            if req.format == JSON:
                payload, json_length = encode_response(result, body)
                if json_length is None:
                    out = payload, False
                else:
                    out = json_length.to_bytes(4, "little") + payload, True
            else:
                data, content_type = await paths.encode(req, result, body)
                head = {
                    "id": result.id,
                    "model_name": result.model_name,
                    "model_version": result.model_version,
                    "content_type": content_type,
                }
                out = frame(head, data), True
            status = 200
        except ApplianceError as exc:
            status = paths.failed(req, exc)
            out = self._error(item, exc), False
        except Exception:
            paths.crashed(req)
            status = 500
            out = self._error(item, InferenceFailed("internal server error")), False
        paths.finish(req, status)
        return out

    @staticmethod
    def _error(item: _Item, exc: ApplianceError) -> bytes:
        return orjson.dumps({"id": item.wire_id, "error": exc.message, "status": exc.status})

    # -- writing -----------------------------------------------------------------------------
    async def send(self) -> None:
        """Answers in the order the requests came, each once it is ready."""
        ws, queue = self.ws, self.queue
        while True:
            head = queue[0] if queue else None
            task = head.task if head is not None else None
            if task is None or not task.done():
                if self.dropped:
                    await self._send_dropped()
                    continue
                self.changed.clear()
                await self.changed.wait()
                continue
            queue.popleft()
            self.running -= 1
            self.start_more()
            if self.dropped:
                await self._send_dropped()
            data, binary = task.result()
            await ws.send_frame(data, WSMsgType.BINARY if binary else WSMsgType.TEXT)

    async def _send_dropped(self) -> None:
        ids, self.dropped = self.dropped, []
        reason = f"the queue of {self.settings.queue} waiting requests was full (drop_oldest)"
        await self.ws.send_frame(orjson.dumps({"dropped": ids, "reason": reason}), WSMsgType.TEXT)

    async def serve(self) -> None:
        sender = asyncio.ensure_future(self.send())
        try:
            async for msg in self.ws:
                if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                    self.metrics.ws_received += 1
                    await self.accept(self.parse(msg.data))
                    if sender.done():  # it failed to write: the peer is gone
                        break
                elif msg.type == WSMsgType.ERROR:
                    break
        finally:
            sender.cancel()
            for item in self.queue:
                if item.task is not None:
                    item.task.cancel()
            await asyncio.gather(sender, return_exceptions=True)


def _lenient_id(raw: bytes, length: int | None) -> Any:
    """The `id` of a request that could not be decoded, when its JSON can be read."""
    try:
        head = orjson.loads(raw if length is None or length < 0 else raw[:length])
    except orjson.JSONDecodeError:
        return None
    value = head.get("id") if isinstance(head, dict) else None
    return value if isinstance(value, str) else None


async def stream(
    request: web.Request,
    paths: RequestPath,
    req: Request,
    settings: WsSettings,
    begin: Callable[[str | None], Request],
) -> web.StreamResponse:
    """Upgrade to a WebSocket after the model is known (404 otherwise), then serve it."""
    name, version = request.match_info["name"], request.match_info.get("version")
    paths.router.model_of(name, version)
    ws = web.WebSocketResponse(
        max_msg_size=settings.max_message_bytes,
        heartbeat=settings.heartbeat_s or None,
    )
    if not ws.can_prepare(request).ok:
        raise InvalidInput(
            f"{request.path} is a WebSocket: send GET with 'Upgrade: websocket' (RFC 6455)"
        )
    ws.headers["X-Request-Id"] = req.id
    await ws.prepare(request)
    paths.metrics.ws_connections += 1
    try:
        await _Session(ws, paths, name, version, settings, begin).serve()
    finally:
        paths.metrics.ws_connections -= 1
        await ws.close()
    return ws


__all__ = ["Policy", "WsSettings", "frame", "stream"]
