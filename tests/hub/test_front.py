"""The lean device front (hub/front.py) and what polls keep in memory (hub/polls.py).

Raw HTTP/1.1 on one connection, so that which path answered is known: aiohttp adds its
`Server` header, the front does not. Both stores (the `env` fixture)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson

from appliance.hub.records import Event
from appliance.hub.service import Hub

from .conftest import HubEnv

Answer = tuple[int, dict[str, str], bytes]


class Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def send(self, raw: bytes) -> Answer:
        self.writer.write(raw)
        return await self.answer()

    async def answer(self) -> Answer:
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {}
        for line in lines[1:]:
            if line:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
        body = b""
        if status != 304:
            body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        return status, headers, body

    def close(self) -> None:
        self.writer.close()


async def connect(env: HubEnv) -> Conn:
    server = env.client.server
    assert server.host is not None and server.port is not None
    return Conn(*await asyncio.open_connection(server.host, server.port))


def get(path: str, token: str | None, **headers: str) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: hub"]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def post(path: str, token: str, body: bytes, **headers: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: hub", f"Authorization: Bearer {token}"]
    lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def events(*seqs: int) -> bytes:
    return orjson.dumps(
        {"events": [{"seq": s, "time": "2026-12-07T12:00:00Z", "kind": "sim"} for s in seqs]}
    )


POLL, UPLOAD = "/api/v1/device/assignments", "/api/v1/device/telemetry"


async def published(env: HubEnv, tmp_path: Path) -> None:
    model = tmp_path / "model.json"
    model.write_text('{"steps": []}')
    env.hub.publish("m", "1", model, backend="onnx", manifest={})


async def test_polls_and_uploads_on_the_front_then_aiohttp(env: HubEnv, tmp_path: Path) -> None:
    await published(env, tmp_path)
    token = await env.enroll("dev-a")
    await env.rollout("m", "1", {"all": True})
    conn = await connect(env)
    try:
        status, headers, body = await conn.send(get(POLL, token))
        assert status == 200 and "server" not in headers  # the front answered
        assert [m["version"] for m in orjson.loads(body)["models"]] == ["1"]
        etag = headers["etag"]
        status, headers, _ = await conn.send(get(POLL, token, If_None_Match=etag))
        assert (status, headers["etag"], "server" in headers) == (304, etag, False)
        status, headers, body = await conn.send(post(UPLOAD, token, events(1, 2)))
        assert status == 200 and "server" not in headers
        assert orjson.loads(body) == {"stored": 2, "duplicates": 0, "max_seq": 2}
        status, _, body = await conn.send(post(UPLOAD, token, events(2, 3)))
        assert orjson.loads(body) == {"stored": 1, "duplicates": 1, "max_seq": 3}
        # another route: aiohttp takes the connection, and answers polls alike from then on
        status, headers, _ = await conn.send(get("/healthz", None))
        assert status == 200 and "aiohttp" in headers["server"]
        status, headers, _ = await conn.send(get(POLL, token, If_None_Match=etag))
        assert (status, headers["etag"]) == (304, etag) and "aiohttp" in headers["server"]
    finally:
        conn.close()
    stored = env.hub.store.events("dev-a", 0, 10)
    assert [e.seq for e in stored] == [1, 2, 3]
    devices = {d["device_id"]: d for d in env.hub.devices()}
    assert devices["dev-a"]["last_seen"] is not None  # batched, written before the list


async def test_front_errors_are_precise_and_the_connection_serves_on(env: HubEnv) -> None:
    token = await env.enroll("dev-b")
    conn = await connect(env)
    try:
        status, headers, body = await conn.send(get(POLL, "nope"))
        assert status == 401 and headers["www-authenticate"].startswith("Bearer")
        assert orjson.loads(body) == {"error": "missing or unknown device token"}
        status, _, body = await conn.send(get(POLL, env.admin_token))
        assert status == 403 and b"admin token" in body
        status, _, body = await conn.send(get(POLL, token, X_Device_Id="dev-other"))
        assert status == 403 and b"dev-other" in body
        status, _, body = await conn.send(post(UPLOAD, token, b"{not json"))
        assert status == 400 and b"not valid JSON" in body
        status, _, body = await conn.send(post(UPLOAD, token, b'{"events": [{"seq": 0}]}'))
        assert status == 400 and b"events[0].seq" in body
        status, headers, _ = await conn.send(get(POLL, token))
        assert status == 200 and "server" not in headers  # still the front, still serving
        big = b" " * (env.hub.config.max_telemetry_bytes + 1)
        status, headers, body = await conn.send(post(UPLOAD, token, big))
        assert status == 413 and headers["connection"] == "close"
        assert await conn.reader.read() == b""  # closed: the body was not worth reading
    finally:
        conn.close()


async def test_chunked_upload_goes_to_aiohttp(env: HubEnv) -> None:
    token = await env.enroll("dev-c")
    body = events(7)
    chunked = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    raw = (
        f"POST {UPLOAD} HTTP/1.1\r\nHost: hub\r\nAuthorization: Bearer {token}\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode() + chunked
    conn = await connect(env)
    try:
        status, headers, answer = await conn.send(raw)
    finally:
        conn.close()
    assert status == 200 and "aiohttp" in headers["server"]
    assert orjson.loads(answer)["stored"] == 1


async def test_a_rollout_made_elsewhere_reaches_polls(env: HubEnv, tmp_path: Path) -> None:
    """Another process (the CLI, another replica) changes rollouts: polls answered from
    memory see it once the server re-reads the fleet generation (every second); a change
    made through this server is seen by the very next poll."""
    await published(env, tmp_path)
    token = await env.enroll("dev-d")
    assert await env.assignments(token) == {}
    other = Hub(env.hub.config)  # its own store connection, as `appliance hub rollout` has
    try:
        rollout = other.create_rollout("m", "1", {"all": True})
        for _ in range(100):
            if await env.assignments(token) == {"m": "1"}:
                break
            await asyncio.sleep(0.1)
        assert await env.assignments(token) == {"m": "1"}
    finally:
        other.close()
    resp = await env.client.post(
        f"/api/v1/admin/rollouts/{rollout.public_id}/rollback", headers=env.admin()
    )
    assert resp.status == 200
    assert await env.assignments(token) == {}  # at once: this process made the change


async def test_a_failing_upload_fails_alone_in_its_group(env: HubEnv) -> None:
    """A group commit whose transaction fails is retried upload by upload: the others are
    stored, the bad one gets its error."""
    for name in ("g1", "g2", "g3"):
        await env.enroll(name)
    hub = env.hub
    devices = {d.device_id: d for d in hub.store.devices()}

    def ev(device: str, seq: int, data: Any) -> Event:
        return Event(device, seq, "2026-12-07T12:00:00Z", "sim", data, "2026-12-07T12:00:01Z")

    bad = ev("g2", 1, {"x": {1, 2}})  # a set: not JSON, the insert fails
    uploads = [
        (devices["g1"], [ev("g1", 1, {}), ev("g1", 2, {})]),
        (devices["g2"], [bad]),
        (devices["g3"], [ev("g3", 5, {})]),
        (devices["g1"], [ev("g1", 2, {}), ev("g1", 3, {})]),
    ]
    results = await asyncio.to_thread(hub.store_telemetry, uploads)
    assert results[0] == {"stored": 2, "duplicates": 0, "max_seq": 2}
    assert isinstance(results[1], TypeError)
    assert results[2] == {"stored": 1, "duplicates": 0, "max_seq": 5}
    assert results[3] == {"stored": 1, "duplicates": 1, "max_seq": 3}
    assert [e.seq for e in hub.store.events("g1", 0, 10)] == [1, 2, 3]
    assert hub.store.events("g2", 0, 10) == []


async def test_concurrent_uploads_are_each_stored_once(env: HubEnv) -> None:
    """Many devices uploading at once (grouped into shared transactions): every event once,
    every answer right."""
    tokens = [await env.enroll(f"c{i:02d}") for i in range(12)]

    async def device(token: str) -> list[Any]:
        conn = await connect(env)
        try:
            out = []
            for n in range(4):
                status, _, body = await conn.send(post(UPLOAD, token, events(2 * n + 1, 2 * n + 2)))
                assert status == 200, body
                out.append(orjson.loads(body))
            return out
        finally:
            conn.close()

    answers = await asyncio.gather(*(device(t) for t in tokens))
    for got in answers:
        assert [a["max_seq"] for a in got] == [2, 4, 6, 8]
        assert all(a["stored"] == 2 and a["duplicates"] == 0 for a in got)
    assert env.hub.store.count_events() == 12 * 8
