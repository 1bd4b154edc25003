"""Token streaming's fast path: chunk templates, the worker-to-loop hand-off, and pieces that
arrive faster than the loop writes them (they leave in fewer writes, still one event each)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.api.openai import PIECE, _sse, sse_template
from appliance.engine.engine import worker_to_loop
from tests.support.gated import TickingTextBackend

TRICKY = ["", "x", ' "quoted" ', "back\\slash", "line\nbreak\r\n", "\x00", PIECE, "data: x\n\n",
          "é中文🙂", "\ud7ff", "</script>", "\u2028"]  # fmt: skip


def _chunk(content: Any) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
            "model": 'm"o\\del', "system_fingerprint": "appliance-x",
            "choices": [{"index": 0, "delta": {"content": content},
                         "finish_reason": None}]}  # fmt: skip


@pytest.mark.parametrize("text", TRICKY)
def test_template_encodes_as_the_whole_chunk(text: str) -> None:
    assert sse_template(_chunk(PIECE))(text) == _sse(_chunk(text))


@given(st.text())
def test_template_any_text(text: str) -> None:
    assert sse_template(_chunk(PIECE))(text) == _sse(_chunk(text))


def test_template_needs_the_piece_once() -> None:
    with pytest.raises(ValueError, match="exactly once"):
        sse_template(_chunk("no piece"))
    with pytest.raises(ValueError, match="exactly once"):
        sse_template({"a": PIECE, "b": PIECE})


# -- the worker-to-loop hand-off --------------------------------------------------------------
def test_worker_pieces_arrive_in_order_with_fewer_wake_ups() -> None:
    """A worker emitting while the loop is busy: every piece arrives, in order, and the loop is
    woken once per batch, not once per piece."""
    loop = asyncio.new_event_loop()
    wake_ups = [0]
    schedule = loop.call_soon_threadsafe

    def counting(*args: Any, **kwargs: Any) -> Any:
        wake_ups[0] += 1
        return schedule(*args, **kwargs)

    loop.call_soon_threadsafe = counting  # type: ignore[method-assign,assignment]
    got: list[str] = []
    n = 3000

    async def main() -> None:
        emit = worker_to_loop(got.append)
        started = threading.Event()

        def worker() -> None:
            started.set()
            for i in range(n):
                emit(str(i))
                if i % 500 == 0:
                    time.sleep(0.002)  # let the loop catch up now and then

        thread = threading.Thread(target=worker)
        thread.start()
        started.wait()
        time.sleep(0.01)  # the loop is busy: pieces queue up behind one wake-up
        while thread.is_alive() or len(got) < n:
            await asyncio.sleep(0.001)
        thread.join()

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    assert got == [str(i) for i in range(n)]
    assert 1 <= wake_ups[0] < n // 10, wake_ups


# -- a model faster than the loop: a burst of pieces through the server -----------------------
class BurstTextBackend(TickingTextBackend):
    """Emits its pieces back to back (no pause): they reach the loop faster than it writes."""

    name = "burst"
    platform = "test_burst"
    pieces = [f"{i}{TRICKY[i % len(TRICKY)]}" for i in range(400)]

    def generate(self, request: Any, emit: Any, cancelled: Any) -> Any:
        from appliance.llm import GenerationResult

        for text in self.pieces:
            if emit is not None:
                emit(text)
        return GenerationResult("".join(self.pieces), "length", 3, len(self.pieces))


def _burst_source(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    """The `burst` model (BurstTextBackend, registered for this test only)."""
    from appliance import backends
    from appliance.engine import ModelSource
    from appliance.manifest import Manifest
    from tests.support.gated import SIGNATURE

    monkeypatch.setitem(
        backends._BACKENDS, "burst", "tests.api.test_openai_stream:BurstTextBackend"
    )
    BurstTextBackend.gate.set()
    f = tmp_path / "burst.bin"
    f.write_bytes(b"")
    manifest = Manifest("burst", "1", "burst", f.name, "", 0, SIGNATURE, "", "test")
    return ModelSource(manifest, f, verify=False)


@pytest.fixture
async def burst(serve, monkeypatch, tmp_path):
    return await serve({}, [_burst_source(monkeypatch, tmp_path)])


def _events(body: bytes) -> list[bytes]:
    events = body.split(b"\n\n")
    assert events[-1] == b""
    assert all(e.startswith(b"data: ") and b"\n" not in e for e in events[:-1])
    return [e[6:] for e in events[:-1]]


async def test_chat_burst_one_event_per_piece(burst) -> None:
    body = {"model": "burst", "messages": [{"role": "user", "content": "hi"}], "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    r = await burst.post("/v1/chat/completions", json=body)
    assert r.status == 200
    events = _events(await r.read())
    assert events[-1] == b"[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    first, pieces, last, usage = chunks[0], chunks[1:-2], chunks[-2], chunks[-1]
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["delta"] for c in pieces] == [
        {"content": p} for p in BurstTextBackend.pieces
    ]
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1 and next(iter(ids)).startswith("chatcmpl-")
    for c in chunks:
        assert c["object"] == "chat.completion.chunk" and c["model"] == "burst"
        assert set(c) >= {"id", "object", "created", "model", "system_fingerprint", "choices"}
    for c in pieces:
        assert c["choices"][0]["index"] == 0 and c["choices"][0]["finish_reason"] is None
    assert last["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "length"}
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 400


async def test_completion_burst_one_event_per_piece(burst) -> None:
    r = await burst.post("/v1/completions", json={"model": "burst", "prompt": "hi", "stream": True})
    assert r.status == 200
    events = _events(await r.read())
    assert events[-1] == b"[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert [c["choices"][0]["text"] for c in chunks[:-1]] == BurstTextBackend.pieces
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert all(c["object"] == "text_completion" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


# -- the generating thread writing to the socket itself (api/stream_pieces.py) ---------------
def _wmem_max() -> int:
    """The most a TCP socket's send buffer may hold (net.ipv4.tcp_wmem's third field)."""
    try:
        with open("/proc/sys/net/ipv4/tcp_wmem") as f:
            return int(f.read().split()[2])
    except (OSError, IndexError, ValueError):
        return 4 << 20


_WMEM_MAX = _wmem_max()


class BigBurstTextBackend(BurstTextBackend):
    """Pieces far larger than the socket's buffers hold, back to back."""

    name = "bigburst"
    platform = "test_bigburst"
    #: ~7 KB events, 2x what the kernel lets a send buffer grow to: with 3 MB of events its
    #: autotuning once took the whole burst, and the thread never had to hand back
    pieces = [f"{i:05d}" + 'x\u00e9"\n' * 1000 for i in range(max(400, 2 * _WMEM_MAX // 7000))]
    done = threading.Event()
    #: True once the stream lets this thread write (set by the test): the burst waits for it
    direct: Callable[[], bool] = staticmethod(lambda: True)

    def generate(self, request: Any, emit: Any, cancelled: Any) -> Any:
        from appliance.llm import GenerationResult

        cls = type(self)
        try:
            emit(cls.pieces[0])
            for _ in range(1000):  # the loop writes the first piece, then hands over
                if cls.direct():
                    break
                time.sleep(0.01)
            for text in cls.pieces[1:]:
                emit(text)
            return GenerationResult("".join(cls.pieces), "length", 3, len(cls.pieces))
        finally:
            cls.done.set()


@pytest.fixture
def recorded(monkeypatch) -> list[Any]:
    """Every stream's `Pieces` (to read its counters)."""
    from appliance.api import openai as api
    from appliance.api.stream_pieces import Pieces

    made: list[Any] = []

    class Recorded(Pieces):
        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            made.append(self)

    monkeypatch.setattr(api, "Pieces", Recorded)
    return made


async def test_thread_writes_then_a_slow_client_hands_back_to_the_loop(
    serve, monkeypatch, tmp_path, recorded
) -> None:
    """A client that reads nothing until the model is done: the thread's direct writes fill
    the socket, the loop takes over with the unsent rest, and the client still gets every
    event whole and in order."""
    import socket

    from appliance import backends
    from appliance.bench.llm import SseReader
    from appliance.engine import ModelSource
    from appliance.manifest import Manifest
    from tests.support.gated import SIGNATURE

    monkeypatch.setitem(
        backends._BACKENDS, "bigburst", "tests.api.test_openai_stream:BigBurstTextBackend"
    )
    BigBurstTextBackend.gate.set()
    BigBurstTextBackend.done.clear()
    monkeypatch.setattr(
        BigBurstTextBackend, "direct", lambda: bool(recorded and recorded[0]._direct)
    )
    f = tmp_path / "bigburst.bin"
    f.write_bytes(b"")
    manifest = Manifest("bigburst", "1", "bigburst", f.name, "", 0, SIGNATURE, "", "test")
    client = await serve({}, [ModelSource(manifest, f, verify=False)])
    body = orjson.dumps({"model": "bigburst", "prompt": "hi", "stream": True})
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, (client.host, client.port))
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body  # fmt: skip
    await loop.sock_sendall(sock, head)
    try:
        await asyncio.wait_for(loop.run_in_executor(None, BigBurstTextBackend.done.wait, 60), 70)
        raw = b""
        while b"\r\n\r\n" not in raw:
            raw += await loop.sock_recv(sock, 65536)
        response_head, _, rest = raw.partition(b"\r\n\r\n")
        assert response_head.startswith(b"HTTP/1.1 200") and b"chunked" in response_head.lower()
        reader = SseReader(True, None)
        events = reader.feed(rest)
        while not reader.done:
            data = await loop.sock_recv(sock, 1 << 20)
            assert data, "the server closed the stream early"
            events += reader.feed(data)
    finally:
        sock.close()
    assert events[-1] == b"[DONE]"
    texts = [orjson.loads(e)["choices"][0]["text"] for e in events[:-2]]
    assert texts == BigBurstTextBackend.pieces
    (pieces,) = recorded
    assert pieces.direct_writes >= 1 and pieces.handed_back >= 1, vars(pieces)
    assert pieces._fd == -1  # its duplicate descriptor is closed
    assert (await client.get("/v1/models")).status == 200  # still serving


async def test_tls_streams_stay_with_the_loop(monkeypatch, recorded, tmp_path) -> None:
    """Over TLS the bytes on the socket are the loop's to encrypt: the thread never writes,
    and the stream arrives whole."""
    import socket
    import ssl

    import aiohttp

    from appliance.api.http import LOADER
    from appliance.api.http_server import open_server
    from appliance.config import load_config
    from appliance.server import build
    from tests.support.certs import make_pki

    config = load_config(None, {"model_defaults": {"probe_first_load": False}}, {})
    app = build(config, [_burst_source(monkeypatch, tmp_path)])
    pki = make_pki(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(pki["server.crt"], pki["server.key"])
    running = await open_server(app, socket.create_server(("127.0.0.1", 0)), server_ctx)
    try:
        await app[LOADER]
        client_ctx = ssl.create_default_context(cafile=str(pki["ca.crt"]))
        body = {"model": "burst", "prompt": "hi", "stream": True}
        url = f"https://localhost:{running.port}/v1/completions"
        async with (
            aiohttp.ClientSession() as session,
            session.post(url, json=body, ssl=client_ctx) as r,
        ):
            assert r.status == 200
            events = _events(await r.read())
    finally:
        await running.close()
    texts = [orjson.loads(e)["choices"][0]["text"] for e in events[:-2]]
    assert texts == BurstTextBackend.pieces
    assert [p.direct_writes for p in recorded] == [0]


async def test_a_device_with_a_text_model_makes_aiohttp_once_its_models_are_loaded(
    monkeypatch, tmp_path
) -> None:
    """OpenAI requests are aiohttp's: with a language model loaded, its application is made
    as loading ends, so the first chat request does not stall on the import (a tensor-only
    device never makes it: tests/api/test_http_server.py, tests/test_idle_memory.py)."""
    import socket

    from appliance.api.http import LOADER
    from appliance.api.http_server import open_server
    from appliance.config import load_config
    from appliance.server import build

    config = load_config(None, {"model_defaults": {"probe_first_load": False}}, {})
    app = build(config, [_burst_source(monkeypatch, tmp_path)])
    running = await open_server(app, socket.create_server(("127.0.0.1", 0)))
    try:
        assert not running.runner.started  # not before loading: readiness is the fast path's
        await app[LOADER]
        await asyncio.sleep(0)  # the loader's done callbacks
        assert running.runner.started and app.web_built
    finally:
        await running.close()
