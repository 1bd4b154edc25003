"""The hub's CPU per device request (polls answered 200 or 304, telemetry uploads), side by side.

Usage (from the repository root, under the machine-wide benchmark lock):

    flock /work/bench.lock python build/hub_cost.py --tree base=/work/start --tree new=. \
        [--devices 2000] [--seconds 8] [--rounds 3] [--connections 32] [--postgres]

For every tree (a checkout whose `appliance` is imported through PYTHONPATH): `hub init` in a
temporary directory, devices seeded into the store, a small model published and rolled out to
all of them, then `hub serve` as its own process. wrk (closed loop, `--connections`, one thread)
then drives each mode against each hub in turn, rounds alternating between the trees; the hub's
CPU seconds (user + system, /proc/PID/stat) over a run divided by the requests wrk completed is
the figure, robust to other load on the machine. wrk's own p50/p99 are printed beside it (at
saturation: they say more about queueing than about a poll at 1,667 req/s).

Modes: `poll200` (no If-None-Match), `poll304` (the ETag each device got last), `telemetry`
(one event per upload, each device's seq rising: afterwards the store must hold exactly one event
per 200 answer). With `--postgres` a throw-away PostgreSQL server (tests/support/postgres.py)
holds every hub's database instead of SQLite.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
_TICK = os.sysconf("SC_CLK_TCK")

#: Run inside each tree (its own `appliance`): init, seed, publish, rollout; prints JSON.
_SETUP = r"""
import json, sys
from pathlib import Path
from appliance.hub.service import Hub, HubConfig, init_hub
from appliance.hub.simulate import device_ids, seed_devices
data, n, database = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] or None
config = HubConfig(data_dir=data, database=database)
admin, _ = init_hub(config, data.parent / "root-key")
hub = Hub(config)
ids = device_ids("cost", n)
tokens = seed_devices(hub.store, ids)
model = data.parent / "model.json"
model.write_text('{"steps": []}')
hub.publish("m", "1", model, backend="onnx", manifest={})
hub.create_rollout("m", "1", {"all": True}, 100)
hub.close()
print(json.dumps({"admin": admin, "ids": ids, "tokens": tokens}))
"""

_LUA = r"""
local tokens, etags, ids = {}, {}, {}
local mode, seq_base, pause = "poll200", 0, 0
local i, seqs, turn = 0, {}, 0
function init(args)
  mode = args[2]
  seq_base = tonumber(args[3])
  pause = tonumber(args[4])
  for line in io.lines(args[1]) do
    local t, e = line:match("^(%S+) (%S+)$")
    tokens[#tokens + 1] = t
    etags[#etags + 1] = e
  end
end
function delay()
  return pause
end
function request()
  local kind = mode
  if mode == "mixed" then  -- each device polls (304), then uploads one event
    turn = turn + 1
    if turn % 2 == 1 then
      i = i % #tokens + 1
      kind = "poll304"
    else
      kind = "telemetry"
    end
  else
    i = i % #tokens + 1
  end
  local h = {["Authorization"] = "Bearer " .. tokens[i]}
  if kind == "telemetry" then
    local s = (seqs[i] or seq_base) + 1
    seqs[i] = s
    h["Content-Type"] = "application/json"
    local body = '{"events":[{"seq":' .. s .. ',"time":"2026-12-07T12:00:00Z",' ..
      '"kind":"sim","data":{"n":' .. s .. '}}]}'
    return wrk.format("POST", "/api/v1/device/telemetry", h, body)
  end
  if kind == "poll304" then h["If-None-Match"] = etags[i] end
  return wrk.format("GET", "/api/v1/device/assignments", h)
end
function done(summary, latency, requests)
  io.write(string.format("JSON {\"requests\": %d, \"non2xx\": %d, \"p50_ms\": %.3f, " ..
    "\"p99_ms\": %.3f, \"errors\": %d}\n", summary.requests, summary.errors.status,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
"""


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Hub:
    def __init__(self, name: str, tree: Path, work: Path, devices: int, database: str) -> None:
        self.name, self.tree = name, tree
        self.env = {**os.environ, "PYTHONPATH": str(tree)}
        data = work / name / "hub"
        data.parent.mkdir(parents=True)
        out = subprocess.run(
            [sys.executable, "-c", _SETUP, str(data), str(devices), database],
            env=self.env,
            check=True,
            capture_output=True,
            text=True,
        )
        info = json.loads(out.stdout.strip().splitlines()[-1])
        self.port = free_port()
        cmd = [sys.executable, "-m", "appliance", "hub", "serve", "--data", str(data)]
        if database:
            cmd += ["--database", database]
        cmd += ["--port", str(self.port), "--log-level", "warning"]
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin = info["admin"]
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(self.url + "/healthz", timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise SystemExit(f"{name}: the hub did not start") from None
                time.sleep(0.2)
        # every device's current ETag, for the 304 mode
        lines = []
        for token in info["tokens"]:
            req = urllib.request.Request(
                self.url + "/api/v1/device/assignments",
                headers={"Authorization": f"Bearer {token}"},
            )
            with urllib.request.urlopen(req, timeout=10) as r:
                lines.append(f"{token} {r.headers['ETag']}")
        self.tokens = work / name / "tokens.txt"
        self.tokens.write_text("\n".join(lines) + "\n")
        self.telemetry_ok = 0
        self.seq_base = 0

    def stored(self) -> int:
        req = urllib.request.Request(
            self.url + "/metrics", headers={"Authorization": f"Bearer {self.admin}"}
        )
        text = urllib.request.urlopen(req, timeout=30).read().decode()
        m = re.search(r"^appliance_hub_events_stored(?:_total)? (\S+)$", text, re.M)
        return int(float(m.group(1))) if m else -1

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def run_wrk(
    hub: Hub, mode: str, seconds: float, connections: int, lua: Path, rate: float
) -> dict[str, Any]:
    # --rate: each connection waits connections/rate between requests (an open-ish loop)
    pause = round(1000 * connections / rate) if rate else 0
    before = cpu_seconds(hub.proc.pid)
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{round(seconds)}s",
            "-s",
            str(lua),
            hub.url,
            "--",
            str(hub.tokens),
            mode,
            str(hub.seq_base),
            str(pause),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    cpu = cpu_seconds(hub.proc.pid) - before
    line = next(s for s in out.stdout.splitlines() if s.startswith("JSON "))
    got: dict[str, Any] = json.loads(line[5:])
    if mode in ("telemetry", "mixed"):
        hub.telemetry_ok += (got["requests"] - got["non2xx"]) // (2 if mode == "mixed" else 1)
        hub.seq_base += 10_000_000  # each device's next round starts above every seq sent
    got["cpu_ms_per_req"] = 1000 * cpu / max(1, got["requests"])
    got["req_s"] = got["requests"] / seconds
    return got


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tree", action="append", required=True, help="NAME=PATH (repeatable)")
    ap.add_argument("--devices", type=int, default=2000)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument(
        "--modes",
        default="poll304,poll200,telemetry",
        help="poll304, poll200, telemetry, mixed (each device a 304 poll then an upload)",
    )
    ap.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="about this many req/s in all (each connection pauses); 0: as fast as it goes",
    )
    ap.add_argument("--postgres", action="store_true", help="the hubs on a throw-away PostgreSQL")
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    work = Path(tempfile.mkdtemp(prefix="hub-cost."))
    lua = work / "device.lua"
    lua.write_text(_LUA)
    pg = None
    hubs: list[Hub] = []
    try:
        if args.postgres:
            sys.path.insert(0, str(ROOT))
            from tests.support.postgres import PostgresServer

            pg = PostgresServer()
        for spec in args.tree:
            name, _, path = spec.partition("=")
            database = pg.new_database() if pg is not None else ""
            hubs.append(Hub(name, Path(path).resolve(), work, args.devices, database))
        modes = args.modes.split(",")
        results: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for r in range(args.rounds):
            for mode in modes:
                for hub in hubs if r % 2 == 0 else hubs[::-1]:
                    got = run_wrk(hub, mode, args.seconds, args.connections, lua, args.rate)
                    results.setdefault((mode, hub.name), []).append(got)
        time.sleep(2)  # batched writes (last seen, telemetry) reach the store
        rate = f"about {args.rate:g} req/s" if args.rate else "as fast as it goes"
        print(
            f"{args.devices} devices, {args.connections} connections, {rate}, {args.rounds} "
            f"rounds of {args.seconds:g} s, store: {'postgresql' if pg else 'sqlite'}"
        )
        print(
            f"{'mode':<10} {'tree':<8} {'cpu ms/req':>10} {'req/s':>8} {'p50 ms':>8} "
            f"{'p99 ms':>8} {'non-2xx':>8}"
        )
        for (mode, name), runs in results.items():
            med = {k: statistics.median(x[k] for x in runs) for k in runs[0]}
            print(
                f"{mode:<10} {name:<8} {med['cpu_ms_per_req']:>10.3f} {med['req_s']:>8.0f} "
                f"{med['p50_ms']:>8.2f} {med['p99_ms']:>8.2f} "
                f"{sum(x['non2xx'] + x['errors'] for x in runs):>8}"
            )
        if "telemetry" in modes or "mixed" in modes:
            for hub in hubs:
                stored = hub.stored()
                # wrk stops with uploads in flight: stored but not counted as answered
                verdict = "ok" if stored >= hub.telemetry_ok else "LOST EVENTS"
                print(
                    f"telemetry {hub.name}: {hub.telemetry_ok} uploads answered 200, "
                    f"{stored} events stored ({verdict})"
                )
    finally:
        for hub in hubs:
            hub.stop()
        if pg is not None:
            pg.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
