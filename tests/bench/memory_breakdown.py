"""Where the idle memory of an ONNX-only device goes (issue 22), reproducibly.

    PYTHONPATH=. .venv/bin/python tests/bench/memory_breakdown.py
        [--model build/samples/sample.onnx] [--top 25] [--json]

RSS does not depend on the machine's load, so this needs no bench lock. Three parts:

1. serve: `appliance serve --model M` (this tree's), one KServe v2 request, then its VmRSS,
   RssAnon/RssFile, smaps_rollup Private_Dirty, threads, and RSS per mapping (heap, anonymous
   mmaps, each shared library). `-X importtime` gives the modules it imported by then.
2. imports: a fresh interpreter imports those same modules in the same order with a meter on the
   import system: each module's own RSS and anonymous-memory delta (its children's excluded),
   summed per top-level package. Then the ONNX session the floor server makes, on its own.
3. the rest: serve's RSS minus (interpreter + imports + session) is what running costs: the
   loop, threads, buffers, the engine's objects, the first request.

Part 2's child process is tests/bench/memory_walk.py.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

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


def _request_body(model: str) -> bytes:
    import onnxruntime as ort

    spec = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).get_inputs()[0]
    shape = [d if isinstance(d, int) and d > 0 else 1 for d in spec.shape]
    n = 1
    for d in shape:
        n *= d
    tensor = {"name": spec.name, "shape": shape, "datatype": "FP32", "data": [0.5] * n}
    return json.dumps({"inputs": [tensor]}).encode()


def _env(tree: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
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
                data=_request_body(model),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(req, timeout=10) as r:
                assert r.status == 200, r.status
            time.sleep(0.5)  # let the answer's buffers go back
            status, maps = _status(proc.pid), _mappings(proc.pid)
        finally:
            proc.terminate()
            proc.wait(20)
        err.seek(0)
        lines = err.read().decode(errors="replace").splitlines()
    # importtime prints each module when it finishes, children first: the outermost ones, in
    # that order, are the imports serve made; importing them again imports the rest as it did
    done = [(len(m[3]), m[4]) for m in map(_IMPORTTIME.match, lines) if m]
    outer = min(depth for depth, _ in done)
    order = [name for depth, name in done if depth == outer]
    return {"status": status, "mappings": maps, "modules": order}


# -- report ---------------------------------------------------------------------------------------
def _group(name: str) -> str:
    top = name.split(".", 1)[0].lstrip("_")
    if name.split(".", 1)[0] in sys.stdlib_module_names or top in sys.stdlib_module_names:
        return "stdlib"
    return top


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "build" / "samples" / "sample.onnx"))
    ap.add_argument("--top", type=int, default=25, help="rows of the per-module table")
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    ap.add_argument(
        "--tree", type=Path, default=ROOT, help="the checkout whose appliance to measure"
    )
    args = ap.parse_args(argv)
    model = str(Path(args.model).resolve())
    tree = args.tree.resolve()
    served = measure_serve(model, tree)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(served["modules"]))
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
    st = served["status"]
    start, imports, session = walked["start"], walked["after_imports"], walked["after_session"]
    result = {
        "serve": {k: round(v / 1024, 1) if k != "Threads" else v for k, v in st.items()},
        "interpreter_mib": round(start[0] / 1024, 1),
        "imports_mib": round((imports[0] - start[0]) / 1024, 1),
        "session_mib": round((session[0] - imports[0]) / 1024, 1),
        "running_mib": round((st["VmRSS"] - session[0]) / 1024, 1),
        "groups": {
            k: {
                "rss_mib": round(v[0] / 1024, 2),
                "anon_mib": round(v[1] / 1024, 2),
                "import_ms": round(v[2] * 1e3, 1),
                "modules": v[3],
            }
            for k, v in sorted(groups.items(), key=lambda kv: -kv[1][0])
        },
        "top_modules": sorted(walked["modules"].items(), key=lambda kv: -kv[1][0])[: args.top],
        "mappings_mib": {
            k: round(v / 1024, 1)
            for k, v in sorted(served["mappings"].items(), key=lambda kv: -kv[1])
            if v >= 256
        },
        "failed_imports": walked["failed"],
    }
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    s = result["serve"]
    print(
        f"appliance serve, idle after one request: VmRSS {s['VmRSS']} MiB (anon {s['RssAnon']}, "
        f"file {s['RssFile']}, private dirty {s['Private_Dirty']}), {s['Threads']} threads"
    )
    print(
        f"  = interpreter {result['interpreter_mib']} + imports {result['imports_mib']} "
        f"+ ONNX session {result['session_mib']} + running {result['running_mib']} MiB"
    )
    print(f"\n{'package':<22}{'RSS MiB':>9}{'anon MiB':>10}{'import ms':>11}{'modules':>9}")
    for k, v in result["groups"].items():
        print(
            f"{k:<22}{v['rss_mib']:>9.2f}{v['anon_mib']:>10.2f}{v['import_ms']:>11.1f}{v['modules']:>9}"
        )
    print(f"\n{'module (own, children excluded)':<48}{'RSS KiB':>9}{'anon KiB':>10}{'ms':>8}")
    for name, (rss, anon, secs) in result["top_modules"]:
        print(f"{name:<48}{rss:>9.0f}{anon:>10.0f}{secs * 1e3:>8.1f}")
    print("\nserve's RSS per mapping (MiB, >= 0.25):")
    for k, v in result["mappings_mib"].items():
        print(f"  {v:>6.1f}  {k}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
