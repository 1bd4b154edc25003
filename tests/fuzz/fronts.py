"""The fronts a fuzz test talks to: a real `appliance serve` process over loopback HTTP (a plain
keep-alive client, so that Hypothesis tests stay synchronous), and its MQTT side through a real
broker. Each answer comes back as (status, error text, decoded body)."""

from __future__ import annotations

import http.client
import itertools
from dataclasses import dataclass
from typing import Any

import orjson

from tests.conftest import ServerProcess


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    payload: bytes

    def json(self) -> Any:
        return orjson.loads(self.payload)

    @property
    def message(self) -> str:
        """The error text (KServe's `error`; OpenAI's message and `param`)."""
        try:
            body = self.json()
        except orjson.JSONDecodeError:
            return self.payload[:300].decode(errors="replace")
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict):  # OpenAI's shape
            return f"{error.get('message')} (param {error.get('param')})"
        return str(error)


class Http:
    """One keep-alive connection to a server; reconnects when the server closed it."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self._conn: http.client.HTTPConnection | None = None

    def request(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> Answer:
        for attempt in range(2):
            if self._conn is None:
                self._conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=60)
            try:
                self._conn.request(method, path, body=body, headers=headers or {})
                r = self._conn.getresponse()
                payload = r.read()
            except (ConnectionError, http.client.HTTPException):
                self.close()
                if attempt or self.server.proc.poll() is not None:
                    raise
                continue
            answer = Answer(r.status, {k.lower(): v for k, v in r.getheaders()}, payload)
            if answer.headers.get("connection", "").lower() == "close":
                self.close()
            return answer
        raise AssertionError("unreachable")

    def post_json(self, path: str, body: bytes, headers: dict[str, str] | None = None) -> Answer:
        return self.request(
            "POST", path, body, {"Content-Type": "application/json", **(headers or {})}
        )

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def assert_clean_log(server: ServerProcess, since: int = 0) -> int:
    """No traceback and no unhandled error in the server's log (from line `since` on), and the
    process still runs; returns the number of lines read (the next `since`)."""
    assert server.proc.poll() is None, "the server exited:\n" + "".join(server.lines[-30:])
    lines = server.lines[since:]
    bad = [
        line
        for line in lines
        if ("Traceback" in line or "unhandled" in line) and not _aiohttp_refusal(line)
    ]
    assert not bad, "the server logged:\n" + "".join(bad[:3])
    return since + len(lines)


def _aiohttp_refusal(line: str) -> bool:
    """aiohttp's own 400 for a malformed HTTP message (a control character in a header, a
    deflate stream that ends early), which it logs at error level with its traceback."""
    return '"Error handling request' in line and "400, message" in line


_correlation = itertools.count()


def next_correlation() -> bytes:
    return f"fuzz-{next(_correlation)}".encode()
