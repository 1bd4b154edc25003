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
from dataclasses import dataclass
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
    #: Processes that run the devices (hub/simworker.py), the devices dealt among them.
    workers: int = 1
    #: A static TUF mirror (nginx over `hub serve --static-dir`) the devices download from;
    #: None: from the hub's own /tuf/ routes.
    mirror: str | None = None

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
        if not 1 <= self.workers <= 64 or self.workers > self.devices:
            raise InvalidInput("--workers must be from 1 to 64 and at most --devices")
        if self.rollout_at_s is not None and not 0 <= self.rollout_at_s < self.duration_s:
            raise InvalidInput("--rollout-at must fall inside --duration")
        for url in (*self.urls, *([self.mirror] if self.mirror else [])):
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


# -- the devices: worker processes (hub/simworker.py) ----------------------------------------
class _Samples:
    """(completion time, latency) pairs of one request kind, merged from the workers."""

    def __init__(self) -> None:
        self.at = array("d")
        self.latency = array("d")

    def extend(self, at: array[float], latency: array[float]) -> None:
        self.at.extend(at)
        self.latency.extend(latency)

    def window(self, start: float, end: float) -> list[float]:
        return [lat for t, lat in zip(self.at, self.latency, strict=True) if start <= t < end]


def _percentile(sorted_values: Sequence[float], q: float) -> float | None:
    if not sorted_values:
        return None
    k = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[k]


def split(n: int, workers: int, sources: Sequence[str]) -> list[tuple[list[int], list[str]]]:
    """Device indices and source addresses of each worker: devices dealt round-robin (worker w
    has w, w + W, ...: the even schedule stays even), sources dealt the same way when there are
    enough of them, shared otherwise."""
    out = []
    for w in range(workers):
        mine = list(sources[w::workers]) if len(sources) >= workers else list(sources)
        out.append((list(range(w, n, workers)), mine))
    return out


class Simulation:
    """The coordinator: starts the worker processes, publishes the rollout, measures the hub's
    CPU at the phase marks and merges what the workers counted."""

    def __init__(self, config: SimConfig, ids: Sequence[str], tokens: Sequence[str]) -> None:
        self.config = config
        self.ids = ids
        self.tokens = tokens
        self.polls = _Samples()
        self.uploads = _Samples()
        self.status: dict[str, int] = {"200": 0, "304": 0}
        self.errors: dict[str, int] = {}
        self.counts = dict.fromkeys(
            ("events_sent", "events_acked", "duplicates", "downloads", "verified",
             "full_tuf_verified", "launched", "skipped", "unsent", "requests"),
            0,
        )  # fmt: skip
        self.reached: array[float] = array("d")
        self.late: array[float] = array("d")
        self.workers: list[dict[str, Any]] = []
        self.rollout: dict[str, Any] | None = None
        self.rollout_started: float | None = None
        self.rollout_cpu: dict[int, float] = {}
        self._tmp = Path(tempfile.mkdtemp(prefix="appliance-sim."))

    def _error(self, what: str, n: int = 1) -> None:
        self.errors[what] = self.errors.get(what, 0) + n

    async def _spawn(
        self, w: int, indices: list[int], sources: list[str]
    ) -> asyncio.subprocess.Process:
        cfg = self.config
        spec = {
            "index": w,
            "workers": cfg.workers,
            "devices_total": cfg.devices,
            "indices": indices,
            "ids": [self.ids[i] for i in indices],
            "tokens": [self.tokens[i] for i in indices],
            "urls": list(cfg.urls),
            "mirror": cfg.mirror,
            "sources": sources,
            "connections": max(1, cfg.connections // cfg.workers),
            "timeout_s": cfg.timeout_s,
            "poll_interval_s": cfg.poll_interval_s,
            "duration_s": cfg.duration_s,
            "telemetry_per_poll": cfg.telemetry_per_poll,
            "full_tuf": cfg.full_tuf,
            "root_file": str(self._tmp / "root.json"),
            "tmp": str(self._tmp / f"worker-{w}"),
            "out": str(self._tmp / f"worker-{w}.out"),
        }
        path = self._tmp / f"worker-{w}.json"  # holds tokens: the directory is 0700
        path.write_bytes(orjson.dumps(spec))
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "appliance.hub.simworker",
            str(path),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 120)
        if line != b"ready\n":
            raise InvalidInput(f"simulator worker {w} did not start (exit {proc.returncode})")
        return proc

    def _merge(self, w: int, proc: asyncio.subprocess.Process) -> None:
        from .simworker import read_samples

        out = self._tmp / f"worker-{w}.out"
        got = orjson.loads(out.read_bytes())
        for k in self.counts:
            self.counts[k] += int(got[k])
        for k, v in got["status"].items():
            self.status[k] = self.status.get(k, 0) + int(v)
        for k, v in got["errors"].items():
            self._error(k, int(v))
        self.polls.extend(read_samples(out, "polls_at"), read_samples(out, "polls_lat"))
        self.uploads.extend(read_samples(out, "ups_at"), read_samples(out, "ups_lat"))
        self.reached.extend(read_samples(out, "reached"))
        self.late.extend(read_samples(out, "late"))
        self.workers.append(
            {
                "pid": proc.pid,
                "devices": got["devices"],
                "requests": got["requests"],
                "cpu_s": got["cpu_s"],
                "cpu_user_s": got["cpu_user_s"],  # the rest is the kernel (loopback TCP)
                "cpu_us_per_request": round(got["cpu_s"] / max(1, got["requests"]) * 1e6, 1),
            }
        )

    async def run(self, admin: aiohttp.ClientSession) -> dict[str, Any]:
        cfg = self.config
        (self._tmp / "root.json").write_bytes(await _root(admin, cfg))
        procs: list[asyncio.subprocess.Process] = []
        try:
            for w, (indices, sources) in enumerate(split(cfg.devices, cfg.workers, cfg.sources)):
                procs.append(await self._spawn(w, indices, sources))
            stored_before = await events_stored(admin, cfg)
            cpu_before, sim_before = self._cpu(), self._sim_cpu(procs)
            load_before = os.getloadavg()
            start = time.monotonic() + 0.1
            for p in procs:
                assert p.stdin is not None
                p.stdin.write(f"{start!r}\n".encode())
                await p.stdin.drain()
            rollout_task: asyncio.Task[None] | None = None
            if cfg.rollout_at_s is not None:
                rollout_task = asyncio.ensure_future(self._rollout(admin, start + cfg.rollout_at_s))
            steady = start + min(cfg.poll_interval_s, cfg.duration_s)
            await asyncio.sleep(max(0.0, steady - time.monotonic()))
            steady_cpu, sim_steady = self._cpu(), self._sim_cpu(procs)
            await asyncio.sleep(max(0.0, start + cfg.duration_s - time.monotonic()))
            finished = time.monotonic()
            cpu_end, sim_end = self._cpu(), self._sim_cpu(procs)
            # the workers let their last turns finish and empty the devices' outboxes
            for w, p in enumerate(procs):
                assert p.stdout is not None
                line = await asyncio.wait_for(p.stdout.readline(), cfg.timeout_s * 7 + 60)
                if line != b"done\n":
                    raise InvalidInput(f"simulator worker {w} failed (exit {await p.wait()})")
                await p.wait()
                self._merge(w, p)
            if rollout_task is not None:
                rollout_task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await rollout_task
            stored_after = await events_stored(admin, cfg)
        finally:
            for p in procs:
                if p.returncode is None:
                    p.kill()
                    await p.wait()
            shutil.rmtree(self._tmp, ignore_errors=True)
        return self._report(
            start=start,
            steady=steady,
            finished=finished,
            cpu=(cpu_before, steady_cpu, cpu_end),
            sim=(sim_before, sim_steady, sim_end),
            stored=(stored_before, stored_after),
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

    @staticmethod
    def _sim_cpu(procs: Sequence[asyncio.subprocess.Process]) -> dict[int, float]:
        """CPU seconds of each worker and (key 0) of this coordinator."""
        out = {0: _own_cpu()}
        for p in procs:
            with contextlib.suppress(OSError):
                out[p.pid] = cpu_seconds(p.pid)
        return out

    async def _rollout(self, admin: aiohttp.ClientSession, at: float) -> None:
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        cfg = self.config
        url = cfg.urls[0]
        version = f"v{int(time.time())}"
        form = aiohttp.FormData()
        form.add_field("name", MODEL_NAME)
        form.add_field("version", version)
        form.add_field("backend", "onnx")
        form.add_field("manifest", "{}")
        form.add_field("file", secrets.token_bytes(cfg.model_bytes), filename="model.onnx")
        async with admin.post(f"{url}/api/v1/admin/models", data=form) as r:
            published = orjson.loads(await r.read())
            if r.status not in (200, 201):
                self._error(f"publish: HTTP {r.status}: {published}")
                return
        self.rollout = {"target": published["target"], "length": published["length"]}
        self.rollout_started = time.monotonic()
        self.rollout_cpu = self._cpu()
        async with admin.post(
            f"{url}/api/v1/admin/rollouts",
            json={"model": MODEL_NAME, "version": version, "target": {"all": True}},
        ) as r:
            if r.status != 201:
                self._error(f"rollout: HTTP {r.status}")

    def _report(
        self,
        *,
        start: float,
        steady: float,
        finished: float,
        cpu: tuple[dict[int, float], dict[int, float], dict[int, float]],
        sim: tuple[dict[int, float], dict[int, float], dict[int, float]],
        stored: tuple[int | None, int | None],
        load: tuple[tuple[float, float, float], tuple[float, float, float]],
    ) -> dict[str, Any]:
        cfg = self.config
        rollout_at = self.rollout_started
        c = self.counts
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
        sim_cores = sum(sim[2][p] - sim[0][p] for p in sim[2] if p in sim[0]) / max(
            1e-9, finished - start
        )
        basis_span = basis.get("seconds")
        sim_steady = (
            sum(sim[2][p] - sim[1][p] for p in sim[2] if p in sim[1]) / (finished - steady)
            if basis_span and finished > steady
            else None
        )
        started = self.rollout_started or 0.0
        reached = sorted(t - started for t in self.reached)
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
                "workers": cfg.workers,
                "target_poll_rps": round(cfg.devices / cfg.poll_interval_s, 1),
            },
            "phases": out_phases,
            "status": dict(self.status),
            "errors": dict(self.errors),
            "turns": {
                "launched": c["launched"],
                "skipped_busy": c["skipped"],
                "late_p50_ms": _ms(_percentile(late, 0.5)),
                "late_p99_ms": _ms(_percentile(late, 0.99)),
            },
            "telemetry": {
                "events_sent": c["events_sent"],
                "events_acked": c["events_acked"],
                "duplicates": c["duplicates"],
                "unsent_at_end": c["unsent"],
                "stored_in_hub": stored_delta,
                "events_per_s": round(c["events_acked"] / max(1e-9, finished - start), 1),
                "nothing_lost": stored_delta == c["events_sent"] and c["unsent"] == 0,
            },
            "hub_cpu": {
                "pids": list(cfg.hub_pids),
                "seconds_total": round(hub_total, 2),
                "cores_steady": steady_cores,
                "per_1000_devices_per_min": round(steady_cores * 60 / (cfg.devices / 1000), 3),
            }
            if cfg.hub_pids
            else None,
            "simulator_cpu_cores": round(sim_cores, 3),
            "simulator": {
                "workers": self.workers,
                "coordinator_cpu_s": round(sim[2].get(0, 0.0) - sim[0].get(0, 0.0), 3),
                # the devices' CPU per request (polls, uploads, downloads), all workers
                "cpu_us_per_request": round(
                    sum(w["cpu_s"] for w in self.workers) / max(1, c["requests"]) * 1e6, 1
                ),
                "cores_steady": None if sim_steady is None else round(sim_steady, 3),
            },
            "loadavg": {"start": list(load[0]), "end": list(load[1])},
        }
        if self.rollout is not None:
            result["rollout"] = {
                "target": self.rollout["target"],
                "length": self.rollout["length"],
                "mirror": cfg.mirror,
                "devices_reached": len(reached),
                "downloads": c["downloads"],
                "verified": c["verified"],
                "full_tuf_verified": c["full_tuf_verified"],
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


#: The packaged mirror configuration (a source checkout's packaging/ beside appliance/).
MIRROR_CONF = Path(__file__).resolve().parents[2] / "packaging" / "nginx" / "mirror.conf"


@contextlib.contextmanager
def spawn_mirror(root: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Debian's nginx serving `root` with packaging/nginx/mirror.conf as shipped (only its
    listen and root substituted), on a free loopback port; yields (URL, process)."""
    import re

    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists() or not MIRROR_CONF.exists():
        raise InvalidInput(
            "the rollout goes through a static mirror: needs nginx (apt-get install "
            "nginx-light) and packaging/nginx/mirror.conf; or --no-mirror"
        )
    work = Path(tempfile.mkdtemp(prefix="appliance-sim-nginx."))
    port = _free_port()
    block = MIRROR_CONF.read_text(encoding="utf-8")
    block = re.sub(r"(?m)^(\s*)listen\s+\S+;", rf"\1listen 127.0.0.1:{port};", block)
    block = re.sub(r"(?m)^(\s*)root\s+\S+;", rf"\1root {root};", block)
    temps = "".join(
        f"    {kind}_temp_path {work / kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    user = "user nobody nogroup;\n" if os.geteuid() == 0 else ""
    (work / "nginx.conf").write_text(
        f"{user}daemon off;\nworker_processes 1;\npid {work / 'nginx.pid'};\n"
        f"error_log {work / 'error.log'} warn;\n"
        "events { worker_connections 8192; }\n"
        f"http {{\n    access_log off;\n{temps}{block}\n}}\n",
        encoding="utf-8",
    )
    proc = subprocess.Popen(
        [nginx, "-c", str(work / "nginx.conf"), "-p", str(work), "-e", str(work / "error.log")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            if proc.poll() is not None:
                raise InvalidInput(f"nginx exited with {proc.returncode}; see {work}/error.log")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise InvalidInput(f"nginx did not listen on {port}") from None
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}", proc
    finally:
        _stop([proc], 10)
        shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def spawn_hub(
    replicas: int,
    poll_interval_s: float,
    seed: Callable[[Any], None],
    serve_args: Sequence[str] = (),
    database: str | None = None,
    static_dir: Path | None = None,
) -> Iterator[Spawned]:
    """`hub init` in a temporary directory (on `database` when given: an empty PostgreSQL
    database), `seed(config)`, then `replicas` `hub serve` processes on free loopback ports
    (the first keeping a static TUF mirror in `static_dir` when given); all stopped and removed
    afterwards."""
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
        for i in range(replicas):
            static = ["--static-dir", str(static_dir)] if static_dir and i == 0 else []
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
                *static,
                *serve_args,
            ]
            procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL))
            urls.append(f"http://127.0.0.1:{port}")
        for url, proc in zip(urls, procs, strict=True):
            _wait_healthy(url, proc)
        yield Spawned(data, urls, procs, token)
    finally:
        _stop(procs, 15)
        shutil.rmtree(tmp, ignore_errors=True)


def _stop(procs: Sequence[subprocess.Popen[bytes]], grace_s: float) -> None:
    """SIGTERM to all at once (so they stop together), then SIGKILL any still up after `grace_s`."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(grace_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


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
    mirror: bool = True,
) -> Any:
    """Start a hub (`replicas` processes on one database: SQLite, or `database`), seed it,
    simulate. `mirror`: the first replica keeps a static TUF mirror that nginx serves, and the
    devices download the rollout from there, not from the hub."""
    config.check()
    ids = device_ids(config.prefix, config.devices)
    holder: dict[str, list[str]] = {}

    def seed(hub_config: Any) -> None:
        holder["tokens"] = seed_config(hub_config, ids)

    with contextlib.ExitStack() as stack:
        static_dir = mirror_url = None
        if mirror:
            static_dir = Path(tempfile.mkdtemp(prefix="appliance-sim-static."))
            stack.callback(shutil.rmtree, static_dir, True)
            static_dir.chmod(0o755)  # nginx's workers run as nobody
            mirror_url, _ = stack.enter_context(spawn_mirror(static_dir))
        hub = stack.enter_context(
            spawn_hub(replicas, config.poll_interval_s, seed, serve_args, database, static_dir)
        )
        cfg = SimConfig(
            **{
                **config.__dict__,
                "urls": tuple(hub.urls),
                "admin_token": hub.admin_token,
                "hub_pids": hub.pids,
                "mirror": mirror_url,
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
        workers=args.workers,
        mirror=args.mirror,
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
        result = run_spawned(
            base, args.spawn_replicas, args.serve_arg or (), args.database, not args.no_mirror
        )
    text = orjson.dumps(result, option=orjson.OPT_INDENT_2).decode()
    if args.json:
        Path(args.json).write_text(text + "\n", encoding="utf-8")
    else:
        print(text)
    print(table(result), file=sys.stderr if not args.json else sys.stdout)
    return 0
