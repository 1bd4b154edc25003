"""Hub fixtures: a hub initialised in a temp dir, served by aiohttp over real loopback HTTP.

Every test built on `hub_factory`/`env` runs twice: on SQLite (the data dir's hub.db) and on a
fresh database of the session's real PostgreSQL server (tests/support/postgres.py).
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import urllib3
from aiohttp import FormData, web
from aiohttp.test_utils import TestClient, TestServer
from tuf.api.exceptions import DownloadHTTPError
from tuf.ngclient import Updater
from tuf.ngclient.fetcher import FetcherInterface
from yarl import URL

from appliance.hub.repository import Expiry
from appliance.hub.server import FrontSite, build_app
from appliance.hub.service import Hub, HubConfig, init_hub
from tests.support.postgres import PostgresServer, postgres_server

STORES = ("sqlite", "postgresql")


class FrontServer(TestServer):
    """The test server behind the hub's lean device front (hub/front.py), as `hub serve`
    runs it: device polls and uploads take the front, everything else aiohttp."""

    async def start_server(self, loop: Any = None, **kwargs: Any) -> None:
        if self.runner:
            return
        self.runner = runner = await self._make_runner(handler_cancellation=True, **kwargs)
        await runner.setup()
        sock = self.socket_factory(self.host, self.port or 0, socket.AF_INET)
        self.host, self.port = sock.getsockname()[:2]
        assert isinstance(runner, web.AppRunner)
        await FrontSite(runner, sock).start()
        self.scheme = "http"
        self._root = URL(f"http://{self.host}:{self.port}")


class TokenFetcher(FetcherInterface):
    """ngclient's downloads with the device's bearer token (what the sync agent does)."""

    def __init__(self, token: str) -> None:
        self.pool = urllib3.PoolManager(headers={"Authorization": f"Bearer {token}"})

    def _fetch(self, url: str) -> Iterator[bytes]:
        r = self.pool.request("GET", url, preload_content=False, timeout=urllib3.Timeout(30))
        if r.status != 200:
            r.release_conn()
            raise DownloadHTTPError(f"HTTP {r.status} for {url}", r.status)
        return r.stream(65536)


@dataclass
class HubEnv:
    hub: Hub
    client: TestClient[Any, Any]
    admin_token: str
    root_json: bytes
    root_key_dir: Path

    @property
    def url(self) -> str:
        return str(self.client.make_url("")).rstrip("/")

    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"}

    @staticmethod
    def bearer(token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    def updater(self, token: str, workdir: Path) -> Updater:
        """A real TUF client bootstrapped with the hub's first root, as a device starts."""
        meta, targets = workdir / "metadata", workdir / "targets"
        meta.mkdir(parents=True, exist_ok=True)
        targets.mkdir(parents=True, exist_ok=True)
        root_file = meta / "root.json"
        if not root_file.exists():
            root_file.write_bytes(self.root_json)
        return Updater(
            metadata_dir=str(meta),
            metadata_base_url=self.url + "/tuf/metadata/",
            target_dir=str(targets),
            target_base_url=self.url + "/tuf/targets/",
            fetcher=TokenFetcher(token),
            bootstrap=None,
        )

    async def publish(self, name: str, version: str, file: Path, **fields: str) -> Any:
        form = FormData()
        form.add_field("name", name)
        form.add_field("version", version)
        for k, v in fields.items():
            form.add_field(k, v)
        form.add_field("file", file.read_bytes(), filename=file.name)
        resp = await self.client.post("/api/v1/admin/models", data=form, headers=self.admin())
        return resp.status, await resp.json()

    async def enroll(self, device_id: str, group: str = "default") -> str:
        resp = await self.client.post(
            "/api/v1/admin/devices",
            json={"device_id": device_id, "group": group},
            headers=self.admin(),
        )
        assert resp.status == 201, await resp.text()
        token: str = (await resp.json())["token"]
        return token

    async def rollout(self, model: str, version: str, target: Any, percent: int = 100) -> str:
        resp = await self.client.post(
            "/api/v1/admin/rollouts",
            json={"model": model, "version": version, "target": target, "percent": percent},
            headers=self.admin(),
        )
        assert resp.status == 201, await resp.text()
        rid: str = (await resp.json())["rollout"]
        return rid

    async def assignments(self, token: str) -> dict[str, str]:
        resp = await self.client.get("/api/v1/device/assignments", headers=self.bearer(token))
        assert resp.status == 200, await resp.text()
        return {m["name"]: m["version"] for m in (await resp.json())["models"]}

    async def telemetry(self, token: str, events: list[dict[str, Any]]) -> Any:
        resp = await self.client.post(
            "/api/v1/device/telemetry", json={"events": events}, headers=self.bearer(token)
        )
        assert resp.status == 200, await resp.text()
        return await resp.json()


def make_config(data: Path, **kwargs: Any) -> HubConfig:
    return HubConfig(data_dir=data, **kwargs)


@pytest.fixture(params=STORES)
def hub_database(request: pytest.FixtureRequest) -> str | None:
    """None: SQLite in the data dir; else the URL of a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return None
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.new_database()


@pytest.fixture
async def hub_factory(
    tmp_path: Path, hub_database: str | None
) -> AsyncIterator[Callable[..., Any]]:
    """Start hubs on one data dir and database (initialised once per test) with given
    settings; every server started is stopped at the end."""
    started: list[HubEnv] = []
    state: dict[str, Any] = {}

    async def start(resign: bool = True, refresh_s: float | None = None, **kwargs: Any) -> HubEnv:
        kwargs.setdefault("database", hub_database)
        config = make_config(tmp_path / "data", **kwargs)
        if "token" not in state:
            state["token"], state["root_dir"] = init_hub(config)
        hub = Hub(config)
        client: TestClient[Any, Any] = TestClient(
            FrontServer(build_app(hub, refresh_s=refresh_s, resign=resign))
        )
        await client.start_server()
        root = (tmp_path / "data" / "1.root.json").read_bytes()
        e = HubEnv(hub, client, state["token"], root, state["root_dir"])
        started.append(e)
        return e

    yield start
    for e in started:
        await e.client.close()
        e.hub.close()


@pytest.fixture
async def env(hub_factory: Callable[..., Any]) -> HubEnv:
    e: HubEnv = await hub_factory()
    return e


__all__ = ["Expiry", "HubEnv", "TokenFetcher", "postgres_server"]
