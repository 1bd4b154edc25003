"""Two `hub serve` replicas on one PostgreSQL behind the real nginx, then the real haproxy, with
the packaged configs (packaging/nginx/hub-replicas.conf, packaging/haproxy/hub-replicas.cfg,
ports filled in). The leader is killed with SIGKILL during a
staged rollout while devices (the sync agent's own HubClient and Outbox) poll and upload: no
device sees more than one failed call in a row, every event arrives exactly once, the other
replica takes the lead, the rollout completes, and a TUF client downloads and verifies the new
version through the balancer."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from tuf.ngclient import Updater

from appliance.hub.service import HubConfig, init_hub
from appliance.sync.client import HubClient
from appliance.sync.outbox import Outbox
from appliance.sync.tuf_client import Unreachable
from tests.hub.conftest import TokenFetcher
from tests.support.postgres import PostgresServer, free_port

ROOT = Path(__file__).resolve().parents[2]
NGINX_TEMPLATE = ROOT / "packaging" / "nginx" / "hub-replicas.conf"
HAPROXY_TEMPLATE = ROOT / "packaging" / "haproxy" / "hub-replicas.cfg"
BALANCERS = {
    "nginx": shutil.which("nginx") or "/usr/sbin/nginx",
    "haproxy": shutil.which("haproxy") or "/usr/sbin/haproxy",
}


class Replica:
    def __init__(self, data: Path, database: str, log: Path) -> None:
        self.log = log
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "appliance",
                "hub",
                "serve",
                "--data",
                str(data),
                "--database",
                database,
                "--port",
                "0",
                "--refresh-interval",
                "0.5",
            ],
            stdout=subprocess.PIPE,
            stderr=log.open("wb"),
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        assert m, f"replica did not start: {line!r} {log.read_text()}"
        self.port = int(m.group(1))

    def leads(self) -> bool:
        return "now the leader" in self.log.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


def nginx_config(tmp: Path, listen: int, ports: list[int]) -> list[str]:
    """The packaged server block with these ports, inside a minimal nginx.conf; the command."""
    site = NGINX_TEMPLATE.read_text()
    servers = "".join(f"    server 127.0.0.1:{p} max_fails=1 fail_timeout=5s;\n" for p in ports)
    site, n = re.subn(r"(?m)^\s*server 127\.0\.0\.1:\d+ .*;\n", "", site)
    assert n == 2, "the packaged upstream lists two example replicas"
    site = site.replace("upstream appliance_hub {\n", "upstream appliance_hub {\n" + servers)
    site, n = re.subn(r"listen 127\.0\.0\.1:\d+;", f"listen 127.0.0.1:{listen};", site)
    assert n == 1
    (tmp / "hub-replicas.conf").write_text(site)
    temp = "\n".join(
        f"  {k}_temp_path {tmp / k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    user = "user root;\n" if os.geteuid() == 0 else ""
    conf = tmp / "nginx.conf"
    conf.write_text(
        f"{user}daemon off;\nworker_processes 1;\npid {tmp / 'nginx.pid'};\n"
        f"error_log {tmp / 'error.log'} warn;\nevents {{ worker_connections 1024; }}\n"
        f"http {{\n  access_log off;\n{temp}\n  include {tmp / 'hub-replicas.conf'};\n}}\n"
    )
    return [BALANCERS["nginx"], "-p", str(tmp), "-c", str(conf)]


def haproxy_config(tmp: Path, listen: int, ports: list[int]) -> list[str]:
    """The packaged haproxy.cfg with these ports; the command (foreground)."""
    cfg = HAPROXY_TEMPLATE.read_text()
    for i, port in enumerate(ports, 1):
        cfg, n = re.subn(rf"(server replica{i} 127\.0\.0\.1:)\d+", rf"\g<1>{port}", cfg)
        assert n == 2, "the packaged backends list two example replicas"
    cfg, n = re.subn(r"bind 127\.0\.0\.1:\d+", f"bind 127.0.0.1:{listen}", cfg)
    assert n == 1
    (tmp / "haproxy.cfg").write_text(cfg)
    return [BALANCERS["haproxy"], "-db", "-f", str(tmp / "haproxy.cfg")]


CONFIGS = {"nginx": nginx_config, "haproxy": haproxy_config}


@pytest.fixture(params=sorted(BALANCERS))
def fleet(
    request: pytest.FixtureRequest, tmp_path: Path, postgres_server: PostgresServer
) -> Iterator[tuple[str, list[Replica], str]]:
    """Two replicas on one fresh database behind the load balancer, initialised by init_hub."""
    balancer = request.param
    if not Path(BALANCERS[balancer]).exists():
        pytest.skip(f"{balancer} is not installed")
    database = postgres_server.new_database()
    data = tmp_path / "data"
    token, _ = init_hub(HubConfig(data_dir=data, database=database))
    replicas = [Replica(data, database, tmp_path / f"replica{i}.log") for i in range(2)]
    listen = free_port()
    lb_dir = tmp_path / balancer
    lb_dir.mkdir()
    command = CONFIGS[balancer](lb_dir, listen, [r.port for r in replicas])
    with (lb_dir / "stderr.log").open("wb") as err:
        lb = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err)
    try:
        yield f"http://127.0.0.1:{listen}", replicas, token
    finally:
        lb.send_signal(signal.SIGQUIT if balancer == "nginx" else signal.SIGTERM)
        lb.wait(timeout=30)
        for r in replicas:
            r.stop()


async def _until(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def test_a_replica_killed_mid_rollout_loses_nothing(
    fleet: tuple[str, list[Replica], str], samples: Path, tmp_path: Path
) -> None:
    url, replicas, admin_token = fleet
    admin = {"Authorization": f"Bearer {admin_token}"}
    n_devices = 8
    async with aiohttp.ClientSession(url, headers=admin) as http:

        async def healthy() -> bool:
            try:
                async with http.get("/healthz") as r:
                    return r.status == 200
            except aiohttp.ClientError:
                return False

        await _until(healthy, 15, "nginx")

        async def call(method: str, path: str, **kw: Any) -> Any:
            async with http.request(method, path, **kw) as r:
                assert r.status < 300, f"{method} {path}: {r.status} {await r.text()}"
                return await r.json()

        for version, file in (("1", "sample.onnx"), ("2", "fp16.onnx")):
            form = aiohttp.FormData()
            form.add_field("name", "m")
            form.add_field("version", version)
            form.add_field("file", (samples / file).read_bytes(), filename=file)
            await call("POST", "/api/v1/admin/models", data=form)
        tokens = [
            (await call("POST", "/api/v1/admin/devices", json={"device_id": f"dev{i}"}))["token"]
            for i in range(n_devices)
        ]
        await call(
            "POST",
            "/api/v1/admin/rollouts",
            json={"model": "m", "version": "1", "target": {"all": True}},
        )
        await _until(
            lambda: asyncio.sleep(0, replicas[0].leads() or replicas[1].leads()), 15, "a leader"
        )

        stop = asyncio.Event()
        streak = [0] * n_devices  # failed calls in a row, now and at worst
        worst = [0] * n_devices
        outboxes = [Outbox(tmp_path / f"dev{i}.outbox", 1 << 20) for i in range(n_devices)]

        async def device(i: int) -> None:
            client = HubClient(url, tokens[i], f"dev{i}", timeout_s=10)
            outbox, active, tick = outboxes[i], None, 0
            try:
                while True:
                    try:
                        assigned, _ = await client.assignments()
                        for a in assigned:
                            if a.name == "m" and a.version != active:
                                active = a.version
                                outbox.append("activated", {"model": "m", "version": active})
                        if not stop.is_set():
                            tick += 1
                            outbox.append("status", {"tick": tick})
                        batch = outbox.batch(50)
                        if batch:
                            await client.upload([e.to_json() for e in batch])
                            outbox.acknowledge(batch[-1].seq)
                        streak[i] = 0
                        if stop.is_set() and not outbox.depth:
                            return
                    except Unreachable:
                        streak[i] += 1
                        worst[i] = max(worst[i], streak[i])
                    await asyncio.sleep(0.01)
            finally:
                await client.close()

        devices = [asyncio.ensure_future(device(i)) for i in range(n_devices)]
        try:
            r2 = await call(
                "POST",
                "/api/v1/admin/rollouts",
                json={"model": "m", "version": "2", "target": {"all": True}, "percent": 30},
            )
            await asyncio.sleep(1.0)
            leader, other = (replicas[0], replicas[1]) if replicas[0].leads() else replicas[::-1]
            leader.proc.send_signal(signal.SIGKILL)  # mid-rollout, mid-upload
            for percent in (60, 100):
                await asyncio.sleep(0.5)
                await call(
                    "POST",
                    f"/api/v1/admin/rollouts/{r2['rollout']}/percent",
                    json={"percent": percent},
                )

            async def rolled_out() -> bool:
                rows = await call("GET", "/api/v1/admin/devices")
                return all(d["active"].get("m") == "2" and not d["pending"] for d in rows)

            await _until(rolled_out, 30, "the rollout to reach every device")
            await _until(lambda: asyncio.sleep(0, other.leads()), 10, "the takeover")
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*devices), 30)
        assert leader.proc.wait(timeout=10) == -signal.SIGKILL
        assert max(worst) <= 1, f"consecutive failures per device: {worst}"
        for i in range(n_devices):
            rows = await call("GET", f"/api/v1/admin/devices/dev{i}/events?limit=10000")
            sent = outboxes[i].last_seq()
            assert sent > 10
            assert [e["seq"] for e in rows] == list(range(1, sent + 1)), f"dev{i}"
            outboxes[i].close()
    # The surviving replica serves TUF through the balancer: a device verifies and downloads v2.
    tuf_dir = tmp_path / "tuf"
    (tuf_dir / "metadata").mkdir(parents=True)
    (tuf_dir / "targets").mkdir()
    (tuf_dir / "metadata" / "root.json").write_bytes(
        (tmp_path / "data" / "1.root.json").read_bytes()
    )
    updater = Updater(
        metadata_dir=str(tuf_dir / "metadata"),
        metadata_base_url=url + "/tuf/metadata/",
        target_dir=str(tuf_dir / "targets"),
        target_base_url=url + "/tuf/targets/",
        fetcher=TokenFetcher(tokens[0]),
        bootstrap=None,
    )
    info = await asyncio.to_thread(updater.get_targetinfo, "m/2/model.onnx")
    assert info is not None
    path = await asyncio.to_thread(updater.download_target, info)
    assert Path(path).read_bytes() == (samples / "fp16.onnx").read_bytes()
