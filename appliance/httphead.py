"""The head of a plain HTTP/1.1 request, read by the two lean fronts: the device's KServe fast
path (api/http_server.py) and the hub's device routes (hub/front.py).

Both answer only plainly sent requests themselves and hand anything unusual to aiohttp, whose
parser then judges it; so this parser refuses (returns None) rather than guesses: a request
line other than `METHOD /path HTTP/1.1`, a header line that is not `token: value`, a bare CR or
LF, a repeated header that may appear once, chunked bodies, `Expect`, upgrades, a
Content-Length that is not plain digits. One parser, so the two fronts cannot drift apart on
what counts as plain (a smuggling-shaped head is refused by both).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from http import HTTPStatus
from typing import Any, TypeVar

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
#: Headers that may appear once only; a repeat sends the connection to aiohttp's parser.
_SINGLE = frozenset({"content-length", "content-type", "authorization", "host"})
#: Present: the request is not plain enough for a lean front (aiohttp takes the connection).
_HAND_OVER = frozenset({"transfer-encoding", "expect", "upgrade"})
#: The status line of every status code, ready to write.
STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in HTTPStatus}

H = TypeVar("H")

_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


class Headers(dict[str, str]):
    """Header names, lower case; `get` takes any case (the router looks up `X-Device-Id`)."""

    def get(self, key: str, default: Any = None) -> Any:
        return dict.get(self, key.lower(), default)


def parse_head(raw: bytes, make: Callable[[str, str, str, Headers, int], H]) -> H | None:
    """`make(method, path, query, headers, content_length)` for the head `raw` (without its
    final blank line) of a plain HTTP/1.1 request, or None when aiohttp should judge it."""
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        return None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or parts[2] != "HTTP/1.1" or not parts[1].startswith("/"):
        return None
    headers = Headers()
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or "\r" in line or "\n" in line or not _TOKEN.fullmatch(name):
            return None
        key = name.lower()
        value = value.strip(" \t")
        if key in headers:
            if key in _SINGLE:
                return None
            value = headers[key] + ", " + value
        headers[key] = value
    if not _HAND_OVER.isdisjoint(headers):
        return None
    raw_length = dict.get(headers, "content-length", "0")
    if not raw_length.isdigit() or not raw_length.isascii():
        return None
    if "upgrade" in dict.get(headers, "connection", "").lower():
        return None
    path, _, query = parts[1].partition("?")
    return make(parts[0], path, query, headers, int(raw_length))


def http_date(seconds: int) -> str:
    """RFC 9110's IMF-fixdate, as `email.utils.formatdate(seconds, usegmt=True)` writes it;
    written out here because importing the email package costs the device ~0.5 MiB at idle."""
    t = time.gmtime(seconds)
    return (
        f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year:04d} "
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT"
    )


class DateHeader:
    """The Date header's value, formatted once a second."""

    def __init__(self) -> None:
        self._second = 0
        self._value = b""

    def get(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._value = http_date(now).encode()
        return self._value
