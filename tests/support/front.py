"""aiohttp's TestClient against the server `appliance serve` runs (api/http_server.py): the hot
path answered by its own protocol, every other request handed to the aiohttp app."""

from __future__ import annotations

import socket
from typing import Any

from aiohttp.test_utils import TestServer
from yarl import URL

from appliance.api.http_server import RunningServer, open_server


class FrontServer(TestServer):
    running: RunningServer | None = None

    async def start_server(self, loop: Any = None, **kwargs: Any) -> None:
        if self.runner:
            return
        sock = socket.create_server(("127.0.0.1", 0))
        self.running = running = await open_server(self.app, sock)
        self.runner = running.runner
        self.host, self.port, self.scheme = "127.0.0.1", running.port, "http"
        self._root = URL(f"http://127.0.0.1:{self.port}")

    async def close(self) -> None:
        if self.running is not None and not self.closed:
            await self.running.close()
            self._root = None
            self.port = None
            self._closed = True
