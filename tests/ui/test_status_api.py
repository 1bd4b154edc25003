"""`GET /api/status`, the admin version switch and the page's static files, on the real server
(api/http_server.py in front of the app) over a store of the sample models."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

from appliance.api.ui import read_files
from appliance.registry import Registry

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SAMPLE = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
#: The issue's limit on the page's weight, compressed.
MAX_PAGE_GZIP = 150 * 1024


async def _json(client: Any, path: str, **kw: Any) -> Any:
    r = await client.get(path, **kw)
    assert r.status == 200, await r.text()
    return await r.json()


async def test_status_counts_what_was_served(serve: Any) -> None:
    client = await serve()
    for _ in range(7):  # the fast path answers these
        r = await client.post("/v2/models/sample/infer", json=SAMPLE)
        assert r.status == 200
    r = await client.post("/v2/models/sample/infer", json={"inputs": []})
    assert r.status == 400
    r = await client.post("/v2/models/nobody/infer", json=SAMPLE)
    assert r.status == 404
    s = await _json(client, "/api/status?series=30")
    assert s["appliance"]["ready"] is True and s["appliance"]["uptime_s"] >= 0
    models = {m["name"]: m for m in s["models"]}
    assert set(models) == {"sample", "multi_io", "strings", "fp16"}
    m = models["sample"]
    assert (m["version"], m["backend"], m["status"], m["device"]) == ("1", "onnx", "ready", "cpu")
    assert m["stored"] == {"active": "1", "history": [], "versions": ["1"]}
    assert m["last_5m"]["requests"] == 8
    assert m["last_5m"]["client_errors"] == 1 and m["last_5m"]["errors"] == 0
    assert m["last_5m"]["p50_ms"] > 0 and m["last_5m"]["p99_ms"] >= m["last_5m"]["p50_ms"]
    assert m["batch"]["calls"] == 7 and m["batch"]["mean"] == 1.0
    assert len(m["series"]["rate"]) == 30 and m["series"]["requests"] == 8
    assert "series" not in models["fp16"] or models["fp16"]["series"]["requests"] == 0
    assert [e["status"] for e in s["errors"]][:2] == [404, 400]
    assert s["errors"][0]["name"] == "nobody"
    assert s["mqtt"] == {"enabled": False} and s["sync"] is None
    assert s["device"]["accelerated"] is False
    plain = await _json(client, "/api/status")
    assert "series" not in plain["models"][0]


async def test_a_malformed_series_count_is_a_400_naming_it(serve: Any) -> None:
    client = await serve()
    r = await client.get("/api/status?series=lots")
    assert r.status == 400 and "series" in (await r.json())["error"]


async def test_errors_are_masked_by_the_pii_rules(serve: Any) -> None:
    client = await serve({"guards": {"pii": {"entities": ["email"]}}})
    bad = {"inputs": [{"name": "alice@example.com", "datatype": "FP32", "shape": [1, 4],
                       "data": [1, 2, 3, 4]}]}  # fmt: skip
    r = await client.post("/v2/models/sample/infer", json=bad)
    assert r.status == 400 and "alice@example.com" in (await r.json())["error"]
    s = await _json(client, "/api/status")
    message = s["errors"][0]["message"]
    assert "alice@example.com" not in message and "input" in message


async def test_with_a_token_the_page_loads_but_its_data_needs_it(serve: Any) -> None:
    client = await serve({"server": {"auth_token": TOKEN}})
    for path in ("/", "/ui/device/app.js", "/ui/common/chart.js", "/ui/device/style.css"):
        r = await client.get(path)
        assert r.status == 200, path
    for path in ("/api/status", "/api/models/sample", "/v2/models/sample"):
        r = await client.get(path)
        assert r.status == 401, path
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
    r = await client.post("/api/models/sample/rollback")
    assert r.status == 401
    s = await _json(client, "/api/status", headers=AUTH)
    assert s["models"] and s["errors"] == []  # refused callers are not the models' errors
    r = await client.get("/ui/device/nothing.js")
    assert r.status == 404


async def test_activate_and_rollback_switch_the_served_version(
    serve: Any, store: Registry, samples: Path
) -> None:
    store.add("sample", samples / "sample.onnx", version="2", activate=False)
    client = await serve()
    r = await client.post("/api/models/sample/activate", json={"version": "2"})
    assert r.status == 200, await r.text()
    assert (await r.json())["version"] == "2"
    assert (await _json(client, "/v2/models/sample"))["versions"] == ["2"]
    assert store.entry("sample").active == "2"
    r = await client.post("/v2/models/sample/infer", json=SAMPLE)
    assert r.headers["X-Model-Version"] == "2"
    model = await _json(client, "/api/models/sample")
    assert (model["active"], model["history"], model["versions"]) == ("2", ["1"], ["1", "2"])
    assert model["manifest"]["version"] == "2" and model["manifest"]["backend"] == "onnx"
    r = await client.post("/api/models/sample/rollback")
    assert r.status == 200, await r.text()
    assert (await r.json())["version"] == "1"
    assert (await _json(client, "/v2/models/sample"))["versions"] == ["1"]
    assert store.entry("sample").active == "1"
    r = await client.post("/api/models/sample/rollback")  # nothing earlier than 1 now
    assert r.status == 400 and "no earlier version" in (await r.json())["error"]


async def test_activate_refuses_malformed_requests_naming_the_field(serve: Any) -> None:
    client = await serve()
    for body, words in (
        (b"not json", "JSON"),
        (b"{}", "version"),
        (b'{"version": [1]}', "version must be a string"),
        (b'{"version": "../x"}', "not a valid version"),
        (b'{"version": "9"}', "no version '9'"),
    ):
        r = await client.post("/api/models/sample/activate", data=body)
        assert r.status in (400, 404), (body, r.status)
        assert words in (await r.json())["error"], body
    r = await client.post("/api/models/no..name/rollback")
    assert r.status in (400, 404)
    assert (await _json(client, "/v2/models/sample"))["versions"] == ["1"]


async def test_versions_the_store_refuses_are_400s_naming_the_field(serve: Any) -> None:
    """Found probing the declared body by hand: names the store's rule refuses were a 500."""
    client = await serve()
    for body in (b'{"version": -1}', b'{"version": "..."}', b'{"version": "-"}'):
        r = await client.post("/api/models/sample/activate", data=body)
        assert r.status == 400, (body, await r.text())
        assert "invalid version" in (await r.json())["error"], body


async def test_a_series_count_of_many_digits_is_capped_not_a_500(serve: Any) -> None:
    """Found probing the declared query by hand: int() refuses over 4300 digits (a 500)."""
    client = await serve()
    for raw in ("9" * 5000, "0" * 5000 + "2", "0" * 5000):
        s = await _json(client, f"/api/status?series={raw}")
        want = {"9": 360, "2": 2}.get(raw[-1])
        assert [len(m.get("series", {}).get("rate", [])) for m in s["models"]] == [want or 0] * len(
            s["models"]
        ), raw[-3:]


async def test_ingress_path_becomes_the_pages_base(serve: Any) -> None:
    client = await serve()
    r = await client.get("/", headers={"X-Ingress-Path": "/api/hassio_ingress/abc123"})
    text = await r.text()
    assert '<base href="/api/hassio_ingress/abc123/">' in text
    for bad in ('/x"><script>', "//evil.example/x", "/a/../../b"):  # markup, another host, up
        r = await client.get("/", headers={"X-Ingress-Path": bad})
        assert "<base" not in await r.text(), bad
    assert 'src="ui/device/app.js"' in text  # relative: works under any prefix


async def test_files_are_sent_compressed(serve: Any) -> None:
    client = await serve()
    r = await client.get("/ui/device/app.js", headers={"Accept-Encoding": "gzip"})
    assert r.status == 200 and r.headers.get("Content-Encoding") == "gzip"
    assert r.headers["Content-Type"].startswith("text/javascript")


def test_page_weight_is_within_the_limit() -> None:
    files = read_files()
    assert "/ui/device/index.html" in files and "/ui/common/chart.js" in files
    total = sum(len(gzip.compress(body)) for body, _ in files.values())
    print(f"page weight: {total} bytes gzip over {len(files)} files")
    assert total <= MAX_PAGE_GZIP
