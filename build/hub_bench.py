"""The fleet figures side by side: `appliance hub simulate` on SQLite (one process) and on
PostgreSQL with 1 and 2 replicas, for each device count, one after the other in one run.
The rollout's downloads go through nginx over the hub's static mirror (`--static-dir`).

    python build/hub_bench.py --devices 10000 100000 --poll-interval 60 --duration 180 \\
        --rollout-at 90

PostgreSQL is Debian's (initdb + pg_ctl as `nobody` when run as root) in a temporary
directory, with its default durability (fsync and synchronous_commit on), as SQLite's
synchronous=FULL: both acknowledge telemetry only once it is on disk. Prints a Markdown table
(the README's) and writes each run's JSON under --out.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson


def _pg_bin(name: str) -> str:
    for d in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (d / name).exists():
            return str(d / name)
    found = shutil.which(name)
    if found is None:
        sys.exit(f"{name} not found: apt-get install postgresql")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def postgres() -> Iterator[tuple[str, int]]:
    """A durable PostgreSQL on a free loopback port; yields (host URL prefix, port)."""
    root = Path(tempfile.mkdtemp(prefix="appliance-bench-pg."))
    as_user: list[str] = []
    if os.geteuid() == 0:
        os.chown(root, 65534, 65534)
        as_user = ["runuser", "-u", "nobody", "--"]
    port = _free_port()
    data = root / "data"
    subprocess.run(
        [*as_user, _pg_bin("initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
         "-E", "UTF8", "--no-instructions"],
        check=True, capture_output=True, cwd=root,
    )  # fmt: skip
    opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c max_connections=200"
    ctl = _pg_bin("pg_ctl")
    subprocess.run(
        [*as_user, ctl, "-D", str(data), "-o", opts, "-l", str(root / "log"), "-w", "start"],
        check=True, capture_output=True, cwd=root,
    )  # fmt: skip
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}", port
    finally:
        subprocess.run(
            [*as_user, ctl, "-D", str(data), "-m", "fast", "stop"], capture_output=True, cwd=root
        )
        shutil.rmtree(root, ignore_errors=True)


def postmaster_pid(port: int) -> int:
    for pidfile in Path(tempfile.gettempdir()).glob("appliance-bench-pg.*/data/postmaster.pid"):
        lines = pidfile.read_text().splitlines()
        if len(lines) > 3 and lines[3].strip() == str(port):
            return int(lines[0])
    raise RuntimeError(f"no postmaster.pid for port {port}")


def new_database(base: str, name: str) -> str:
    import psycopg

    with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name}".encode())
        conn.execute(f"CREATE DATABASE {name}".encode())
    return f"{base}/{name}"


def simulate(out: Path, tag: str, args: argparse.Namespace, devices: int, extra: list[str]) -> Any:
    path = out / f"{tag}-{devices}.json"
    cmd = [
        sys.executable, "-m", "appliance", "hub", "simulate",
        "--devices", str(devices), "--poll-interval", str(args.poll_interval),
        "--duration", str(args.duration), "--telemetry-per-poll", str(args.telemetry_per_poll),
        "--sources", args.sources, "--workers", str(args.workers), "--json", str(path), *extra,
    ]  # fmt: skip
    if args.rollout_at is not None:
        cmd += ["--rollout-at", str(args.rollout_at)]
    print(f"== {tag} {devices} devices, load {os.getloadavg()[0]:.2f}", flush=True)
    subprocess.run(cmd, check=True)
    return orjson.loads(path.read_bytes())


def row(tag: str, r: dict[str, Any]) -> str:
    ph = r["phases"].get("steady") or next(iter(r["phases"].values()))
    t, cpu, ro = r["telemetry"], r["hub_cpu"] or {}, r.get("rollout") or {}
    sim = r["simulator"]
    reached = f"{ro.get('devices_reached', '-')}/{r['config']['devices']}"
    return (
        f"| {tag} | {r['config']['devices']:,} | {ph['poll_rps']} | {ph['poll_p50_ms']} | "
        f"{ph['poll_p99_ms']} | {ph['upload_p99_ms']} | {t['events_per_s']} | "
        f"{t['stored_in_hub']}/{t['events_sent']} | {cpu.get('cores_steady')} | "
        f"{cpu.get('per_1000_devices_per_min')} | {ph['hub_cpu_ms_per_request']} | "
        f"{ph.get('db_cpu_cores') or '-'} | {sim['cores_steady']} | {sim['cpu_us_per_request']} | "
        f"{ro.get('all_s') or reached} | {r['loadavg']['start'][0]:.1f} |"
    )


HEADER = (
    "| hub | devices | polls/s | p50 ms | p99 ms | telemetry p99 ms | events/s stored | "
    "stored/sent | hub cores | hub CPU s per 1k devices per min | hub CPU ms per request | "
    "PostgreSQL cores | simulator cores | simulator CPU µs per request | "
    "100 % rollout s (or reached) | load avg |\n" + "|---" * 16 + "|"
)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--devices", type=int, nargs="+", default=[10000])
    p.add_argument("--poll-interval", type=float, default=60.0)
    p.add_argument("--duration", type=float, default=180.0)
    p.add_argument("--telemetry-per-poll", type=int, default=1)
    p.add_argument("--rollout-at", type=float)
    p.add_argument("--sources", default="127.0.0.1-127.0.0.16")
    p.add_argument("--workers", type=int, default=1, help="simulator processes")
    p.add_argument("--hubs", nargs="+", default=["sqlite", "pg1", "pg2"])
    p.add_argument("--out", default="build/out/hub-bench")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    pg = postgres() if any(h.startswith("pg") for h in args.hubs) else None
    with pg if pg is not None else _nothing() as server:
        for n in args.devices:
            for hub in args.hubs:
                if hub == "sqlite":
                    r = simulate(out, hub, args, n, [])
                elif hub in ("sqlite2", "pg1", "pg2"):
                    replicas = hub[-1]
                    extra = ["--spawn-replicas", replicas]
                    if hub.startswith("pg"):
                        assert server is not None
                        extra += ["--database", new_database(server[0], f"bench_{hub}_{n}")]
                        extra += ["--db-pid", str(postmaster_pid(server[1]))]
                    r = simulate(out, hub, args, n, extra)
                else:
                    sys.exit(f"unknown hub {hub!r}: sqlite, sqlite2, pg1, pg2")
                rows.append(row(hub, r))
                print(HEADER + "\n" + "\n".join(rows), flush=True)
    (out / "table.md").write_text(HEADER + "\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return 0


@contextmanager
def _nothing() -> Iterator[None]:
    yield None


if __name__ == "__main__":
    sys.exit(main())
