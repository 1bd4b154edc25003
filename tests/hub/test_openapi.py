"""The hub's /openapi.json: every registered route declared (hub/openapi.py) and every
declaration a route, valid OpenAPI 3.1, public like /healthz while the rest stays guarded."""

from __future__ import annotations

import schemathesis

from appliance.hub import openapi
from appliance.openapi import registered

from .conftest import HubEnv


async def test_every_route_is_declared_and_the_document_is_served(env: HubEnv) -> None:
    app = env.client.app
    assert app is not None
    routes = set(registered(app))
    declared = set(openapi.operations())
    assert not routes - declared, "routes with no declaration in appliance/hub/openapi.py: " + (
        ", ".join(f"{m} {p}" for m, p in sorted(routes - declared))
    )
    assert not declared - routes, "declared but not registered: " + ", ".join(
        f"{m} {p}" for m, p in sorted(declared - routes)
    )
    r = await env.client.get("/openapi.json")  # no token
    assert r.status == 200
    doc = await r.json()
    schemathesis.openapi.from_dict(doc).validate()
    assert doc["security"] == [{"bearer": []}]
    public = {p for p, by in doc["paths"].items() for op in by.values() if op.get("security") == []}
    # (the dashboard: "/" and its files, only the names the document lists)
    assert public == {"/healthz", "/openapi.json", "/", "/ui/{name}"}
    assert "/tuf/targets/{path}" in doc["paths"]
    assert (await env.client.get("/api/v1/admin/devices")).status == 401


async def test_malformed_publish_bodies_and_negative_after_are_400s(env: HubEnv) -> None:
    """Regressions found by schemathesis: aiohttp's multipart reader raising ValueError or
    InvalidHeader was a 500; `after=-1` was taken; `after=2**64` was a 500 (SQLite)."""
    for ctype, body in [
        ("multipart/form-data; boundary=b", b"--b\r\n[]--b--\r\n"),
        ("multipart/form-data; boundary=b", b"garbage"),
        ("multipart/form-data", b"--b\r\n\r\n--b--\r\n"),
    ]:
        r = await env.client.post(
            "/api/v1/admin/models", data=body, headers={**env.admin(), "Content-Type": ctype}
        )
        assert r.status == 400, await r.text()
        assert "malformed multipart body" in (await r.json())["error"]
    await env.enroll("dev-1")
    r = await env.client.get("/api/v1/admin/devices/dev-1/events?after=-1", headers=env.admin())
    assert r.status == 400 and "'after'" in (await r.json())["error"]
    for after in ("0", str(2**64), "9" * 40):  # past SQLite's integers was a 500
        r = await env.client.get(
            f"/api/v1/admin/devices/dev-1/events?after={after}", headers=env.admin()
        )
        assert r.status == 200 and await r.json() == [], await r.text()
