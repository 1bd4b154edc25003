"""WebSocket stream limits ([websocket] in the config), apart from api/ws.py so that the
server's settings are made without importing aiohttp (api/app.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Policy = Literal["drop_oldest", "backpressure"]


@dataclass(frozen=True)
class WsSettings:
    """Per-connection limits ([websocket] in the config)."""

    max_message_bytes: int = 16 * 1024 * 1024
    #: Requests waiting to run, beyond those running.
    queue: int = 8
    max_inflight: int = 2
    policy: Policy = "drop_oldest"
    #: Seconds between pings (a dead peer is noticed); 0: none.
    heartbeat_s: float = 30.0
