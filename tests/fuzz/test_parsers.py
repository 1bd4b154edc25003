"""Python's own parsers fed by an attacker, on every route of the device that reads a body (the
routes come from its /openapi.json) and on both fronts: decompression bombs (gzip, deflate)
bounded by max_body_bytes after decompression, picture bombs (a PNG or JPEG whose header
claims billions of pixels) refused before decoding, malformed multipart bodies, deep nesting,
huge numbers, NaN/Infinity tokens, invalid UTF-8 and lone surrogates: a precise 4xx, never a
5xx, and the server answers the good request after each."""

from __future__ import annotations

import gzip
import struct
import zlib
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.images import encode, picture

from .fronts import Http, assert_clean_log
from .test_kserve_http import GOOD, infer

#: The default server.max_body_bytes of the fuzz servers (appliance/config.py).
LIMIT = 64 * 1024 * 1024
JSON = {"Content-Type": "application/json"}

#: The body fields of the device's routes: a huge integer in each, which every route refuses.
_FIELDS = [b"inputs", b"ready", b"text_input", b"model", b"parameters", b"input", b"messages"]
#: (what, body): each a 4xx; a 400 that says the JSON is malformed where the body is no JSON
#: (not the big integer: valid JSON, which a field's check then refuses).
BAD_JSON: list[tuple[str, bytes]] = [
    ("deep array", b"[" * 100_000 + b"]" * 100_000),
    ("deep object", b'{"a":' * 50_000 + b"1" + b"}" * 50_000),
    ("deep nesting in a field", b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
    ("NaN", b'{"inputs": NaN}'),
    ("Infinity", b'{"temperature": Infinity, "inputs": []}'),
    ("-Infinity", b'{"x": -Infinity}'),
    ("number past float", b'{"x": 1e999}'),
    ("integer past 64 bits", b"{" + b", ".join(b'"%s": %d' % (k, 2**80) for k in _FIELDS) + b"}"),
    ("lone surrogate", b'{"text_input": "\\ud800", "model": "\\udfff"}'),
    ("invalid UTF-8", b'{"text_input": "\xff\xfe"}'),
    ("overlong UTF-8", b'{"text_input": "\xc0\xaf"}'),
    ("UTF-16 body", '{"x": 1}'.encode("utf-16")),
    ("a BOM", b'\xef\xbb\xbf{"x": 1}'),
    ("NUL", b'{"x": 1}\x00'),
]


def _post_routes(client: Http) -> list[str]:
    """Every POST route of the device that takes a JSON body, path parameters filled in."""
    doc = client.request("GET", "/openapi.json").json()
    out = []
    for path, ops in doc["paths"].items():
        body = ops.get("post", {}).get("requestBody", {}).get("content", {})
        if "application/json" in body:
            out.append(path.replace("{version}", "1").replace("{name}", "sample"))
    assert "/v2/models/sample/infer" in out and "/v1/chat/completions" in out, out
    return out


@pytest.fixture(scope="module")
def serving(kserve: Http) -> Iterator[Any]:
    seen = [assert_clean_log(kserve.server)]

    def check() -> None:
        seen[0] = assert_clean_log(kserve.server, seen[0])
        again = infer(kserve, "sample", GOOD)
        assert again.status == 200, again.payload

    yield check
    assert_clean_log(kserve.server, seen[0])


def test_malformed_json_on_every_route(kserve: Http, serving: Any) -> None:
    for route in _post_routes(kserve):
        for what, body in BAD_JSON:
            answer = kserve.request("POST", route, body, JSON)
            assert 400 <= answer.status < 500, (route, what, answer.status, answer.message)
            if (route.endswith("/infer") or route.startswith("/v1/")) and "64" not in what:
                assert answer.status == 400 and "JSON" in answer.message, (route, what)
        serving()


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_decompression_bombs_stop_at_the_body_limit(
    kserve: Http, serving: Any, encoding: str
) -> None:
    """A few hundred kilobytes that inflate past max_body_bytes: 413, on every JSON route."""
    inflated = b" " * (LIMIT + (1 << 20)) + GOOD
    bomb = gzip.compress(inflated, 9) if encoding == "gzip" else zlib.compress(inflated, 9)
    assert len(bomb) < 1 << 20
    for route in ("/v2/models/sample/infer", "/v1/chat/completions"):
        answer = kserve.request("POST", route, bomb, {**JSON, "Content-Encoding": encoding})
        assert answer.status == 413, (route, answer.status, answer.message)
        serving()
    # under the limit, the same kind of body is answered
    small = b" " * 1000 + GOOD
    body = gzip.compress(small) if encoding == "gzip" else zlib.compress(small)
    answer = kserve.request(
        "POST", "/v2/models/sample/infer", body, {**JSON, "Content-Encoding": encoding}
    )
    assert answer.status == 200, answer.message


def _png_claiming(width: int, height: int) -> bytes:
    """A valid tiny PNG whose header says width x height (its CRC fixed up)."""
    png = encode(picture(8, 8, seed=3), "PNG")
    ihdr = png.index(b"IHDR")
    fields = struct.pack(">II", width, height) + png[ihdr + 12 : ihdr + 17]
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + fields))
    return png[: ihdr + 4] + fields + crc + png[ihdr + 21 :]


def _jpeg_claiming(width: int, height: int) -> bytes:
    jpeg = bytearray(encode(picture(8, 8, seed=3), "JPEG"))
    sof = jpeg.index(b"\xff\xc0")
    jpeg[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(jpeg)


@pytest.mark.parametrize(
    ("ctype", "body"),
    [
        ("image/png", _png_claiming(60_000, 60_000)),
        ("image/png", _png_claiming(2**31 - 1, 2**31 - 1)),
        ("image/jpeg", _jpeg_claiming(65_500, 65_500)),
    ],
    ids=["png-3.6G", "png-max", "jpeg-4.3G"],
)
def test_picture_bombs_are_refused_before_decoding(
    kserve: Http, serving: Any, ctype: str, body: bytes
) -> None:
    answer = infer(kserve, "classifier", body, {"Content-Type": ctype})
    assert 400 <= answer.status < 500, (answer.status, answer.message)
    assert "pixel" in answer.message or "image" in answer.message, answer.message
    form = (
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n'
        + f"Content-Type: {ctype}\r\n\r\n".encode()
        + body
        + b"\r\n--b--\r\n"
    )
    answer = infer(kserve, "classifier", form, {"Content-Type": "multipart/form-data; boundary=b"})
    assert 400 <= answer.status < 500, (answer.status, answer.message)
    serving()


@pytest.mark.parametrize(
    ("ctype", "body"),
    [
        ("multipart/form-data; boundary=b", b"--b\r\n[]--b--\r\n"),  # a part without headers
        ("multipart/form-data; boundary=b", b"garbage"),  # no boundary at all
        ("multipart/form-data", b"--b\r\n\r\n--b--\r\n"),  # no boundary parameter
        ("multipart/form-data; boundary=" + "x" * 80, b"--x\r\n"),  # boundary too long
        ("multipart/form-data; boundary=b", b"--b\r\nContent-Disposition: form-data\r\n\r\n"),
    ],
    ids=["headerless-part", "no-boundary", "no-boundary-parameter", "long-boundary", "cut"],
)
def test_malformed_multipart_is_a_400(kserve: Http, serving: Any, ctype: str, body: bytes) -> None:
    """Regression: aiohttp's ValueError / InvalidHeader out of its multipart reader was a 500."""
    answer = infer(kserve, "classifier", body, {"Content-Type": ctype})
    assert answer.status == 400, (answer.status, answer.message)
    assert "multipart" in answer.message or "image" in answer.message, answer.message
    serving()
