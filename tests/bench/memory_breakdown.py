"""Where the idle memory of an ONNX-only device goes (issue 22), reproducibly.

    PYTHONPATH=. .venv/bin/python tests/bench/memory_breakdown.py
        [--model build/samples/sample.onnx] [--also-model M ...] [--baseline /work/start]
        [--startup 20] [--top 25] [--json]

RSS does not depend on the machine's load, so the memory parts need no bench lock (`--startup`
times starts: run it under `flock /work/bench.lock`). Every process runs from compiled bytecode,
as an installed device does (a pycache outside the trees, PYTHONPYCACHEPREFIX, filled by a
warm-up start), not from sources compiled at each start (which leaves ~2-5 MiB more heap).

1. serve: `appliance serve --model M` of the tree (its cwd, so that its package is imported),
   one KServe v2 request, then VmRSS, RssAnon/RssFile, smaps_rollup Private_Dirty, threads, RSS
   per mapping (heap, anonymous mmaps, each shared library); the floor server of
   tests/bench/floors.py (python, uvloop, numpy, onnxruntime, the same session) beside it; with
   `--baseline`, the other checkout's serve too; `--also-model`: serve's RSS with other models.
2. components: a fresh interpreter (tests/bench/memory_walk.py) imports numpy + onnxruntime,
   uvloop + asyncio, aiohttp and prometheus_client (each if serve imported it), then the
   modules serve imported, in its order, with a meter on the import system: the RSS each stage
   adds, and each module's own RSS and anonymous-memory delta (its nested imports excluded),
   summed per top-level package. Then the ONNX session the floor makes. serve's RSS minus all
   that is what running costs (the loop, threads, the engine's objects, the first request).
   Then the first request the fast path hands over (GET /v2): its round trip, the next one's,
   the RSS after.
3. `--startup N`: N starts of each tree, alternated, each timed from exec to the first 200 of
   an infer request, with the CPU time the server had used by then; medians.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.bench.floors import request_body  # noqa: E402

_IMPORTTIME = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)\s*$")


# -- part 1: the real server ----------------------------------------------------------------------
def _status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "Threads"):
            out[key] = int(rest.split()[0])
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("Private_Dirty", "Anonymous"):
            out[key] = int(rest.split()[0])
    return out


def _mappings(pid: int) -> dict[str, int]:
    """RSS (KiB) per mapping name: [heap], [anon] (all unnamed), [stack], each library's file."""
    rss: dict[str, int] = {}
    name = ""
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if head and re.fullmatch(r"[0-9a-f]+-[0-9a-f]+", head[0]):
            name = head[5] if len(head) > 5 else "[anon]"
            if "site-packages/" in name:
                name = name.split("site-packages/", 1)[1]
            name = name if name.startswith("[") else name.rsplit("/", 1)[-1]
        elif head and head[0] == "Rss:":
            rss[name] = rss.get(name, 0) + int(head[1])
    return rss


def _wait(port: int, proc: subprocess.Popen[bytes], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"not ready within {timeout_s:g} s")


#: Compiled bytecode for every tree and the venv, outside them (the prefix mirrors source paths).
PYCACHE = Path(tempfile.gettempdir()) / "appliance-bench-pycache"


def _env(tree: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(PYCACHE)
    env["PYTHONPATH"] = str(tree)
    return env


def measure_serve(
    model: str, tree: Path = ROOT, env_extra: dict[str, str] | None = None
) -> dict[str, Any]:
    """`appliance serve` of the checkout `tree` (its cwd, so that tree's package is imported)."""
    from appliance.bench.client import free_port

    port = free_port()
    env = _env(tree)
    env.update(env_extra or {})
    with tempfile.TemporaryFile() as err:
        cmd = [sys.executable, "-X", "importtime", "-m", "appliance", "serve", "--model", model]
        cmd += ["--name", "sample", "--port", str(port), "--log-level", "warning"]
        proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=err)
        try:
            _wait(port, proc)
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}/v2/models/sample/infer",
                data=request_body(model),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(req, timeout=10) as r:
                assert r.status == 200, r.status
            time.sleep(0.5)  # let the answer's buffers go back
            status, maps = _status(proc.pid), _mappings(proc.pid)
            idle_end = os.fstat(err.fileno()).st_size  # the imports at idle end here
            scrape = _first_twice(port, proc.pid, "/metrics")
            handover = _first_twice(port, proc.pid, "/v2")
        finally:
            proc.terminate()
            proc.wait(20)
        err.seek(0)
        lines = err.read(idle_end).decode(errors="replace").splitlines()
    # importtime prints each module when it finishes, children first: the outermost ones, in
    # that order, are the imports serve made; importing them again imports the rest as it did
    done = [(len(m[3]), m[4]) for m in map(_IMPORTTIME.match, lines) if m]
    outer = min(depth for depth, _ in done)
    order = [name for depth, name in done if depth == outer]
    everything = sorted({name for _, name in done})
    return {
        "status": status, "mappings": maps, "modules": order, "all_modules": everything,
        "scrape": scrape, "handover": handover,
    }  # fmt: skip


def _first_twice(port: int, pid: int, path: str) -> dict[str, float]:
    """What the first GET of `path` costs: its round trip and the next one's (ms), and the RSS
    after it (MiB). /metrics: prometheus_client's import, once; /v2, the first request the fast
    path hands over: aiohttp's import and the app's build, once."""
    out: dict[str, float] = {}
    for key in ("first_ms", "second_ms"):
        t0 = time.perf_counter()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            assert r.status == 200, r.status
        out[key] = round((time.perf_counter() - t0) * 1e3, 1)
    time.sleep(0.5)
    out["rss_after_mib"] = round(_status(pid)["VmRSS"] / 1024, 1)
    return out


def measure_floor(model: str) -> dict[str, int]:
    """The floor server of tests/bench/floors.py after one request: what no Python server of
    this model can go below."""
    from appliance.bench.client import free_port

    port = free_port()
    cmd = [sys.executable, str(Path(__file__).with_name("floors.py")), "--serve-floor"]
    proc = subprocess.Popen([*cmd, str(port), model], cwd=ROOT, env=_env(ROOT))
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the floor server did not start") from None
                time.sleep(0.05)
        req = urllib.request.Request(f"http://127.0.0.1:{port}/", data=request_body(model))
        with urllib.request.urlopen(req, timeout=10):
            pass
        time.sleep(0.5)
        return _status(proc.pid)
    finally:
        proc.terminate()
        proc.wait(20)


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def time_start(model: str, tree: Path) -> tuple[float, float]:
    """(seconds from exec to the first 200 of an infer request, the server's CPU seconds by
    then); the requests go out every 2 ms on fresh connections."""
    import socket

    from appliance.bench.client import free_port

    port = free_port()
    body = request_body(model)
    req = (
        b"POST /v2/models/sample/infer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    ) + body
    cmd = [sys.executable, "-m", "appliance", "serve", "--model", model, "--name", "sample"]
    cmd += ["--port", str(port), "--log-level", "error"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=tree, env=_env(tree), stdout=subprocess.DEVNULL)
    try:
        while time.perf_counter() - t0 < 60:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                    s.sendall(req)
                    head = s.recv(12)
                if head == b"HTTP/1.1 200":
                    return time.perf_counter() - t0, _cpu_s(proc.pid)
            except OSError:
                pass
            time.sleep(0.002)
        raise RuntimeError("no answer within 60 s")
    finally:
        proc.terminate()
        proc.wait(20)


# -- report ---------------------------------------------------------------------------------------
def _group(name: str) -> str:
    top = name.split(".", 1)[0].lstrip("_")
    if name.split(".", 1)[0] in sys.stdlib_module_names or top in sys.stdlib_module_names:
        return "stdlib"
    return top


#: The walk's first stages, then the modules serve imported (tests/bench/memory_walk.py).
_STAGES = [
    "numpy", "onnxruntime", "@numpy + onnxruntime",
    "uvloop", "asyncio", "@uvloop + asyncio (+ ssl)",
    "aiohttp.web", "@aiohttp (+ email, http, the client's SSL contexts)",
    "prometheus_client", "@prometheus_client",
]  # fmt: skip


def breakdown(model: str, tree: Path, served: dict[str, Any], top: int) -> dict[str, Any]:
    walk = _STAGES
    tops = {m.split(".", 1)[0] for m in served["all_modules"]}
    if "aiohttp" not in tops:
        walk = [s for s in walk if "aiohttp" not in s]  # the fast path alone (api/app.py)
    if "prometheus_client" not in tops:
        walk = [s for s in walk if "prometheus_client" not in s]  # imported by a scrape
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join([*walk, *served["modules"], "@the appliance's modules"]))
    try:
        out = subprocess.run(
            [sys.executable, str(Path(__file__).with_name("memory_walk.py")), f.name, model],
            cwd=tree,
            env=_env(tree),
            capture_output=True,
            text=True,
            check=True,
        )
    finally:
        os.unlink(f.name)
    walked = json.loads(out.stdout.strip().splitlines()[-1])
    groups: dict[str, list[float]] = {}
    for name, (rss, anon, secs) in walked["modules"].items():
        g = groups.setdefault(_group(name), [0.0, 0.0, 0.0, 0])
        g[0] += rss
        g[1] += anon
        g[2] += secs
        g[3] += 1
    start, session = walked["start"], walked["after_session"]
    stages = [("python (interpreter)", start[0])]
    prev = start[0]
    for name, (rss, _anon), _count in walked["stages"]:
        stages.append((name, rss - prev))
        prev = rss
    stages.append(("the ONNX session (onnxruntime's first)", session[0] - prev))
    stages.append(
        ("running: loop, threads, engine, 1st request", served["status"]["VmRSS"] - session[0])
    )
    return {
        "components_mib": {k: round(v / 1024, 1) for k, v in stages},
        "packages": {
            k: {
                "rss_mib": round(v[0] / 1024, 2),
                "anon_mib": round(v[1] / 1024, 2),
                "import_ms": round(v[2] * 1e3, 1),
                "modules": v[3],
            }
            for k, v in sorted(groups.items(), key=lambda kv: -kv[1][0])
        },
        "top_modules": sorted(walked["modules"].items(), key=lambda kv: -kv[1][0])[:top],
        "failed_imports": walked["failed"],
    }


def _mib(status: dict[str, int]) -> dict[str, float]:
    return {k: round(v / 1024, 1) if k != "Threads" else v for k, v in status.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "build" / "samples" / "sample.onnx"))
    ap.add_argument("--also-model", action="append", default=[], help="serve's RSS with these too")
    ap.add_argument("--tree", type=Path, default=ROOT, help="the checkout to measure")
    ap.add_argument("--baseline", type=Path, help="another checkout, measured side by side")
    ap.add_argument("--startup", type=int, default=0, metavar="N", help="N timed starts per tree")
    ap.add_argument("--top", type=int, default=25, help="rows of the per-module table")
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = ap.parse_args(argv)
    model = str(Path(args.model).resolve())
    trees = [args.tree.resolve(), *([args.baseline.resolve()] if args.baseline else [])]
    for tree in trees:  # fills the pycache: the measured starts run from bytecode
        measure_serve(model, tree)
    result: dict[str, Any] = {"floor": _mib(measure_floor(model)), "serve": {}}
    served = {}
    for tree in trees:
        served[tree] = measure_serve(model, tree)
        result.setdefault("handover", {})[str(tree)] = served[tree]["handover"]
        result.setdefault("scrape", {})[str(tree)] = served[tree]["scrape"]
        result["serve"][str(tree)] = {
            Path(model).name: _mib(served[tree]["status"]),
            **{
                Path(m).name: _mib(measure_serve(str(Path(m).resolve()), tree)["status"])
                for m in args.also_model
            },
        }
    main_tree = trees[0]
    result.update(breakdown(model, main_tree, served[main_tree], args.top))
    result["mappings_mib"] = {
        k: round(v / 1024, 1)
        for k, v in sorted(served[main_tree]["mappings"].items(), key=lambda kv: -kv[1])
        if v >= 256
    }
    if args.startup:
        times: dict[str, list[tuple[float, float]]] = {str(t): [] for t in trees}
        for i in range(args.startup):
            for tree in trees if i % 2 == 0 else trees[::-1]:
                times[str(tree)].append(time_start(model, tree))
        result["startup"] = {
            t: {
                "median_s": round(statistics.median(w for w, _ in v), 3),
                "median_cpu_s": round(statistics.median(c for _, c in v), 3),
                "starts": len(v),
            }
            for t, v in times.items()
        }
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    _print(result)
    return 0


def _print(result: dict[str, Any]) -> None:
    f = result["floor"]
    print(f"floor server (python, uvloop, numpy, onnxruntime, the session): VmRSS {f['VmRSS']} MiB")
    for tree, models in result["serve"].items():
        for name, s in models.items():
            print(
                f"appliance serve {name} ({tree}), idle after one request: VmRSS {s['VmRSS']} MiB "
                f"(anon {s['RssAnon']}, file {s['RssFile']}, private dirty "
                f"{s['Private_Dirty']}, peak {s['VmHWM']}), {s['Threads']} threads"
            )
    for tree, h in result["scrape"].items():
        print(
            f"first scrape (GET /metrics), {tree}: {h['first_ms']} ms (the next one "
            f"{h['second_ms']} ms); VmRSS after it {h['rss_after_mib']} MiB"
        )
    for tree, h in result["handover"].items():
        print(
            f"first request handed over (GET /v2), {tree}: {h['first_ms']} ms (the next one "
            f"{h['second_ms']} ms); VmRSS after it {h['rss_after_mib']} MiB"
        )
    print("\nwhat the first tree's serve holds, component by component (MiB):")
    for k, v in result["components_mib"].items():
        print(f"  {v:>6.1f}  {k}")
    head = f"{'RSS MiB':>9}{'anon MiB':>10}{'import ms':>11}{'modules':>9}"
    print(f"\n{'package (own modules)':<22}{head}")
    for k, v in result["packages"].items():
        print(
            f"{k:<22}{v['rss_mib']:>9.2f}{v['anon_mib']:>10.2f}{v['import_ms']:>11.1f}{v['modules']:>9}"
        )
    print(f"\n{'module (own, children excluded)':<48}{'RSS KiB':>9}{'anon KiB':>10}{'ms':>8}")
    for name, (rss, anon, secs) in result["top_modules"]:
        print(f"{name:<48}{rss:>9.0f}{anon:>10.0f}{secs * 1e3:>8.1f}")
    print("\nserve's RSS per mapping (MiB, >= 0.25):")
    for k, v in result["mappings_mib"].items():
        print(f"  {v:>6.1f}  {k}")
    for tree, st in result.get("startup", {}).items():
        print(
            f"\nstart to first inference, {tree}: median {st['median_s']} s, the server's CPU "
            f"{st['median_cpu_s']} s ({st['starts']} starts, alternated)"
        )


if __name__ == "__main__":
    raise SystemExit(main())
