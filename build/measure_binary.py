"""Size, cold start to the first inference and idle memory of the built binaries, side by side
with `python -m appliance` from a virtual environment, in one run.

    python build/measure_binary.py [--runs 5] [--python .venv/bin/python]

Cold start: from spawning `serve --model <bundled sample> --port 0` to the first HTTP 200 of an
inference (the port is read from the server's log). Idle RSS: the whole process tree (a one-file
binary is a bootloader plus the real process) once the first answer came. Median of --runs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "appliance" / "data" / "sample.onnx"
BODY = json.dumps(
    {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [5, 3, 1, 0]}]}
).encode()


def tree_rss_mib(pid: int) -> float:
    """RSS of a process and its children, from /proc."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except (OSError, AttributeError):
            continue
        todo += [int(c) for c in children]
    return total / 1024


def size_mib(path: Path) -> float:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20
    return path.stat().st_size / 2**20


def one_start(cmd: list[str]) -> tuple[float, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [*cmd, "serve", "--model", str(SAMPLE), "--port", "0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        port = None
        for line in proc.stderr:
            m = re.search(r'"port":(\d+)', line)
            if m:
                port = int(m.group(1))
                break
        if port is None:
            raise RuntimeError(f"{cmd}: exited before listening")
        url = f"http://127.0.0.1:{port}/v2/models/sample/infer"
        while True:
            try:
                req = urllib.request.Request(url, data=BODY, method="POST")
                with urllib.request.urlopen(req, timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            if time.perf_counter() - t0 > 120:
                raise RuntimeError(f"{cmd}: no answer in 120 s")
            time.sleep(0.005)
        elapsed = time.perf_counter() - t0
        time.sleep(0.5)
        return elapsed, tree_rss_mib(proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--python", default=str(ROOT / ".venv" / "bin" / "python"))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    variants: list[tuple[str, list[str], float | None]] = []
    onedir, onefile = ROOT / "dist" / "appliance", ROOT / "dist" / "appliance-onefile"
    if onedir.is_dir():
        variants.append(("one-folder", [str(onedir / "appliance")], size_mib(onedir)))
    if onefile.is_file():
        variants.append(("one-file", [str(onefile)], size_mib(onefile)))
    variants.append(("python -m appliance", [args.python, "-m", "appliance"], None))
    rows: list[dict[str, Any]] = []
    for label, cmd, size in variants:
        starts, rss = [], []
        for _ in range(args.runs):
            s, r = one_start(cmd)
            starts.append(s)
            rss.append(r)
        rows.append({
            "variant": label,
            "size_mib": None if size is None else round(size, 1),
            "cold_start_median_s": round(statistics.median(starts), 3),
            "cold_start_min_s": round(min(starts), 3),
            "cold_start_max_s": round(max(starts), 3),
            "idle_rss_median_mib": round(statistics.median(rss), 1),
        })  # fmt: skip
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    head = "cold start s (median, min-max)"
    print(f"{'variant':<22}{'size MiB':>10}{head:>34}{'idle RSS MiB':>14}")
    for row in rows:
        shown = "-" if row["size_mib"] is None else f"{row['size_mib']:.1f}"
        start = (
            f"{row['cold_start_median_s']:.3f} "
            f"({row['cold_start_min_s']:.3f}-{row['cold_start_max_s']:.3f})"
        )
        print(f"{row['variant']:<22}{shown:>10}{start:>34}{row['idle_rss_median_mib']:>14.1f}")
    print(f"{args.runs} runs each on {os.cpu_count()} CPUs; python {sys.version.split()[0]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
