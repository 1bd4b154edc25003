"""Hugging Face folder -> GGUF (llama.cpp's converter) -> quantized -> validated.

Embedding models are checked against the FP32 PyTorch reference (cosine, like the ONNX
build); causal LMs by how often the quantized model's next token equals the F16 model's
(top-1 agreement over every position of the validation sentences). Latency: one forward pass
per sentence, F16 and quantized interleaved in one run.
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from .gguf import (
    Converter,
    ToolMissing,
    converter_dir,
    is_valid_gguf,
    llama_cpp_module,
    llama_cpp_version,
    quantize,
)
from .onnx_build import cosines, reference
from .pipeline import BuildError, BuildOptions, Built, converter_python
from .progress import items, say, step

CONVERT_MODULES = ["torch", "transformers", "sentencepiece", "numpy", "safetensors"]
N_CTX = 512


def _quiet() -> None:
    """llama.cpp's log (a line per tensor when quantizing) goes to Python logging, unshown."""
    from ..backends.gguf import _llama as route_llama_logs

    try:
        route_llama_logs()
    except Exception as exc:  # ModelError: llama_cpp missing, reported by llama_cpp_module()
        raise BuildError(str(exc)) from None


def _llama(path: Path, **kwargs: Any) -> Any:
    llama_cpp = llama_cpp_module()
    logging.getLogger("llama-cpp-python").setLevel(logging.WARNING)
    return llama_cpp.Llama(str(path), n_ctx=N_CTX, verbose=False, **kwargs)


def gguf_embed(path: Path, sentences: list[str]) -> np.ndarray[Any, Any]:
    llm = _llama(path, embedding=True)
    try:
        vectors = np.asarray(
            [llm.embed(s) for s in items(sentences, f"{path.name} vectors", len(sentences))],
            dtype=np.float64,
        )
    finally:
        llm.close()
    normalized: np.ndarray[Any, Any] = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return normalized


def next_tokens(path: Path, sentences: list[str]) -> list[np.ndarray[Any, Any]]:
    """The greedy next token after every position of each sentence."""
    llm = _llama(path, logits_all=True)
    try:
        out = []
        for s in items(sentences, f"{path.name} next tokens", len(sentences)):
            tokens = llm.tokenize(s.encode("utf-8"), add_bos=True)[: N_CTX - 1]
            llm.reset()
            llm.eval(tokens)
            out.append(np.asarray(llm.scores[: len(tokens)]).argmax(axis=1))
    finally:
        llm.close()
    return out


def latency(paths: dict[str, Path], sentences: list[str], embedding: bool) -> dict[str, Any]:
    """Milliseconds per sentence (one forward pass), the two models interleaved in one run."""
    names = list(paths)
    models = {n: _llama(p, embedding=embedding) for n, p in paths.items()}
    times: dict[str, list[float]] = {n: [] for n in names}
    try:
        tokens = [models[names[0]].tokenize(s.encode("utf-8"), add_bos=True) for s in sentences]
        for k, toks in enumerate(items(tokens, "timing, interleaved", len(tokens))):
            for n in names if k % 2 == 0 else reversed(names):
                llm = models[n]
                t0 = time.perf_counter()
                if embedding:
                    llm.embed(sentences[k])
                else:
                    llm.reset()
                    llm.eval(toks)
                times[n].append(time.perf_counter() - t0)
    finally:
        for llm in models.values():
            llm.close()
    result: dict[str, Any] = {"runs_each": len(sentences)}
    for n in names:
        result[f"{n}_ms_median"] = statistics.median(times[n]) * 1000
        result[f"{n}_ms_total"] = sum(times[n]) * 1000
    result["speedup"] = sum(times[names[0]]) / sum(times[names[1]])
    return result


def build_gguf(
    opts: BuildOptions, task: str, quant: str, sentences: list[str], work: Path
) -> Built:
    python = converter_python(opts.python, CONVERT_MODULES, "the GGUF conversion")
    try:
        llama_cpp_module()
        _quiet()
        if opts.llama_cpp is not None:
            tools = opts.llama_cpp
            if not (tools / "convert_hf_to_gguf.py").is_file() or not (tools / "gguf-py").is_dir():
                raise BuildError(f"{tools}: no convert_hf_to_gguf.py with gguf-py/ beside it")
        else:
            tools = converter_dir(opts.cache, llama_cpp_version(), say)
    except ToolMissing as exc:
        raise BuildError(str(exc)) from None
    converter = Converter(tools, python)
    name = opts.name or opts.model_dir.resolve().name
    f16 = work / "model-f16.gguf"
    with step(f"converting {opts.model_dir.name} to GGUF (llama.cpp's convert_hf_to_gguf.py)"):
        try:
            converter.convert(opts.model_dir, f16, "f16", name)
        except RuntimeError as exc:
            raise BuildError(str(exc)) from None
    model = f16
    if quant != "f16":
        model = work / f"model-{quant}.gguf"
        with step(f"quantizing to {quant} (llama_model_quantize)"):
            try:
                quantize(f16, model, quant)
            except RuntimeError as exc:
                raise BuildError(str(exc)) from None
    if not is_valid_gguf(model):
        raise BuildError(f"{model}: the converter wrote no valid GGUF file")
    report: dict[str, Any] = {"sentences": len(sentences)}
    embedding = task == "embedding"
    if embedding:
        report.update(_validate_embedding(opts, python, f16, model, quant, sentences, work))
    else:
        report.update(_validate_causal(opts, f16, model, quant, sentences))
    if quant != "f16":
        with step(f"latency F16 vs {quant} over {len(sentences)} sentences, interleaved"):
            report["latency"] = latency({"f16": f16, quant: model}, sentences, embedding)
        lat = report["latency"]
        say(
            f"latency per sentence: F16 {lat['f16_ms_median']:.2f} ms, {quant} "
            f"{lat[f'{quant}_ms_median']:.2f} ms (median; speed-up {lat['speedup']:.2f}x)"
        )
    report["size"] = {"f16_bytes": f16.stat().st_size, f"{quant}_bytes": model.stat().st_size}
    say(report["verdict"])
    return Built(model=model, report=report)


def _validate_embedding(
    opts: BuildOptions,
    python: str,
    f16: Path,
    model: Path,
    quant: str,
    sentences: list[str],
    work: Path,
) -> dict[str, Any]:
    from ..preprocess.text import TextSpec

    # The reference needs only pooling, normalization and length from a spec.
    spec = TextSpec(
        tokenizer="tokenizer.json",
        max_length=opts.max_length or N_CTX,
        padding="longest",
        truncation=True,
        inputs={"input_ids": "input_ids"},
        output="last_hidden_state",
        pooling="cls" if opts.pooling == "cls" else "mean",
        normalize=True,
    )
    ref, library = reference(python, spec, opts, sentences, work)
    report: dict[str, Any] = {
        "reference": f"{library}, FP32 PyTorch",
        "min_cosine": opts.min_cosine,
    }
    served = report["f16_vs_reference"] = cosines(gguf_embed(f16, sentences), ref)
    if model != f16:
        served = report[f"{quant}_vs_reference"] = cosines(gguf_embed(model, sentences), ref)
    report["passed"] = served["mean"] >= opts.min_cosine
    report["verdict"] = (
        f"{quant}: mean cosine {served['mean']:.4f} (min {served['min']:.4f}) against the "
        f"reference, {'at least' if report['passed'] else 'below'} {opts.min_cosine}"
    )
    return report


def _validate_causal(
    opts: BuildOptions, f16: Path, model: Path, quant: str, sentences: list[str]
) -> dict[str, Any]:
    if model == f16:
        return {"passed": True, "verdict": "f16: nothing quantized, nothing to compare"}
    want = next_tokens(f16, sentences)
    got = next_tokens(model, sentences)
    same = sum(int((a == b).sum()) for a, b in zip(want, got, strict=True))
    total = sum(len(a) for a in want)
    agreement = same / max(total, 1)
    passed = agreement >= opts.min_agreement
    return {
        "next_token_agreement": {"share": agreement, "positions": total},
        "min_agreement": opts.min_agreement,
        "passed": passed,
        "verdict": (
            f"{quant}: the next token equals F16's at {agreement:.1%} of {total} positions, "
            f"{'at least' if passed else 'below'} {opts.min_agreement:.0%}"
        ),
    }
