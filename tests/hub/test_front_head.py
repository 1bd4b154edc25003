"""The hub's device routes read their heads with the device's parser (appliance/httphead.py):
what either front would hand to aiohttp, both do."""

from __future__ import annotations

from appliance.api.http_server import parse_head as device_head
from appliance.hub.front import ASSIGNMENTS, TELEMETRY
from appliance.hub.front import parse_head as hub_head


def test_the_hub_takes_plain_device_requests_only() -> None:
    poll = hub_head(f"GET {ASSIGNMENTS} HTTP/1.1\r\nX-Device-Id: d1\r\nIf-None-Match: e".encode())
    assert poll is not None and poll.headers["x-device-id"] == "d1" and not poll.length
    upload = hub_head(
        f"POST {TELEMETRY} HTTP/1.1\r\nContent-Length: 12\r\nConnection: close".encode()
    )
    assert upload is not None and upload.length == 12 and upload.close
    handed_over = [
        f"GET {ASSIGNMENTS}?x=1 HTTP/1.1",  # a query string
        "GET /api/v1/admin/devices HTTP/1.1",  # another route
        f"POST {ASSIGNMENTS} HTTP/1.1\r\nContent-Length: 0",  # another method
        f"GET {ASSIGNMENTS} HTTP/1.1\r\nContent-Length: 3",  # a GET with a body
        f"POST {TELEMETRY} HTTP/1.1\r\nContent-Encoding: gzip\r\nContent-Length: 3",
    ]
    for raw in handed_over:
        assert hub_head(raw.encode()) is None, raw


def test_both_fronts_refuse_the_same_unusual_heads() -> None:
    for path in (ASSIGNMENTS, TELEMETRY):
        method = "GET" if path == ASSIGNMENTS else "POST"
        for fields in [
            "X: a\nY: b",  # a bare LF (the hub's own parser took this once)
            "X: a\rb",  # a bare CR
            "No-colon",
            "Bad Name: x",
            "Transfer-Encoding: chunked",
            "Expect: 100-continue",
            "Connection: upgrade",
            "Content-Length: 1\r\nContent-Length: 2",
            "Content-Length: +1",
            "X: é",
        ]:
            raw = f"{method} {path} HTTP/1.1\r\n{fields}".encode()
            assert device_head(raw) is None and hub_head(raw) is None, raw
