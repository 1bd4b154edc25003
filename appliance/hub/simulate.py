"""`appliance hub simulate`: a fleet of simulated devices against a real hub, and its figures.

An ops and test tool, never imported by the device: N asyncio devices, each with its own token,
poll their assignments with ETag/If-None-Match on a fixed schedule (evenly spread over the poll
interval, so the hub sees a steady N / interval req/s), upload K telemetry events per poll, and,
once a rollout is created (`--rollout-at`), download the new target and verify it. Requests leave
from many loopback source addresses (127.0.0.x, `local_addr`), so one address does not run out of
ephemeral ports. Loopback only, bounded in devices and time.

Verification of a rollout: the simulator proves the new targets metadata once with the device's
own TUF code (`sync.tuf_client.TufClient`: root, timestamp, snapshot, targets, signatures,
expiry); every device then checks the downloaded bytes' length and sha256 against that signed
entry, and the first `--full-tuf` devices each run the device's whole path (their own metadata
directory, refresh, download, verify) in a worker thread. Full TUF for 100,000 devices in one
process would measure the simulator, not the hub.

Enrolment: `--spawn` starts the hub itself (`hub init` in a temporary directory, `hub serve`
processes) and seeds the devices straight into its store through `HubStore` in one transaction
(`seed_devices`: the same rows `Hub.enroll` writes, 100,000 in seconds); with `--hub URL` the
devices are enrolled through the admin API (`POST /api/v1/admin/devices`, concurrently).

Figures: poll req/s sustained, p50/p99 poll and telemetry latency, telemetry events stored
(counted in the hub's store before and after: nothing lost means stored == sent), CPU seconds of
the hub process(es) per 1,000 devices (from /proc), time for a 100 % rollout to reach every device.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import ipaddress
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson

from ..errors import InvalidInput

MAX_DEVICES = 1_000_000
MAX_DURATION_S = 6 * 3600.0
MODEL_NAME = "sim-model"
_STORED = ("appliance_hub_events_stored_total ", "appliance_hub_events_stored ")


# -- settings and inputs ---------------------------------------------------------------------
@dataclass(frozen=True)
class SimConfig:
    """One run. `urls`: the hub replicas (devices are spread over them round-robin)."""

    devices: int
    poll_interval_s: float
    duration_s: float
    urls: tuple[str, ...]
    admin_token: str
    telemetry_per_poll: int = 1
    sources: tuple[str, ...] = ("127.0.0.1",)
    connections: int = 1024
    timeout_s: float = 30.0
    rollout_at_s: float | None = None
    full_tuf: int = 3
    model_bytes: int = 4096
    prefix: str = "sim"
    hub_pids: tuple[int, ...] = ()
    #: A database server's main process (PostgreSQL's postmaster): its CPU and its backends'
    #: is reported beside the hub's.
    db_pid: int | None = None

    def check(self) -> None:
        if not 1 <= self.devices <= MAX_DEVICES:
            raise InvalidInput(f"--devices must be from 1 to {MAX_DEVICES}")
        if not 0.05 <= self.poll_interval_s <= 3600:
            raise InvalidInput("--poll-interval must be from 0.05 to 3600 seconds")
        if not 0 < self.duration_s <= MAX_DURATION_S:
            raise InvalidInput(f"--duration must be from 0 to {MAX_DURATION_S:.0f} seconds")
        if not 0 <= self.telemetry_per_poll <= 500:
            raise InvalidInput("--telemetry-per-poll must be from 0 to 500 (the hub's batch limit)")
        if not 1 <= self.connections <= 60000:
            raise InvalidInput("--connections must be from 1 to 60000")
        if self.rollout_at_s is not None and not 0 <= self.rollout_at_s < self.duration_s:
            raise InvalidInput("--rollout-at must fall inside --duration")
        for url in self.urls:
            host = urlsplit(url).hostname or ""
            if not _is_loopback(host):
                raise InvalidInput(f"hub {url!r} is not on loopback: the simulator stays local")
        for src in self.sources:
            if not _is_loopback(src):
                raise InvalidInput(f"source address {src!r} is not a loopback address")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_sources(text: str) -> tuple[str, ...]:
    """ "127.0.0.1-127.0.0.50" or "127.0.0.1,127.0.0.2": loopback addresses to send from."""
    out: list[str] = []
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        try:
            a = ipaddress.IPv4Address(first)
            b = ipaddress.IPv4Address(last) if last else a
        except ValueError:
            raise InvalidInput(f"--sources: {part!r} is not an IPv4 address or range") from None
        if int(b) < int(a) or int(b) - int(a) > 4096:
            raise InvalidInput(f"--sources: range {part!r} is reversed or over 4096 addresses")
        out.extend(str(ipaddress.IPv4Address(i)) for i in range(int(a), int(b) + 1))
    for src in out:
        if not _is_loopback(src):
            raise InvalidInput(f"--sources: {src} is not a loopback address")
    return tuple(out)


def device_ids(prefix: str, n: int) -> list[str]:
    return [f"{prefix}-{i:07d}" for i in range(n)]


def seed_devices(store: Any, ids: Sequence[str], group: str = "sim") -> list[str]:
    """Bulk enrolment straight into a `HubStore` (one transaction): the rows `Hub.enroll`
    writes, for a hub that is not serving yet. Returns the tokens, in the order of `ids`."""
    from .service import now_iso, token_hash
    from .storage import Device

    tokens = [secrets.token_urlsafe(24) for _ in ids]
    when = now_iso()
    with store.transaction():
        for device_id, token in zip(ids, tokens, strict=True):
            store.add_device(Device(device_id, group, token_hash(token), when, None))
    return tokens


async def enroll_api(
    session: aiohttp.ClientSession, url: str, admin_token: str, ids: Sequence[str], group: str
) -> list[str]:
    """Enrol through the admin API, 32 requests at a time; returns the tokens."""
    headers = {"Authorization": f"Bearer {admin_token}"}
    tokens = [""] * len(ids)
    sem = asyncio.Semaphore(32)

    async def one(i: int) -> None:
        async with (
            sem,
            session.post(
                f"{url}/api/v1/admin/devices",
                json={"device_id": ids[i], "group": group},
                headers=headers,
            ) as r,
        ):
            body = await r.read()
            if r.status != 201:
                raise InvalidInput(f"enrolling {ids[i]}: HTTP {r.status}: {body[:200]!r}")
            tokens[i] = orjson.loads(body)["token"]

    await asyncio.gather(*(one(i) for i in range(len(ids))))
    return tokens


# -- CPU of the hub --------------------------------------------------------------------------
_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads), from /proc."""
    raw = Path(f"/proc/{pid}/stat").read_text(encoding="ascii")
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process, its live descendants and its reaped children (a database
    server: the postmaster and its backends)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                raw = (entry / "stat").read_text(encoding="ascii")
                ppid = int(raw[raw.rindex(")") + 2 :].split()[1])
                parents.setdefault(ppid, []).append(int(entry.name))
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        with contextlib.suppress(OSError):
            total += cpu_seconds(p)
            if p == pid:  # children already reaped (backends that ended)
                raw = Path(f"/proc/{p}/stat").read_text(encoding="ascii")
                f = raw[raw.rindex(")") + 2 :].split()
                total += (int(f[13]) + int(f[14])) / _TICK
        todo.extend(parents.get(p, []))
    return total


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system


# -- the devices -----------------------------------------------------------------------------
@dataclass
class _Device:
    index: int
    device_id: str
    url: str
    session: aiohttp.ClientSession
    auth: str
    etag: str | None = None
    seq: int = 0
    pending: list[dict[str, Any]] = field(default_factory=list)
    active: str | None = None
    busy: bool = False


@dataclass
class _Rollout:
    version: str
    target: str
    url_path: str
    sha256: str
    length: int
    info: Any  # tuf TargetFile proven by the device's TUF client
    started: float = 0.0


class _Samples:
    """(completion time, latency) pairs of one request kind, compact."""

    def __init__(self) -> None:
        self.at = array("d")
        self.latency = array("d")

    def add(self, at: float, latency: float) -> None:
        self.at.append(at)
        self.latency.append(latency)

    def window(self, start: float, end: float) -> list[float]:
        return [lat for t, lat in zip(self.at, self.latency, strict=True) if start <= t < end]


def _percentile(sorted_values: Sequence[float], q: float) -> float | None:
    if not sorted_values:
        return None
    k = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[k]


class Simulation:
    """The devices, their counters and the rollout, on one event loop."""

    def __init__(self, config: SimConfig, ids: Sequence[str], tokens: Sequence[str]) -> None:
        self.config = config
        self.ids = ids
        self.tokens = tokens
        self.polls = _Samples()
        self.uploads = _Samples()
        self.status: dict[str, int] = {"200": 0, "304": 0}
        self.errors: dict[str, int] = {}
        self.events_sent = 0
        self.events_acked = 0
        self.events_duplicate = 0
        self.downloads = 0
        self.verified = 0
        self.full_tuf_verified = 0
        self.reached: array[float] = array("d")
        self.late = array("d")
        self.rollout: _Rollout | None = None
        self.rollout_cpu: dict[int, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._tmp = Path(tempfile.mkdtemp(prefix="appliance-sim."))

    def _error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1

    # one device's turn: poll, maybe download, upload telemetry
    async def _turn(self, dev: _Device, due: float) -> None:
        loop = asyncio.get_running_loop()
        try:
            await self._poll(dev, loop)
            if self.config.telemetry_per_poll:
                for _ in range(self.config.telemetry_per_poll):
                    dev.seq += 1
                    dev.pending.append(
                        {"seq": dev.seq, "time": _now(), "kind": "sim", "data": {"n": dev.seq}}
                    )
                    self.events_sent += 1
            if dev.pending:
                await self._upload(dev, loop)
        finally:
            dev.busy = False

    async def _poll(self, dev: _Device, loop: asyncio.AbstractEventLoop) -> None:
        headers = {"Authorization": dev.auth}
        if dev.etag:
            headers["If-None-Match"] = dev.etag
        t0 = loop.time()
        try:
            async with dev.session.get(
                f"{dev.url}/api/v1/device/assignments", headers=headers
            ) as r:
                body = await r.read()
                status = r.status
                etag = r.headers.get("ETag")
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            self._error(f"poll: {type(exc).__name__}")
            return
        t1 = loop.time()
        self.polls.add(t1, t1 - t0)
        if status == 304:
            self.status["304"] += 1
            return
        if status != 200:
            self._error(f"poll: HTTP {status}")
            return
        self.status["200"] += 1
        dev.etag = etag
        rollout = self.rollout
        if rollout is None:
            return
        models = orjson.loads(body).get("models", [])
        wanted = [m for m in models if m.get("name") == MODEL_NAME]
        if wanted and wanted[0].get("version") == rollout.version and dev.active != rollout.version:
            await self._download(dev, rollout, loop)

    async def _download(
        self, dev: _Device, rollout: _Rollout, loop: asyncio.AbstractEventLoop
    ) -> None:
        """Fetch the target and verify it against the signed targets entry (or, for the first
        devices, run the device's own TUF client end to end)."""
        if dev.index < self.config.full_tuf:
            ok = await asyncio.to_thread(self._full_tuf, dev, rollout)
            if not ok:
                return
            self.full_tuf_verified += 1
        else:
            try:
                async with dev.session.get(
                    f"{dev.url}/tuf/targets/{rollout.url_path}",
                    headers={"Authorization": dev.auth},
                ) as r:
                    data = await r.read()
                    status = r.status
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                self._error(f"download: {type(exc).__name__}")
                return
            self.downloads += 1
            if status != 200:
                self._error(f"download: HTTP {status}")
                return
            try:
                rollout.info.verify_length_and_hashes(io.BytesIO(data))
            except Exception as exc:
                self._error(f"verify: {type(exc).__name__}")
                return
        self.verified += 1
        dev.active = rollout.version
        self.reached.append(loop.time() - rollout.started)
        dev.seq += 1
        self.events_sent += 1
        dev.pending.append(
            {
                "seq": dev.seq,
                "time": _now(),
                "kind": "activated",
                "data": {"model": MODEL_NAME, "version": rollout.version},
            }
        )

    def _full_tuf(self, dev: _Device, rollout: _Rollout) -> bool:
        from ..sync.tuf_client import SyncError, TufClient

        work = self._tmp / dev.device_id
        client = TufClient(
            dev.url,
            self.tokens[dev.index],
            dev.device_id,
            self._tmp / "root.json",
            work / "metadata",
            work / "downloads",
            self.config.timeout_s,
            1 << 30,
        )
        try:
            updater = client.refresh()
            info = updater.get_targetinfo(rollout.target)
            if info is None:
                self._error("full-tuf: target not in signed metadata")
                return False
            client.download(info, lambda _have, _total: None)
        except SyncError as exc:
            self._error(f"full-tuf: {type(exc).__name__}: {exc.reason[:80]}")
            return False
        self.downloads += 1
        return True

    async def _upload(self, dev: _Device, loop: asyncio.AbstractEventLoop) -> None:
        batch = dev.pending[:500]
        t0 = loop.time()
        try:
            async with dev.session.post(
                f"{dev.url}/api/v1/device/telemetry",
                data=orjson.dumps({"events": batch}),
                headers={"Authorization": dev.auth, "Content-Type": "application/json"},
            ) as r:
                body = await r.read()
                status = r.status
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            self._error(f"telemetry: {type(exc).__name__}")
            return  # kept in `pending`: sent again next turn, as the device's outbox does
        t1 = loop.time()
        if status != 200:
            self._error(f"telemetry: HTTP {status}")
            return
        self.uploads.add(t1, t1 - t0)
        answer = orjson.loads(body)
        self.events_acked += int(answer.get("stored", 0))
        self.events_duplicate += int(answer.get("duplicates", 0))
        del dev.pending[: len(batch)]

    # the schedule
    async def run(self, admin: aiohttp.ClientSession) -> dict[str, Any]:
        cfg = self.config
        loop = asyncio.get_running_loop()
        per_source = max(1, cfg.connections // len(cfg.sources))
        timeout = aiohttp.ClientTimeout(total=cfg.timeout_s)
        sessions = [
            aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=per_source, limit_per_host=0, local_addr=(src, 0), ttl_dns_cache=None
                ),
                timeout=timeout,
                skip_auto_headers=("User-Agent",),
            )
            for src in cfg.sources
        ]
        devices = [
            _Device(
                i,
                self.ids[i],
                cfg.urls[i % len(cfg.urls)],
                sessions[i % len(sessions)],
                f"Bearer {self.tokens[i]}",
            )
            for i in range(cfg.devices)
        ]
        (self._tmp / "root.json").write_bytes(await _root(admin, cfg))
        stored_before = await events_stored(admin, cfg)
        cpu_before = self._cpu()
        own_before = _own_cpu()
        load_before = os.getloadavg()
        start = loop.time()
        end = start + cfg.duration_s
        rollout_task: asyncio.Task[None] | None = None
        if cfg.rollout_at_s is not None:
            rollout_task = asyncio.ensure_future(self._rollout(admin, start + cfg.rollout_at_s))
        step = cfg.poll_interval_s / cfg.devices
        launched = 0
        skipped = 0
        marks: dict[str, tuple[float, dict[int, float], float]] = {}
        warm_end = start + min(cfg.poll_interval_s, cfg.duration_s)
        try:
            while True:
                now = loop.time()
                if "steady" not in marks and now >= warm_end:
                    marks["steady"] = (now, self._cpu(), _own_cpu())
                if now >= end:
                    break
                while True:
                    due = start + launched * step
                    if due > now or due >= end:
                        break
                    dev = devices[launched % cfg.devices]
                    launched += 1
                    if dev.busy:  # its last turn is still running: a device polls one at a time
                        skipped += 1
                        continue
                    dev.busy = True
                    self.late.append(now - due)
                    task = asyncio.ensure_future(self._turn(dev, due))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                await asyncio.sleep(min(0.005, max(0.0, start + launched * step - loop.time())))
            finished = loop.time()
            cpu_end = self._cpu()
            own_end = _own_cpu()
            # the last turns finish; their figures count, the hub's CPU window is closed
            if self._tasks:
                await asyncio.wait(set(self._tasks), timeout=cfg.timeout_s + 5)
            # anything still pending is sent now (a device's outbox empties eventually)
            retries = [d for d in devices if d.pending]
            for _ in range(5):
                if not retries:
                    break
                await asyncio.gather(*(self._upload(d, loop) for d in retries))
                retries = [d for d in devices if d.pending]
            if rollout_task is not None:
                rollout_task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await rollout_task
            stored_after = await events_stored(admin, cfg)
        finally:
            for s in sessions:
                await s.close()
            shutil.rmtree(self._tmp, ignore_errors=True)
        steady_at, steady_cpu, steady_own = marks.get("steady", (start, cpu_before, own_before))
        return self._report(
            start=start,
            steady=steady_at,
            finished=finished,
            cpu=(cpu_before, steady_cpu, cpu_end),
            own=(own_before, steady_own, own_end),
            stored=(stored_before, stored_after),
            launched=launched,
            skipped=skipped,
            unsent=sum(len(d.pending) for d in devices),
            load=(load_before, os.getloadavg()),
        )

    def _cpu(self) -> dict[int, float]:
        """CPU seconds by hub pid; the database server's (tree) under key -1."""
        out = {}
        for pid in self.config.hub_pids:
            with contextlib.suppress(OSError):
                out[pid] = cpu_seconds(pid)
        if self.config.db_pid:
            out[-1] = tree_cpu_seconds(self.config.db_pid)
        return out

    async def _rollout(self, admin: aiohttp.ClientSession, at: float) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(max(0.0, at - loop.time()))
        cfg = self.config
        url = cfg.urls[0]
        version = f"v{int(time.time())}"
        blob = secrets.token_bytes(cfg.model_bytes)
        form = aiohttp.FormData()
        form.add_field("name", MODEL_NAME)
        form.add_field("version", version)
        form.add_field("backend", "onnx")
        form.add_field("manifest", "{}")
        form.add_field("file", blob, filename="model.onnx")
        async with admin.post(f"{url}/api/v1/admin/models", data=form) as r:
            published = orjson.loads(await r.read())
            if r.status not in (200, 201):
                self._error(f"publish: HTTP {r.status}: {published}")
                return
        info = await asyncio.to_thread(self._signed_entry, published["target"])
        if info is None:
            return
        name, ver, base = published["target"].split("/")
        rollout = _Rollout(
            version,
            published["target"],
            f"{name}/{ver}/{published['sha256']}.{base}",
            published["sha256"],
            published["length"],
            info,
        )
        self.rollout = rollout
        rollout.started = loop.time()
        self.rollout_cpu = self._cpu()
        async with admin.post(
            f"{url}/api/v1/admin/rollouts",
            json={"model": MODEL_NAME, "version": version, "target": {"all": True}},
        ) as r:
            if r.status != 201:
                self._error(f"rollout: HTTP {r.status}")

    def _signed_entry(self, target: str) -> Any:
        """The new target as the device's TUF client proves it (root → targets)."""
        from ..sync.tuf_client import SyncError, TufClient

        work = self._tmp / "verifier"
        client = TufClient(
            self.config.urls[0],
            self.tokens[0],
            self.ids[0],
            self._tmp / "root.json",
            work / "metadata",
            work / "downloads",
            self.config.timeout_s,
            1 << 30,
        )
        try:
            info = client.refresh().get_targetinfo(target)
        except SyncError as exc:
            self._error(f"tuf: {exc.reason[:120]}")
            return None
        if info is None:
            self._error("tuf: the published target is not in the signed metadata")
        return info

    def _report(
        self,
        *,
        start: float,
        steady: float,
        finished: float,
        cpu: tuple[dict[int, float], dict[int, float], dict[int, float]],
        own: tuple[float, float, float],
        stored: tuple[int | None, int | None],
        launched: int,
        skipped: int,
        unsent: int,
        load: tuple[tuple[float, float, float], tuple[float, float, float]],
    ) -> dict[str, Any]:
        cfg = self.config
        rollout_at = self.rollout.started if self.rollout else None
        phases: list[tuple[str, float, float]] = [("warmup", start, steady)]
        if rollout_at is not None and rollout_at > steady:
            phases += [("steady", steady, rollout_at), ("rollout", rollout_at, finished)]
        elif rollout_at is not None:
            phases += [("rollout", steady, finished)]
        else:
            phases += [("steady", steady, finished)]
        marks = {start: cpu[0], steady: cpu[1], finished: cpu[2]}
        if rollout_at is not None:
            marks[rollout_at] = self.rollout_cpu
        out_phases = {}
        for name, a, b in phases:
            if b - a <= 0:
                continue
            a_cpu, b_cpu = marks.get(a, {}), marks.get(b, {})
            hub_cores = sum(b_cpu[p] - a_cpu[p] for p in b_cpu if p in a_cpu and p >= 0) / (b - a)
            db_cores = (b_cpu[-1] - a_cpu[-1]) / (b - a) if -1 in a_cpu and -1 in b_cpu else None
            # the last phase also holds the turns that finished after the schedule ended
            upto = float("inf") if b == finished else b
            polls = sorted(self.polls.window(a, upto))
            ups = sorted(self.uploads.window(a, upto))
            out_phases[name] = {
                "seconds": round(b - a, 2),
                "polls": len(polls),
                "poll_rps": round(len(polls) / (b - a), 1),
                "poll_p50_ms": _ms(_percentile(polls, 0.5)),
                "poll_p99_ms": _ms(_percentile(polls, 0.99)),
                "poll_max_ms": _ms(polls[-1] if polls else None),
                "uploads": len(ups),
                "upload_p50_ms": _ms(_percentile(ups, 0.5)),
                "upload_p99_ms": _ms(_percentile(ups, 0.99)),
                "hub_cpu_cores": round(hub_cores, 3) if cfg.hub_pids else None,
                "db_cpu_cores": None if db_cores is None else round(db_cores, 3),
                # CPU the hub spent per request: comparable even on a machine busy with others
                "hub_cpu_ms_per_request": round(
                    hub_cores * (b - a) / (len(polls) + len(ups)) * 1000, 3
                )
                if cfg.hub_pids and polls
                else None,
            }
        # CPU per 1,000 devices from the steady phase (no rollout traffic) when there is one
        basis = out_phases.get("steady") or out_phases.get("rollout") or {}
        steady_cores = basis.get("hub_cpu_cores") or 0.0
        hub_total = sum(cpu[2].get(p, 0.0) - cpu[0].get(p, 0.0) for p in cpu[2] if p >= 0)
        stored_delta = (
            stored[1] - stored[0] if stored[0] is not None and stored[1] is not None else None
        )
        reached = sorted(self.reached)
        late = sorted(self.late)
        result: dict[str, Any] = {
            "config": {
                "devices": cfg.devices,
                "poll_interval_s": cfg.poll_interval_s,
                "duration_s": cfg.duration_s,
                "telemetry_per_poll": cfg.telemetry_per_poll,
                "hubs": list(cfg.urls),
                "sources": len(cfg.sources),
                "connections": cfg.connections,
                "target_poll_rps": round(cfg.devices / cfg.poll_interval_s, 1),
            },
            "phases": out_phases,
            "status": dict(self.status),
            "errors": dict(self.errors),
            "turns": {
                "launched": launched,
                "skipped_busy": skipped,
                "late_p50_ms": _ms(_percentile(late, 0.5)),
                "late_p99_ms": _ms(_percentile(late, 0.99)),
            },
            "telemetry": {
                "events_sent": self.events_sent,
                "events_acked": self.events_acked,
                "duplicates": self.events_duplicate,
                "unsent_at_end": unsent,
                "stored_in_hub": stored_delta,
                "events_per_s": round(self.events_acked / max(1e-9, finished - start), 1),
                "nothing_lost": stored_delta == self.events_sent and unsent == 0,
            },
            "hub_cpu": {
                "pids": list(cfg.hub_pids),
                "seconds_total": round(hub_total, 2),
                "cores_steady": steady_cores,
                "per_1000_devices_per_min": round(steady_cores * 60 / (cfg.devices / 1000), 3),
            }
            if cfg.hub_pids
            else None,
            "simulator_cpu_cores": round((own[2] - own[0]) / max(1e-9, finished - start), 3),
            "loadavg": {"start": list(load[0]), "end": list(load[1])},
        }
        if self.rollout is not None:
            result["rollout"] = {
                "target": self.rollout.target,
                "length": self.rollout.length,
                "devices_reached": len(reached),
                "downloads": self.downloads,
                "full_tuf_verified": self.full_tuf_verified,
                "p50_s": _s(_percentile(reached, 0.5)),
                "p90_s": _s(_percentile(reached, 0.9)),
                "all_s": _s(reached[-1]) if len(reached) == cfg.devices else None,
            }
        return result


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000, 2)


def _s(v: float | None) -> float | None:
    return None if v is None else round(v, 2)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


async def _root(admin: aiohttp.ClientSession, cfg: SimConfig) -> bytes:
    async with admin.get(f"{cfg.urls[0]}/api/v1/admin/root.json") as r:
        body = await r.read()
        if r.status != 200:
            raise InvalidInput(f"cannot read the hub's root.json: HTTP {r.status}")
        return body


async def events_stored(admin: aiohttp.ClientSession, cfg: SimConfig) -> int | None:
    """The hub's stored-events counter (from its store, through /metrics)."""
    async with admin.get(f"{cfg.urls[0]}/metrics") as r:
        text = (await r.read()).decode()
    for line in text.splitlines():
        if line.startswith(_STORED):
            return int(float(line.split()[-1]))
    return None


# -- a hub to simulate against ---------------------------------------------------------------
@dataclass
class Spawned:
    """Hub processes started for one run on a fresh data directory."""

    data: Path
    urls: list[str]
    procs: list[subprocess.Popen[bytes]]
    admin_token: str

    @property
    def pids(self) -> tuple[int, ...]:
        return tuple(p.pid for p in self.procs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def spawn_hub(
    replicas: int,
    poll_interval_s: float,
    seed: Callable[[Any], None],
    serve_args: Sequence[str] = (),
    database: str | None = None,
) -> Iterator[Spawned]:
    """`hub init` in a temporary directory (on `database` when given: an empty PostgreSQL
    database), `seed(config)`, then `replicas` `hub serve` processes on free loopback ports;
    all stopped and removed afterwards."""
    from .service import HubConfig, init_hub

    tmp = Path(tempfile.mkdtemp(prefix="appliance-sim-hub."))
    data = tmp / "hub"
    procs: list[subprocess.Popen[bytes]] = []
    config = HubConfig(data_dir=data, database=database)
    if database:
        serve_args = ["--database", database, *serve_args]
    try:
        token, _ = init_hub(config, tmp / "root-key")
        seed(config)
        urls = []
        for _ in range(replicas):
            port = _free_port()
            cmd = [
                sys.executable,
                "-m",
                "appliance",
                "hub",
                "serve",
                "--data",
                str(data),
                "--port",
                str(port),
                "--poll-interval",
                str(max(1, round(poll_interval_s))),
                "--log-level",
                "warning",
                *serve_args,
            ]
            procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL))
            urls.append(f"http://127.0.0.1:{port}")
        for url, proc in zip(urls, procs, strict=True):
            _wait_healthy(url, proc)
        yield Spawned(data, urls, procs, token)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 60.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise InvalidInput(f"hub process for {url} exited with {proc.returncode}")
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"{url}/healthz", timeout=2) as r,  # noqa: S310
        ):
            if r.status == 200:
                return
        time.sleep(0.1)
    raise InvalidInput(f"hub at {url} did not answer /healthz within {timeout_s:.0f} s")


def seed_config(config: Any, ids: Sequence[str]) -> list[str]:
    """Seed the store a `HubConfig` names (SQLite file or PostgreSQL)."""
    store = config.open_store()
    try:
        return seed_devices(store, ids)
    finally:
        store.close()


# -- entry points ----------------------------------------------------------------------------
async def simulate(config: SimConfig, tokens: Sequence[str] | None = None) -> dict[str, Any]:
    """Run one simulation; enrols through the admin API when no tokens are given."""
    config.check()
    ids = device_ids(config.prefix, config.devices)
    admin = aiohttp.ClientSession(
        headers={"Authorization": f"Bearer {config.admin_token}"},
        timeout=aiohttp.ClientTimeout(total=600),
    )
    try:
        if tokens is None:
            tokens = await enroll_api(admin, config.urls[0], config.admin_token, ids, "sim")
        return await Simulation(config, ids, tokens).run(admin)
    finally:
        await admin.close()


def run_spawned(
    config: SimConfig,
    replicas: int = 1,
    serve_args: Sequence[str] = (),
    database: str | None = None,
) -> Any:
    """Start a hub (`replicas` processes on one database: SQLite, or `database`), seed it,
    simulate."""
    ids = device_ids(config.prefix, config.devices)
    holder: dict[str, list[str]] = {}

    def seed(hub_config: Any) -> None:
        holder["tokens"] = seed_config(hub_config, ids)

    with spawn_hub(replicas, config.poll_interval_s, seed, serve_args, database) as hub:
        cfg = SimConfig(
            **{
                **config.__dict__,
                "urls": tuple(hub.urls),
                "admin_token": hub.admin_token,
                "hub_pids": hub.pids,
            }
        )
        return asyncio.run(simulate(cfg, holder["tokens"]))


def table(result: dict[str, Any]) -> str:
    """The figures as a human table."""
    cfg = result["config"]
    lines = [
        f"devices {cfg['devices']}, poll every {cfg['poll_interval_s']} s "
        f"(target {cfg['target_poll_rps']} req/s), {cfg['telemetry_per_poll']} event(s)/poll, "
        f"{len(cfg['hubs'])} hub process(es), {cfg['sources']} source address(es)",
        f"{'phase':<8} {'s':>7} {'polls':>8} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'max ms':>8} {'tel p50':>8} {'tel p99':>8} {'hub CPU':>8} {'ms/req':>8}",
    ]
    for name, p in result["phases"].items():
        lines.append(
            f"{name:<8} {p['seconds']:>7} {p['polls']:>8} {p['poll_rps']:>8} "
            f"{_f(p['poll_p50_ms'])} {_f(p['poll_p99_ms'])} {_f(p['poll_max_ms'])} "
            f"{_f(p['upload_p50_ms'])} {_f(p['upload_p99_ms'])} {_f(p['hub_cpu_cores'])} "
            f"{_f(p['hub_cpu_ms_per_request'])}"
        )
    t = result["telemetry"]
    lines.append(
        f"telemetry: sent {t['events_sent']}, acked {t['events_acked']}, stored in hub "
        f"{t['stored_in_hub']}, {t['events_per_s']} events/s, nothing lost: {t['nothing_lost']}"
    )
    cpu = result.get("hub_cpu")
    if cpu:
        lines.append(
            f"hub CPU: {cpu['cores_steady']} cores in steady state, "
            f"{cpu['per_1000_devices_per_min']} CPU s per 1,000 devices per minute; "
            f"simulator {result['simulator_cpu_cores']} cores"
        )
    turns = result["turns"]
    lines.append(
        f"status {result['status']}, errors {result['errors'] or 'none'}, turns late p99 "
        f"{turns['late_p99_ms']} ms, skipped (device still busy) {turns['skipped_busy']}"
    )
    if "rollout" in result:
        r = result["rollout"]
        lines.append(
            f"rollout: {r['devices_reached']}/{cfg['devices']} devices verified "
            f"({r['full_tuf_verified']} with full TUF), p50 {r['p50_s']} s, p90 {r['p90_s']} s, "
            f"all {r['all_s']} s"
        )
    la = result["loadavg"]
    lines.append(f"load average: start {la['start'][0]:.2f}, end {la['end'][0]:.2f}")
    return "\n".join(lines)


def _f(v: float | None) -> str:
    return f"{'-' if v is None else v:>8}"


def main(args: Any) -> int:
    """`appliance hub simulate` (arguments from hub/cli.py)."""
    sources = parse_sources(args.sources)
    base = SimConfig(
        devices=args.devices,
        poll_interval_s=args.poll_interval,
        duration_s=args.duration,
        urls=tuple(args.hub or ("http://127.0.0.1",)),
        admin_token="",
        telemetry_per_poll=args.telemetry_per_poll,
        sources=sources,
        connections=args.connections,
        timeout_s=args.timeout,
        rollout_at_s=args.rollout_at,
        full_tuf=args.full_tuf,
        model_bytes=args.model_bytes,
        prefix=args.prefix,
        hub_pids=tuple(args.hub_pid or ()),
        db_pid=args.db_pid,
    )
    base.check()
    if args.hub:
        token_file = Path(args.admin_token_file or "hub-data/admin.token")
        try:
            token = token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise InvalidInput(
                f"cannot read the admin token {token_file}: {exc.strerror}"
            ) from None
        result = asyncio.run(simulate(SimConfig(**{**base.__dict__, "admin_token": token})))
    else:
        result = run_spawned(base, args.spawn_replicas, args.serve_arg or (), args.database)
    text = orjson.dumps(result, option=orjson.OPT_INDENT_2).decode()
    if args.json:
        Path(args.json).write_text(text + "\n", encoding="utf-8")
    else:
        print(text)
    print(table(result), file=sys.stderr if not args.json else sys.stdout)
    return 0
