"""aiohttp's TestClient against the server `appliance serve` runs (api/http_server.py): the hot
path answered by its own protocol, every other request handed to the aiohttp app."""

from __future__ import annotations

import socket
from typing import Any, cast

from aiohttp import web
from aiohttp.test_utils import TestServer
from yarl import URL

from appliance.api.app import App
from appliance.api.http_server import RunningServer, open_server


class FrontServer(TestServer):
    running: RunningServer | None = None

    def __init__(self, app: App, **kwargs: Any) -> None:
        # aiohttp's TestServer only keeps the app (as .app); it is the device's (api/app.py)
        super().__init__(cast(web.Application, app), **kwargs)
        self.device = app

    @property
    def started(self) -> bool:
        return self.running is not None

    async def start_server(self, loop: Any = None, **kwargs: Any) -> None:
        if self.running:
            return
        sock = socket.create_server(("127.0.0.1", 0))
        self.running = running = await open_server(self.device, sock)
        self.host, self.port, self.scheme = "127.0.0.1", running.port, "http"
        self._root = URL(f"http://127.0.0.1:{self.port}")

    async def close(self) -> None:
        if self.running is not None and not self.closed:
            await self.running.close()
            self._root = None
            self.port = None
            self._closed = True
