"""The device's /openapi.json: every route the application registers is in it with a
declaration (api/openapi.py), every declaration is a route, the document is valid OpenAPI 3.1,
it is served without a token, and the component schemas copied from tests/schemas are current."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from aiohttp import web

from appliance.api import openapi
from appliance.api.app import App
from appliance.config import load_config
from appliance.openapi import document, registered
from appliance.registry import Registry
from appliance.server import build

ROOT = Path(__file__).resolve().parent.parent.parent
#: Declared, and registered only with some configuration: [hub] url adds /v2/sync.
CONDITIONAL = {("GET", "/v2/sync")}


def _app(store: Path) -> App:
    config = load_config(None, {"store": {"path": str(store)}}, {})
    return build(config, [], Registry(store))


def test_every_route_is_declared_and_every_declaration_is_a_route(tmp_path: Path) -> None:
    app = _app(tmp_path)
    routes = set(registered(app))
    declared = set(openapi.operations())
    assert not routes - declared, (
        "routes with no declaration in appliance/api/openapi.py (add one): "
        + ", ".join(f"{m} {p}" for m, p in sorted(routes - declared))
    )
    stale = declared - routes - CONDITIONAL
    assert not stale, "declared but not registered: " + ", ".join(
        f"{m} {p}" for m, p in sorted(stale)
    )
    doc = document(app, openapi.api(False), {})
    listed = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert listed == {(m, p.replace("{path:.+}", "{path}")) for m, p in routes}
    assert not [op for ops in doc["paths"].values() for op in ops.values() if "x-undeclared" in op]


def test_a_new_route_shows_up_marked_undeclared(tmp_path: Path) -> None:
    """What the lead sees when a route is added without its declaration."""
    app = _app(tmp_path)

    async def extra(request: web.Request) -> web.Response:
        return web.json_response({})

    app.router.add_get("/api/extra", extra)
    doc = document(app, openapi.api(False), {})
    assert doc["paths"]["/api/extra"]["get"]["x-undeclared"] is True


@pytest.mark.parametrize("token", [False, True])
def test_the_document_is_valid_openapi(tmp_path: Path, token: bool) -> None:
    app = _app(tmp_path)
    doc = document(app, openapi.api(token), openapi.schemas())
    schema = schemathesis.openapi.from_dict(doc)
    schema.validate()  # OpenAPI 3.1's own meta-schema
    ops = {(m.upper(), p): op for p, by in doc["paths"].items() for m, op in by.items()}
    public = {key for key, op in ops.items() if op.get("security") == []}
    assert public == {
        ("GET", "/v2/health/live"),
        ("GET", "/v2/health/ready"),
        ("GET", "/openapi.json"),
        ("GET", "/"),  # the status page and its files (api/routes.py's STATUS: public)
        ("GET", "/ui/{path}"),
    }
    assert ("security" in doc) is token
    if token:
        assert all("401" in op["responses"] for key, op in ops.items() if key not in public)
    _refs_resolve(doc, doc)


def _refs_resolve(doc: dict[str, Any], node: Any) -> None:
    if isinstance(node, dict):
        target = node.get("$ref")
        if isinstance(target, str):
            assert target.rsplit("/", 1)[-1] in doc["components"]["schemas"], target
        for value in node.values():
            _refs_resolve(doc, value)
    elif isinstance(node, list):
        for value in node:
            _refs_resolve(doc, value)


def test_published_components_are_current() -> None:
    """appliance/data/openapi_components.json is what build/make_openapi_components.py makes
    from tests/schemas."""
    subprocess.run(
        [sys.executable, str(ROOT / "build" / "make_openapi_components.py"), "--check"],
        check=True,
    )


async def test_served_without_a_token_and_others_are_not(serve: Any) -> None:
    client = await serve({"server": {"auth_token": "s3cret"}})
    r = await client.get("/openapi.json")
    assert r.status == 200 and r.content_type == "application/json"
    doc = await r.json()
    assert doc["openapi"].startswith("3.1") and "/v2/models/{name}/infer" in doc["paths"]
    assert doc["security"] == [{"bearer": []}]
    # the models served are examples of the path parameters, so that fuzzers reach them
    (name,) = doc["paths"]["/v2/models/{name}/infer"]["post"]["parameters"][:1]
    assert "multi_io" in name["schema"]["examples"], name
    assert (await client.post("/v2/repository/index")).status == 401
    assert (await client.get("/v2")).status == 401


async def test_repository_bodies_the_document_refuses_are_400s(serve: Any) -> None:
    """Found by schemathesis: these bodies were taken as no body."""
    client = await serve()
    for route, body in [
        ("/v2/repository/index", b'{"ready": 1}'),
        ("/v2/repository/index", b"  \r\n"),
        ("/v2/repository/index", b"[]"),
        ("/v2/repository/models/sample/load", b'{"parameters": false}'),
        ("/v2/repository/models/sample/load", b"\r\n"),
    ]:
        r = await client.post(route, data=body, headers={"Content-Type": "application/json"})
        assert r.status == 400, (route, body, await r.text())
    r = await client.post("/v2/repository/index", json={"ready": True})
    assert r.status == 200 and {m["state"] for m in await r.json()} == {"READY"}
