"""The parts of aiohttp that api/http_server.py uses beyond its public API, checked against the
installed version: the front protocol hands connections to aiohttp's own `RequestHandler`, made
by `AppRunner.server`, and feeds it bytes through a transport of its own. pyproject.toml pins
aiohttp to the minor versions this was tested with; a new minor must pass this file (and
tests/api/test_http_server.py, which runs every hand-over over real sockets) before the pin moves.
"""

from __future__ import annotations

import asyncio
import inspect
import socket

import aiohttp
import pytest
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from appliance.api.http_server import open_server

#: What the front protocol calls on aiohttp's handler (asyncio.Protocol plus shutdown).
PROTOCOL_METHODS = (
    "connection_made",
    "data_received",
    "eof_received",
    "connection_lost",
    "pause_writing",
    "resume_writing",
)


def test_installed_aiohttp_is_within_the_pinned_range() -> None:
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    pins = [Requirement(r) for r in requires("appliance") or []]
    (pin,) = [r for r in pins if r.name == "aiohttp"]
    assert pin.specifier.contains(aiohttp.__version__), (pin, aiohttp.__version__)
    # an upper bound: a new minor must be tested before it is allowed
    assert any(s.operator == "<" for s in pin.specifier), pin


def test_request_handler_offers_what_the_front_protocol_calls() -> None:
    for name in PROTOCOL_METHODS:
        assert callable(getattr(RequestHandler, name, None)), name
    shutdown = RequestHandler.shutdown
    assert inspect.iscoroutinefunction(shutdown)
    assert list(inspect.signature(shutdown).parameters)[:2] == ["self", "timeout"]
    assert "handle_signals" in inspect.signature(web.AppRunner).parameters
    # AppRunner passes the rest on to each RequestHandler
    handler_params = inspect.signature(RequestHandler).parameters
    for name in ("access_log", "keepalive_timeout"):
        assert name in handler_params, name


async def test_runner_server_makes_request_handlers_fed_through_our_transport() -> None:
    """A request handed over byte by byte is answered through the proxy transport, and the
    middleware's `request_done` hook sees aiohttp's keep-alive decision."""
    seen: list[object] = []

    async def hello(request: web.Request) -> web.Response:
        seen.append(type(request.transport).__name__)
        seen.append(callable(getattr(request.transport, "request_done", None)))
        return web.json_response({"hello": True})

    from appliance.config import load_config
    from appliance.server import build

    config = load_config(None, {"server": {"port": 0, "access_log": False}}, environ={})
    app = build(config, [])
    app.router.add_get("/hello", hello)
    running = await open_server(app, socket.create_server(("127.0.0.1", 0)))
    try:
        factory = running.runner.server
        assert factory is not None
        assert isinstance(factory(), RequestHandler)
        reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
        for _ in range(2):  # the connection comes back after each hand-over
            writer.write(b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200")
            length = int(
                next(
                    line.split(b":")[1]
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                )
            )
            assert await reader.readexactly(length) == b'{"hello": true}'
        writer.close()
    finally:
        await running.close()
    assert seen == ["_ToAiohttp", True, "_ToAiohttp", True]


@pytest.mark.parametrize("name", PROTOCOL_METHODS)
def test_request_handler_methods_take_the_asyncio_protocol_arguments(name: str) -> None:
    expected = {
        "connection_made": 1,
        "data_received": 1,
        "eof_received": 0,
        "connection_lost": 1,
        "pause_writing": 0,
        "resume_writing": 0,
    }[name]
    params = [
        p
        for p in inspect.signature(getattr(RequestHandler, name)).parameters.values()
        if p.name != "self"
    ]
    assert len(params) == expected, params
