"""Measure the download plane side by side in one run: the same model file fetched from the
hub's own /tuf/targets/ (aiohttp, a device token checked per request) and from nginx serving
the hub's static mirror directory with packaging/nginx/mirror.conf, over loopback.

    python build/measure_download_plane.py [--size-mb 64] [--clients 4] [--rounds 3]

Prints MB/s and the server's CPU seconds per GB served (hub process vs nginx master + worker,
from /proc), plus the client's. Loopback on a shared machine: read ratios, not absolutes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import urllib3

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from appliance.hub.service import Hub, HubConfig, init_hub  # noqa: E402
from appliance.hub.static import export_static  # noqa: E402
from tests.support.nginx_static import Nginx, world_readable_dir  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / TICK


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def fetch(url: str, headers: dict[str, str], clients: int, rounds: int, size: int) -> float:
    """Seconds for `clients` threads to fetch the whole file `rounds` times each."""
    pool = urllib3.PoolManager(maxsize=clients, headers=headers, retries=False)
    errors: list[str] = []

    def one() -> None:
        for _ in range(rounds):
            r = pool.request("GET", url, preload_content=False)
            got = sum(len(c) for c in r.stream(1 << 20))
            r.release_conn()
            if r.status != 200 or got != size:
                errors.append(f"HTTP {r.status}, {got} bytes")

    threads = [threading.Thread(target=one) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(errors[0])
    return time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=int, default=64)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="download-plane-"))
    static = world_readable_dir("download-plane-mirror-")
    config = HubConfig(data_dir=tmp / "data")
    init_hub(config, tmp / "root-key")
    hub = Hub(config)
    model = tmp / "model.onnx"
    size = args.size_mb << 20
    with model.open("wb") as f:
        f.write(os.urandom(size))
    target, _ = hub.publish("big", "1", model, backend="onnx", manifest={})
    token = hub.enroll("bench")
    export_static(hub.store, hub.artifacts, static)
    hub.close()
    key = f"big/1/{target.sha256}.model.onnx"

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance", "hub", "serve", "--data", str(config.data_dir),
         "--port", "0", "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
    )  # fmt: skip
    assert proc.stdout is not None
    m = re.search(r":(\d+)$", proc.stdout.readline().strip())
    assert m is not None
    hub_url = f"http://127.0.0.1:{m.group(1)}/tuf/targets/{key}"
    nginx = Nginx(tmp / "nginx", [static])
    nginx.start()
    assert nginx.proc is not None
    nginx_pids = [nginx.proc.pid, *children(nginx.proc.pid)]
    nginx_url = f"{nginx.url(0)}/targets/{key}"
    served = size * args.clients * args.rounds
    rows = []
    try:
        for name, url, headers, pids in (
            ("hub /tuf/targets (aiohttp)", hub_url, {"Authorization": f"Bearer {token}"},
             [proc.pid]),
            ("nginx static mirror", nginx_url, {}, nginx_pids),
        ):  # fmt: skip
            fetch(url, headers, 1, 1, size)  # warm the page cache and the connection
            cpu0, client0 = cpu_seconds(pids), time.process_time()
            wall = fetch(url, headers, args.clients, args.rounds, size)
            cpu = cpu_seconds(pids) - cpu0
            client = time.process_time() - client0
            rows.append(
                {
                    "server": name,
                    "mb_per_s": round(served / wall / 1e6, 1),
                    "server_cpu_s_per_gb": round(cpu / (served / 1e9), 3),
                    "client_cpu_s_per_gb": round(client / (served / 1e9), 3),
                    "seconds": round(wall, 2),
                }
            )
    finally:
        nginx.stop()
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(static, ignore_errors=True)
    print(json.dumps({"size_mb": args.size_mb, "clients": args.clients, "rounds": args.rounds,
                      "cores": os.cpu_count(), "results": rows}, indent=1))  # fmt: skip
    hub_row, nginx_row = rows
    line = f"nginx / hub: {nginx_row['mb_per_s'] / hub_row['mb_per_s']:.1f}x the throughput"
    if nginx_row["server_cpu_s_per_gb"] * served / 1e9 >= 5 / TICK:  # enough clock ticks
        ratio = hub_row["server_cpu_s_per_gb"] / nginx_row["server_cpu_s_per_gb"]
        line += f", {ratio:.1f}x less server CPU per GB"
    else:
        line += "; too little served to compare CPU (raise --size-mb or --rounds)"
    print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
