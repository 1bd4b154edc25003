"""The HTTP/1.1 front protocol (api/http_server.py) byte by byte over real loopback sockets: the
hot path, requests handed to aiohttp on the same connection, hand-overs, limits and bad input."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp import web

from appliance.api import http_server
from appliance.api.http import ENGINE, LOADER
from appliance.api.http_server import open_server, parse_head
from appliance.config import load_config
from appliance.server import build, sources_from_store

BODY = orjson.dumps(
    {
        "inputs": [
            {"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [5.1, 3.5, 1.4, 0.2]}
        ]
    }
)
INFER = "/v2/models/sample/infer"


def request(method: str, path: str, body: bytes = b"", **headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: test"]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
        lines.append("Content-Type: application/json")
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class Conn:
    """One raw keep-alive connection that reads responses with a Content-Length."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def response(self) -> tuple[int, dict[str, str], bytes]:
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 10)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {}
        for line in lines[1:]:
            if line:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
        if "content-length" in headers:
            body = await self.reader.readexactly(int(headers["content-length"]))
        else:
            assert headers.get("transfer-encoding") == "chunked", headers
            body = b""
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).strip(), 16)
                chunk = await self.reader.readexactly(size + 2)
                if size == 0:
                    break
                body += chunk[:-2]
        return status, headers, body

    async def closed(self) -> bool:
        return await asyncio.wait_for(self.reader.read(1), 10) == b""

    def close(self) -> None:
        self.writer.close()


@pytest.fixture
async def connect(serve):
    conns: list[Conn] = []
    port = None

    async def open_conn(overrides=None) -> Conn:
        nonlocal port
        if port is None or overrides is not None:
            client = await serve(overrides)
            port = client.server.port
        conn = Conn(*await asyncio.open_connection("127.0.0.1", port))
        conns.append(conn)
        return conn

    yield open_conn
    for conn in conns:
        conn.close()


def test_parse_head_takes_only_plain_requests():
    head = parse_head(b"POST /v2/models/a/infer?x=1 HTTP/1.1\r\nHost: h\r\nContent-Length: 12")
    assert head is not None and head.length == 12 and head.query == "x=1"
    assert head.headers.get("HOST") == "h" and not head.close
    closing = parse_head(b"GET / HTTP/1.1\r\nConnection: close")
    assert closing is not None and closing.close
    refused = [
        b"GET / HTTP/1.0",  # HTTP/1.0: aiohttp's keep-alive rules
        b"GET http://h/ HTTP/1.1",  # absolute form
        b"GET /  HTTP/1.1",
        b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2",  # smuggling
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked",
        b"POST / HTTP/1.1\r\nContent-Length: +5",
        b"POST / HTTP/1.1\r\nContent-Length: \xd9\xa3",  # non-ASCII digit
        b"POST / HTTP/1.1\r\nExpect: 100-continue",
        b"GET / HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket",
        b"GET / HTTP/1.1\r\n folded: header",  # obs-fold
        b"GET / HTTP/1.1\r\nBad Name: x",
        b"GET / HTTP/1.1\r\nNo-colon",
        b"GET / HTTP/1.1\r\nX: a\nY: b",  # bare LF
        "GET / HTTP/1.1\r\nX: é".encode(),
    ]
    for raw in refused:
        assert parse_head(raw) is None, raw


async def test_hot_and_handed_over_requests_share_one_connection(connect):
    conn = await connect()
    sequence = [
        request("POST", INFER, BODY, X_Request_Id="r-1"),
        request("GET", "/v2/models/sample"),
        request("POST", INFER, BODY),
        request("GET", "/v2/health/ready"),
        request("GET", "/v2/health/live"),
        request("POST", "/v2/repository/index"),
        request("POST", INFER, BODY),
    ]
    answers = []
    for raw in sequence:
        await conn.send(raw)
        answers.append(await conn.response())
    assert [a[0] for a in answers] == [200] * len(sequence)
    assert answers[0][1]["x-request-id"] == "r-1"
    assert answers[0][1]["x-model-name"] == "sample" and answers[0][1]["x-model-version"] == "1"
    assert orjson.loads(answers[0][2]) == orjson.loads(answers[2][2])
    assert orjson.loads(answers[1][2])["name"] == "sample"
    assert orjson.loads(answers[4][2]) == {"live": True}
    assert all("x-request-id" in a[1] for a in answers)


async def test_pipelined_requests_are_answered_in_order(connect):
    conn = await connect()
    batch = [
        request("POST", INFER, BODY, X_Request_Id="a"),
        request("GET", "/v2/models/sample", X_Request_Id="b"),
        request("POST", INFER, b"{not json", X_Request_Id="c"),
        request("GET", "/nowhere", X_Request_Id="d"),
        request("POST", INFER, BODY, X_Request_Id="e"),
    ]
    await conn.send(b"".join(batch))
    got = [await conn.response() for _ in batch]
    assert [(s, h["x-request-id"]) for s, h, _ in got] == [
        (200, "a"), (200, "b"), (400, "c"), (404, "d"), (200, "e"),
    ]  # fmt: skip
    assert "malformed JSON" in orjson.loads(got[2][2])["error"]


async def test_a_client_that_pipelines_megabytes_is_paused_then_served(connect):
    """Reading pauses above 1 MiB of unanswered requests and resumes as they are answered,
    whichever path answers them."""
    conn = await connect()
    pad = "p" * 4000
    batch = [request("GET", "/v2/models/sample", X_Pad=pad) for _ in range(1000)]
    batch.insert(0, request("POST", INFER, BODY))
    batch.append(request("POST", INFER, BODY))
    sender = asyncio.ensure_future(conn.send(b"".join(batch)))
    statuses = [(await conn.response())[0] for _ in batch]
    await sender
    assert statuses == [200] * len(batch)


async def test_body_in_pieces_and_binary_output(connect):
    conn = await connect()
    body = orjson.loads(BODY)
    body["parameters"] = {"binary_data_output": True}
    raw = request("POST", INFER, orjson.dumps(body))
    head_end = raw.index(b"\r\n\r\n") + 4
    for piece in (raw[:10], raw[10:head_end], raw[head_end : head_end + 7], raw[head_end + 7 :]):
        await conn.send(piece)
        await asyncio.sleep(0.01)
    status, headers, body = await conn.response()
    assert status == 200
    assert headers["content-type"] == "application/octet-stream"
    assert int(headers["inference-header-content-length"]) < len(body)


async def test_chunked_and_http10_requests_go_to_aiohttp(connect):
    conn = await connect()
    chunked = (
        f"POST {INFER} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode()
    chunked += f"{len(BODY):x}\r\n".encode() + BODY + b"\r\n0\r\n\r\n"
    await conn.send(chunked)
    status, _, body = await conn.response()
    assert status == 200 and orjson.loads(body)["model_name"] == "sample"
    await conn.send(request("POST", INFER, BODY))  # the connection stays aiohttp's, and works
    assert (await conn.response())[0] == 200

    old = await connect()
    await old.send(b"GET /v2/health/live HTTP/1.0\r\n\r\n")
    status, _, body = await old.response()
    assert status == 200 and orjson.loads(body) == {"live": True}
    assert await old.closed()


async def test_malformed_head_is_refused_by_aiohttp_and_the_server_goes_on(connect):
    conn = await connect()
    await conn.send(
        b"POST /v2/models/sample/infer HTTP/1.1\r\nContent-Length: 5\r\n"
        b"Content-Length: 7\r\n\r\n12345"
    )
    status, _, _ = await conn.response()
    assert status == 400
    again = await connect()
    await again.send(request("POST", INFER, BODY))
    assert (await again.response())[0] == 200


async def test_refusals_from_the_head_skip_the_body_and_keep_the_connection(connect):
    conn = await connect()
    await conn.send(request("POST", "/v2/models/nope/infer", BODY) + request("POST", INFER, BODY))
    status, headers, body = await conn.response()
    assert status == 404 and orjson.loads(body) == {"error": "unknown model 'nope'"}
    assert headers["content-type"] == "application/json"
    assert (await conn.response())[0] == 200
    # the refusal is sent before the body has arrived; the body is then skipped as it comes
    raw = request("POST", "/v2/models/nope/versions/2/infer", BODY)
    cut = raw.index(b"\r\n\r\n") + 4
    await conn.send(raw[:cut])
    assert (await conn.response())[0] == 404
    await conn.send(raw[cut:] + request("GET", "/v2/health/live"))
    assert (await conn.response())[0] == 200


async def test_body_over_the_limit_is_413_and_closes(connect):
    conn = await connect({"server": {"max_body_bytes": 2000}})
    head = f"POST {INFER} HTTP/1.1\r\nHost: t\r\nContent-Length: 5000000\r\n\r\n".encode()
    await conn.send(head + b"x" * 100)
    status, headers, body = await conn.response()
    assert status == 413 and "limit of 2000 bytes" in orjson.loads(body)["error"]
    assert headers["connection"] == "close"
    assert await conn.closed()
    fresh = await connect()
    await fresh.send(request("POST", INFER, BODY))
    assert (await fresh.response())[0] == 200


async def test_bearer_token_on_the_hot_path(connect):
    conn = await connect({"server": {"auth_token": "s3cret"}})
    await conn.send(request("POST", INFER, BODY))
    status, headers, body = await conn.response()
    assert status == 401 and headers["www-authenticate"].startswith("Bearer")
    assert orjson.loads(body) == {"error": "missing or wrong bearer token"}
    await conn.send(request("POST", INFER, BODY, Authorization="Bearer wrong"))
    assert (await conn.response())[0] == 401
    await conn.send(request("POST", INFER, BODY, Authorization="Bearer s3cret"))
    assert (await conn.response())[0] == 200
    await conn.send(request("GET", "/v2/health/live"))  # health needs no token
    assert (await conn.response())[0] == 200
    await conn.send(request("GET", "/v2/models/sample"))  # nor does aiohttp's side forget it
    assert (await conn.response())[0] == 401


async def test_connection_close_is_honoured_on_both_paths(connect):
    cases = [
        (INFER, "POST", BODY, 200),
        ("/v2/models/sample", "GET", b"", 200),
        ("/v2/health/live", "GET", b"", 200),
        ("/v2/models/nope/infer", "POST", BODY, 404),
    ]
    for path, method, body, expected in cases:
        conn = await connect()
        await conn.send(request(method, path, body, Connection="close"))
        status, headers, _ = await conn.response()
        assert status == expected and headers.get("connection", "").lower() == "close"
        assert await conn.closed()


async def test_metrics_count_hot_path_responses_by_route(connect):
    conn = await connect()
    for raw in (request("POST", INFER, BODY), request("POST", INFER, b"[]"),
                request("POST", "/v2/models/sample/versions/1/infer", BODY)):  # fmt: skip
        await conn.send(raw)
        await conn.response()
    await conn.send(request("GET", "/metrics"))
    _, _, text = await conn.response()
    lines = text.decode().splitlines()
    assert (
        'appliance_http_responses_total{route="/v2/models/{name}/infer",status="200"} 1.0' in lines
    )
    assert (
        'appliance_http_responses_total{route="/v2/models/{name}/infer",status="400"} 1.0' in lines
    )
    versioned = '{route="/v2/models/{name}/versions/{version}/infer",status="200"} 1.0'
    assert f"appliance_http_responses_total{versioned}" in lines


async def test_idle_connections_are_closed_after_the_keepalive_timeout(store):
    overrides = {"store": {"path": str(store.root)}, "server": {"keepalive_timeout_s": 0.3}}
    config = load_config(None, overrides, {})
    app = build(config, sources_from_store(store.root), store)
    sock = socket.create_server(("127.0.0.1", 0))
    running = await open_server(app, sock)
    try:
        await app[LOADER]
        conn = Conn(*await asyncio.open_connection("127.0.0.1", running.port))
        await conn.send(request("POST", INFER, BODY))
        assert (await conn.response())[0] == 200
        assert await conn.closed()  # within the sweep after 0.3 s idle
        conn.close()
    finally:
        await running.close()


async def test_aiohttp_is_made_at_the_first_request_handed_over_and_only_then(store):
    """A device that only gets infer, health, readiness and metrics never makes aiohttp's
    application (api/app.py: importing aiohttp is ~14 MiB of idle memory); the first other
    request makes it, once, on the loop; the contexts started with the server run once."""
    overrides = {"store": {"path": str(store.root)}, "model_defaults": {"probe_first_load": False}}
    app = build(load_config(None, overrides, {}), sources_from_store(store.root), store)
    seen: list[str] = []

    async def ctx(_app: object) -> AsyncIterator[None]:
        seen.append("start")
        yield
        seen.append("stop")

    app.cleanup_ctx.append(ctx)
    running = await open_server(app, socket.create_server(("127.0.0.1", 0)))
    try:
        await app[LOADER]
        conn = Conn(*await asyncio.open_connection("127.0.0.1", running.port))
        hot = ["/v2/health/live", "/v2/health/ready", "/metrics"]
        for raw in [request("POST", INFER, BODY), *(request("GET", path) for path in hot)]:
            await conn.send(raw)
            status, headers, _ = await conn.response()
            assert status == 200 and "server" not in headers  # the fast path names no server
        assert not app.web_built and not running.runner.started
        await conn.send(request("GET", "/v2"))
        status, headers, body = await conn.response()
        assert status == 200 and "aiohttp" in headers["server"], body
        web_app = app.web()
        assert running.runner.started and web_app[ENGINE] is app[ENGINE]  # one state
        other = Conn(*await asyncio.open_connection("127.0.0.1", running.port))
        await other.send(request("GET", "/v2/models/sample"))
        assert (await other.response())[0] == 200
        assert app.web() is web_app
        assert seen == ["start"]
        for c in (conn, other):
            c.close()
    finally:
        await running.close()
    assert seen == ["start", "stop"]


async def test_an_aiohttp_app_that_cannot_be_made_is_a_500_and_the_fast_path_serves_on(store):
    overrides = {"store": {"path": str(store.root)}, "model_defaults": {"probe_first_load": False}}
    app = build(load_config(None, overrides, {}), sources_from_store(store.root), store)

    def broken(_web_app: web.Application) -> None:
        raise RuntimeError("a route table that cannot be built")

    app.on_web.append(broken)
    running = await open_server(app, socket.create_server(("127.0.0.1", 0)))
    try:
        await app[LOADER]
        conn = Conn(*await asyncio.open_connection("127.0.0.1", running.port))
        await conn.send(request("GET", "/v2"))
        status, _, body = await conn.response()
        assert (status, orjson.loads(body)) == (500, {"error": "internal server error"})
        assert await conn.closed()
        conn.close()
        other = Conn(*await asyncio.open_connection("127.0.0.1", running.port))
        await other.send(request("POST", INFER, BODY))
        assert (await other.response())[0] == 200
        other.close()
    finally:
        await running.close()


async def test_readiness_and_metrics_on_the_fast_path_answer_as_aiohttp_does(store, connect):
    """Same status, body and content type from both servers (fast_path off: aiohttp's)."""
    fast, slow = await connect(), await connect({"server": {"fast_path": False}})
    for path in ("/v2/health/ready", "/metrics"):
        answers = []
        for conn in (fast, slow):
            await conn.send(request("GET", path))
            answers.append(await conn.response())
        (s1, h1, b1), (s2, h2, b2) = answers
        assert s1 == s2 == 200 and h1["content-type"] == h2["content-type"], (h1, h2)
        if path != "/metrics":  # the counters move between the two
            assert orjson.loads(b1) == orjson.loads(b2)


async def test_fast_path_off_sends_everything_to_aiohttp(connect):
    conn = await connect({"server": {"fast_path": False}})
    await conn.send(request("POST", INFER, BODY) + request("GET", "/v2/health/live"))
    for _ in range(2):
        status, headers, _ = await conn.response()
        assert status == 200 and "aiohttp" in headers["server"]
    fast = await connect({})
    await fast.send(request("POST", INFER, BODY))
    status, headers, _ = await fast.response()
    assert status == 200 and "server" not in headers  # the hot path names no server


async def test_requests_aiohttp_answers_outlive_the_sweep_and_a_graceful_close(store):
    """A connection handed to aiohttp may be silent while its answer is made (a slow route, a
    streamed chat): neither the keep-alive sweep nor shutdown cuts it off."""
    overrides = {"store": {"path": str(store.root)}, "server": {"keepalive_timeout_s": 0.2}}
    config = load_config(None, overrides, {})
    app = build(config, sources_from_store(store.root), store)

    async def slow(_request: web.Request) -> web.Response:
        await asyncio.sleep(1.0)
        return web.json_response({"slow": True})

    app.router.add_get("/slow", slow)
    sock = socket.create_server(("127.0.0.1", 0))
    running = await open_server(app, sock)
    try:
        await app[LOADER]
        handed = b"GET /slow HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"  # HTTP/1.0: aiohttp's
        conn = Conn(*await asyncio.open_connection("127.0.0.1", running.port))
        await conn.send(handed)
        status, _, body = await conn.response()
        assert (status, orjson.loads(body)) == (200, {"slow": True})
        delegated = Conn(*await asyncio.open_connection("127.0.0.1", running.port))
        await delegated.send(request("GET", "/slow"))
        await conn.send(handed)
        await asyncio.sleep(0.3)
        closing = asyncio.create_task(running.close(timeout_s=5))
        for c in (conn, delegated):
            status, _, body = await c.response()
            assert (status, orjson.loads(body)) == (200, {"slow": True})
            assert await c.closed()
            c.close()
        await closing
    finally:
        await running.close()


def _inline_runs(metrics: str, model: str) -> float:
    prefix = f'appliance_inference_inline_requests_total{{model="{model}"'
    lines = metrics.splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(prefix))


@pytest.mark.parametrize(
    ("inline", "eager_connections"),
    [(True, 100), (True, 0), (False, 100)],
    ids=["inline", "inline-busy-server", "queued"],
)
async def test_a_pipelined_burst_is_answered_in_order(
    serve, monkeypatch, inline, eager_connections
):
    """A burst of pipelined requests on one connection, longer than the fast path answers in
    one loop callback (http_server.BURST): each answer is its own request's, in order, whether
    the model answers inline (no Task at all, api/eager.py), inline on a server with more
    connections than start requests at once (a Task each), or through its queue (a Task)."""
    monkeypatch.setattr(http_server, "EAGER_CONNECTIONS", eager_connections)
    budget = 1e6 if inline else 0.0  # µs: every measured run fits, or none does
    client = await serve({"models": {"sample": {"inline_max_us": budget}}})
    tensor = {"name": "input", "datatype": "FP32", "shape": [1, 4]}
    bodies = [orjson.dumps({"inputs": [{**tensor, "data": [i, 3.5, 1.4, 0.2]}]}) for i in range(4)]
    conn = Conn(*await asyncio.open_connection("127.0.0.1", client.server.port))
    try:
        expected = []
        for i in range(16):  # one at a time: the runs the scheduler measures first
            await conn.send(request("POST", INFER, bodies[i % 4]))
            status, _, body = await conn.response()
            assert status == 200
            expected.append(orjson.loads(body)["outputs"])
        assert expected[:4] == expected[4:8] and expected[0] != expected[1]
        before = _inline_runs(await (await client.get("/metrics")).text(), "sample")
        n = 41
        burst = [request("POST", INFER, bodies[i % 4], X_Request_Id=f"r{i}") for i in range(n)]
        loop = asyncio.get_running_loop()
        made: list[str] = []  # the Tasks made on the loop for these requests (the server's)

        def factory(lp: asyncio.AbstractEventLoop, coro: Any, **kw: Any) -> asyncio.Task[Any]:
            made.append(str(getattr(coro, "__qualname__", None) or getattr(coro, "__name__", "")))
            return asyncio.Task(coro, loop=lp, **kw)

        loop.set_task_factory(factory)
        try:
            await conn.send(b"".join(burst))
            got = [await conn.response() for _ in range(n)]
        finally:
            loop.set_task_factory(None)
        eager = inline and eager_connections > 0
        assert made.count("Connection._infer") == (0 if eager else n)
        assert [(s, h["x-request-id"]) for s, h, _ in got] == [(200, f"r{i}") for i in range(n)]
        outputs = [orjson.loads(b)["outputs"] for _, _, b in got]
        assert outputs == [expected[i % 4] for i in range(n)]
        after = _inline_runs(await (await client.get("/metrics")).text(), "sample")
        assert after - before == (n if inline else 0)
    finally:
        conn.close()


async def test_a_client_gone_while_its_request_is_queued_frees_the_connection(serve, gated):
    """The request goes on (it is queued, then runs) after its client left; once it is done the
    connection is gone from the server and the server answers the next client."""
    from tests.support.gated import GatedBackend

    client = await serve({"models": {"gated": {"inline_max_us": 0}}}, gated)
    http = client.server.running.http
    x = {"name": "x", "datatype": "FP32", "shape": [2], "data": [1, 2]}
    body = orjson.dumps({"inputs": [x]})
    conn = Conn(*await asyncio.open_connection("127.0.0.1", client.server.port))
    await conn.send(request("POST", "/v2/models/gated/infer", body))
    assert await asyncio.to_thread(GatedBackend.started.acquire, True, 10)  # it runs
    (served,) = http.connections
    assert served.busy and served.task is not None and not served.task.done()
    conn.close()
    while http.connections:  # connection_lost, whenever the loop sees the close
        await asyncio.sleep(0.01)
    GatedBackend.gate.set()
    await asyncio.wait_for(served.task, 10)
    assert not served.busy and served.transport is None
    r = await client.post("/v2/models/gated/infer", data=body)
    assert r.status == 200 and (await r.json())["outputs"][0]["data"] == [2.0, 4.0]
