"""Connection floods and slowloris against the real server (api/http_server.py, api/limits.py):
heads and bodies dribbled past their limits get 408 and a close, idle keep-alive connections
past `max_connections` make room for new ones, and health stays answered throughout."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import shutil
import socket
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from appliance.api.http import LOADER
from appliance.api.http_server import RunningServer, open_server
from appliance.config import load_config
from appliance.errors import ConfigError
from appliance.registry import Registry
from appliance.server import build, sources_from_store
from tests.conftest import start_server_process, stop_server_process

INFER = "/v2/models/sample/infer"
BODY = b'{"inputs":[{"name":"input","shape":[1,4],"datatype":"FP32","data":[1,2,3,4]}]}'
LIVE = b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\n\r\n"
Start = Callable[..., Awaitable[RunningServer]]
#: Idle connections opened at once against a server with a small fd limit (this process needs
#: as many fds itself).
FLOOD = min(2000, resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 200)


@pytest.fixture
async def limited(store: Registry) -> AsyncIterator[Start]:
    """The real server on a loopback port, with [server] limits from the test."""
    running: list[RunningServer] = []

    async def start(**server: Any) -> RunningServer:
        overrides = {
            "store": {"path": str(store.root)},
            "model_defaults": {"probe_first_load": False},
            "server": server,
        }
        config = load_config(None, overrides, {})
        app = build(config, sources_from_store(store.root), store)
        r = await open_server(app, socket.create_server(("127.0.0.1", 0)))
        running.append(r)
        await app[LOADER]
        return r

    yield start
    for r in running:
        await r.close(timeout_s=2)


async def answer(reader: asyncio.StreamReader, timeout: float = 5.0) -> tuple[int, bytes, bool]:
    """The status and body of the next answer, and whether the server closed afterwards."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    body = await asyncio.wait_for(reader.readexactly(length), timeout)
    closed = b"connection: close" in head.lower()
    return status, body, closed


async def live(port: int) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(LIVE)
    status, _, _ = await answer(reader)
    writer.close()
    return status


async def dribble(writer: asyncio.StreamWriter, data: bytes, every_s: float) -> None:
    """Send `data` a byte at a time (a slowloris client), until the server closes."""
    for i in range(len(data)):
        if writer.is_closing():
            return
        writer.write(data[i : i + 1])
        try:
            await writer.drain()
        except ConnectionError:
            return
        await asyncio.sleep(every_s)


async def test_a_head_dribbled_past_the_header_timeout_gets_408(limited: Start) -> None:
    running = await limited(header_timeout_s=0.4)
    reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
    head = f"POST {INFER} HTTP/1.1\r\nHost: t\r\nX-Padding: {'a' * 200}\r\n\r\n".encode()
    sender = asyncio.create_task(dribble(writer, head, 0.02))  # 4+ s for the whole head
    started = time.monotonic()
    status, body, closed = await answer(reader)
    assert (status, closed) == (408, True) and b"head" in body
    assert time.monotonic() - started < 3.0
    assert await live(running.port) == 200  # others are served meanwhile and afterwards
    assert await reader.read() == b""
    sender.cancel()
    writer.close()


@pytest.mark.parametrize("path", [INFER, "/v1/chat/completions"])
async def test_a_body_dribbled_past_the_body_timeout_gets_408(limited: Start, path: str) -> None:
    """On the hot path and on a route the connection hands to aiohttp one request at a time."""
    running = await limited(body_timeout_s=0.4)
    reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
    head = f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
    writer.write(f"{head}Content-Length: {len(BODY)}\r\n\r\n".encode() + BODY[:5])
    sender = asyncio.create_task(dribble(writer, BODY[5:], 0.1))
    status, body, closed = await answer(reader)
    assert (status, closed) == (408, True) and b"body" in body
    assert await reader.read() == b""
    assert await live(running.port) == 200
    sender.cancel()
    writer.close()


async def test_a_connection_handed_to_aiohttp_is_timed_out_too(limited: Start) -> None:
    """HTTP/1.0 goes to aiohttp's parser for good; a dribbled head there is cut off alike."""
    running = await limited(header_timeout_s=0.4)
    reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
    head = b"GET /v2/health/live HTTP/1.0\r\nX-Padding: " + b"a" * 200 + b"\r\n\r\n"
    sender = asyncio.create_task(dribble(writer, head, 0.02))
    status, _, _ = await answer(reader)
    assert status == 408 and await reader.read() == b""
    sender.cancel()
    writer.close()


async def test_a_slow_but_timely_client_is_served(limited: Start) -> None:
    running = await limited(header_timeout_s=2.0, body_timeout_s=2.0)
    reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
    head = f"POST {INFER} HTTP/1.1\r\nHost: t\r\nContent-Length: {len(BODY)}\r\n\r\n".encode()
    for chunk in (head[:10], head[10:], BODY[:10], BODY[10:]):
        writer.write(chunk)
        await asyncio.sleep(0.3)  # several sweeps pass while each part is awaited
    status, _, closed = await answer(reader)
    assert (status, closed) == (200, False)
    writer.close()


async def test_idle_connections_past_the_limit_make_room_for_a_health_check(
    limited: Start,
) -> None:
    running = await limited(max_connections=8)
    flood = [await asyncio.open_connection("127.0.0.1", running.port) for _ in range(40)]
    await asyncio.sleep(0.1)
    assert len(running.http.connections) <= 8
    for _ in range(5):
        assert await live(running.port) == 200
    # The oldest idle ones were closed to make room; the newest are still open.
    assert await asyncio.wait_for(flood[0][0].read(), 2) == b""
    flood[-1][1].write(LIVE)
    assert (await answer(flood[-1][0]))[0] == 200
    for _, w in flood:
        w.close()


async def test_when_no_connection_is_idle_a_new_one_gets_503(limited: Start) -> None:
    running = await limited(max_connections=3, header_timeout_s=5.0)
    busy = []
    for _ in range(3):  # each is in the middle of sending a head: not idle
        reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
        writer.write(b"GET /v2/health/live HTTP/1.1\r\n")
        busy.append((reader, writer))
    await asyncio.sleep(0.1)
    reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
    status, body, closed = await answer(reader)
    assert (status, closed) == (503, True) and b"too many connections" in body
    busy[0][1].write(b"Host: t\r\n\r\n")  # one finishes its head and is answered
    assert (await answer(busy[0][0]))[0] == 200
    for _, w in [*busy, (reader, writer)]:
        w.close()


def test_limits_are_checked_when_the_config_loads() -> None:
    for key, value in (("max_connections", 0), ("header_timeout_s", 0), ("body_timeout_s", -1)):
        with pytest.raises(ConfigError, match=key):
            load_config(None, {"server": {key: value}}, {})


@pytest.mark.parametrize("nofile", [64, 28])
def test_a_flood_under_a_small_fd_limit_neither_crashes_nor_spins(
    tmp_path: Path, samples: Path, nofile: int
) -> None:
    """`serve` with a small RLIMIT_NOFILE (prlimit, a subprocess), 2,000 connections at once.
    64: the connection cap keeps fds free, so health is answered during the flood. 28: the
    process's own fds (about 17) and the cap (14) pass the limit, accept() fails with EMFILE:
    the loop backs off instead of spinning, and health is answered once the flood is gone."""
    registry = Registry(tmp_path / "models")
    registry.add("sample", samples / "sample.onnx")
    prlimit = shutil.which("prlimit")
    if prlimit is None:
        pytest.skip("prlimit (util-linux) is not installed")
    command = [prlimit, f"--nofile={nofile}:{nofile}", sys.executable, "-m", "appliance"]
    server = start_server_process(["--models", str(registry.root)], command=command)
    url = f"http://{server.url}/v2/health/live"
    try:
        assert any(f"RLIMIT_NOFILE ({nofile})" in line for line in server.lines)
        flood: list[socket.socket] = []
        for _ in range(FLOOD):
            s = socket.socket()
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect(("127.0.0.1", server.port))
            flood.append(s)
        time.sleep(1.0)  # the backlog is accepted (and the idle ones closed) meanwhile
        cpu_before = _cpu_seconds(server.proc.pid)
        time.sleep(2.0)  # a spinning accept loop would burn all of it
        spent = _cpu_seconds(server.proc.pid) - cpu_before
        assert spent < 0.5, f"the server spent {spent:.2f} s of CPU in 2 s while flooded"
        assert len(os.listdir(f"/proc/{server.proc.pid}/fd")) <= nofile
        if nofile == 64:
            with urllib.request.urlopen(url, timeout=10) as r:
                assert r.status == 200
        for s in flood:
            s.close()
        time.sleep(0.5)
        for _ in range(3):
            with urllib.request.urlopen(url, timeout=10) as r:
                assert r.status == 200
        assert server.proc.poll() is None
    finally:
        assert stop_server_process(server) == 0, "".join(server.lines[-20:])


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
