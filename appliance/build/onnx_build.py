"""Hugging Face encoder -> ONNX (optimum) -> INT8 (onnxruntime) -> validated against FP32.

The export and the PyTorch reference run in the converter Python; quantization and validation
run here, on onnxruntime with appliance's own text processing (preprocess/text.py), so the
report measures exactly what the server will run.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..preprocess.text import ROLES, TextEncoder, TextSpec, pool
from .pipeline import BuildError, BuildOptions, Built, converter_python
from .progress import items, run_tool, say, step

EXPORT_MODULES = ["optimum.exporters.onnx", "torch", "transformers"]
REFERENCE_SCRIPT = Path(__file__).with_name("hf_reference.py")
#: Interleaved passes over the sentences for the latency comparison (after one warm-up pass).
TIMING_PASSES = 3


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise BuildError(f"onnxruntime is missing ({exc}): pip install 'appliance[onnx]'") from None
    return onnxruntime


def _quantization() -> Any:
    # Its advice to pre-process first goes to the root logger at warning level; shape
    # inference is run by the quantizer anyway, so the line is noise in a build log.
    logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))
    try:
        from onnxruntime import quantization
    except ImportError as exc:
        raise BuildError(
            f"onnxruntime.quantization needs the onnx package ({exc}): "
            "pip install 'appliance[build]'"
        ) from None
    return quantization


def tool_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    env.pop("PYTHONPATH", None)  # the converter venv must not see this venv's packages
    return env


def export(python: str, model_dir: Path, out: Path) -> Path:
    """optimum's exporter, raw encoder outputs (last_hidden_state): pooling is ours."""
    cmd = [python, "-m", "optimum.commands.optimum_cli", "export", "onnx", "--model"]
    cmd += [str(model_dir), "--task", "feature-extraction", "--library-name", "transformers"]
    cmd.append(str(out))
    run_tool(cmd, f"exporting {model_dir.name} to ONNX (optimum)", tool_env())
    model = out / "model.onnx"
    if not model.is_file():
        raise BuildError(f"the exporter wrote no model.onnx into {out}")
    return model


def _json_file(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def text_spec(opts: BuildOptions, session: Any, tokenizer: str) -> TextSpec:
    """The manifest's text processing: options first, then what the model folder says
    (sentence-transformers' max_seq_length, pooling and Normalize module)."""
    d = opts.model_dir
    max_length = opts.max_length
    if max_length is None:
        st = _json_file(d / "sentence_bert_config.json").get("max_seq_length")
        tc = _json_file(d / "tokenizer_config.json").get("model_max_length")
        cfg = _json_file(d / "config.json").get("max_position_embeddings")
        for value in (st, tc, cfg):
            if isinstance(value, int) and 2 <= value <= 100_000:
                max_length = value
                break
        else:
            max_length = 512
    pooling = opts.pooling
    if pooling is None:
        pool_cfg = _json_file(d / "1_Pooling" / "config.json")
        pooling = "cls" if pool_cfg.get("pooling_mode_cls_token") else "mean"
    inputs = {i.name: i.name for i in session.get_inputs()}
    unknown = sorted(set(inputs) - set(ROLES))
    if unknown:
        raise BuildError(f"the exported model has inputs {unknown} that text cannot fill")
    outputs = [o.name for o in session.get_outputs()]
    if "last_hidden_state" not in outputs:
        raise BuildError(f"the exported model has no last_hidden_state output ({outputs})")
    return TextSpec(
        tokenizer=tokenizer,
        max_length=max_length,
        padding="longest",
        truncation=True,
        inputs=inputs,
        output="last_hidden_state",
        pooling=pooling,  # type: ignore[arg-type]
        normalize=opts.normalize,
    )


def reference(
    python: str, spec: TextSpec, opts: BuildOptions, sentences: list[str], work: Path
) -> tuple[np.ndarray[Any, Any], str]:
    """FP32 PyTorch vectors for `sentences` (sentence-transformers where the folder is one)."""
    listing = work / "sentences.json"
    listing.write_text(json.dumps(sentences), encoding="utf-8")
    out = work / "reference.npy"
    cmd = [python, str(REFERENCE_SCRIPT), str(opts.model_dir), str(listing), str(out)]
    cmd += ["--pooling", spec.pooling, "--max-length", str(spec.max_length)]
    if not spec.normalize:
        cmd.append("--no-normalize")
    stdout = run_tool(cmd, f"FP32 reference vectors for {len(sentences)} sentences (PyTorch)",
                      tool_env())  # fmt: skip
    library = str(json.loads(stdout.strip().splitlines()[-1])["library"])
    vectors = np.load(out, allow_pickle=False).astype(np.float32)
    if vectors.shape[0] != len(sentences):
        raise BuildError(f"the reference gave {vectors.shape[0]} vectors for {len(sentences)}")
    return vectors, library


class _Calibration:
    """Feeds for static quantization, one sentence at a time (onnxruntime's reader protocol)."""

    def __init__(self, encoder: TextEncoder, sentences: list[str]) -> None:
        self._all = [encoder.encode([s])[0] for s in sentences]
        self._feeds = iter(self._all)

    def get_next(self) -> dict[str, np.ndarray[Any, Any]] | None:
        return next(self._feeds, None)

    def rewind(self) -> None:
        """Start over (onnxruntime does for calibration methods that pass twice)."""
        self._feeds = iter(self._all)


def fuse(fp32: Path, out: Path) -> dict[str, int] | None:
    """onnxruntime's transformer fusions (Attention, SkipLayerNorm, BiasGelu) ahead of dynamic
    quantization, so Attention becomes one INT8 QAttention: about 12% faster on MiniLM here at
    the same accuracy. None (keep the plain graph) when nothing fused: not a BERT-like encoder.
    onnxruntime fuses the FP32 model itself when it loads it, so the comparison stays fair."""
    try:
        from onnxruntime.transformers import optimizer
    except ImportError:
        return None
    with step("fusing attention and layer norms (onnxruntime.transformers)"):
        model = optimizer.optimize_model(str(fp32), model_type="bert", opt_level=1)
        stats = {k: int(v) for k, v in model.get_fused_operator_statistics().items() if v}
        if not stats.get("Attention"):
            return None
        model.save_model_to_file(str(out))
    return stats


def quantize(
    fp32: Path,
    out: Path,
    per_channel: bool,
    encoder: TextEncoder,
    calibration: list[str] | None,
) -> dict[str, Any]:
    q = _quantization()
    if calibration is None:
        fused_path = out.with_name("model.fused.onnx")
        fused = fuse(fp32, fused_path)
        what = f"dynamic INT8 quantization ({'per-channel' if per_channel else 'per-tensor'})"
        with step(what):
            q.quantize_dynamic(
                fused_path if fused else fp32,
                out,
                per_channel=per_channel,
                weight_type=q.QuantType.QInt8,
                # fused ops come from the com.microsoft domain: shape inference cannot type them
                extra_options={"DefaultTensorType": 1},  # onnx.TensorProto.FLOAT
            )
        return {"method": "dynamic", "per_channel": per_channel, "weights": "int8", "fused": fused}
    what = f"static INT8 quantization, calibrated on {len(calibration)} sentences"
    with step(what):
        q.quantize_static(
            fp32,
            out,
            _Calibration(encoder, calibration),
            quant_format=q.QuantFormat.QDQ,
            op_types_to_quantize=["MatMul", "Gemm"],
            per_channel=per_channel,
            activation_type=q.QuantType.QUInt8,
            weight_type=q.QuantType.QInt8,
        )
    return {
        "method": "static",
        "per_channel": per_channel,
        "weights": "int8",
        "activations": "uint8",
        "calibration_sentences": len(calibration),
        "ops": ["MatMul", "Gemm"],
    }


def session(path: Path) -> Any:
    ort = _ort()
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def embed(
    sess: Any, encoder: TextEncoder, sentences: list[str], what: str, batch: int = 1
) -> np.ndarray[Any, Any]:
    """Vectors as the server computes them by default ([model_defaults.text] batch_size = 1)."""
    spec = encoder.spec
    out = []
    starts = range(0, len(sentences), batch)
    for start in items(starts, what, total=len(starts)):
        feed, mask = encoder.encode(sentences[start : start + batch])
        (hidden,) = sess.run([spec.output], feed)
        out.append(pool(hidden, mask, spec.pooling, spec.normalize))
    return np.concatenate(out)


def cosines(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> dict[str, float]:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    cos = (a64 * b64).sum(1) / (np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1))
    worst = int(np.argmin(cos))
    return {"mean": float(cos.mean()), "min": float(cos.min()), "worst_index": worst}


def latency(sessions: dict[str, Any], encoder: TextEncoder, sentences: list[str]) -> dict[str, Any]:
    """Milliseconds per sentence (batch 1, tokenized beforehand) for each session, measured
    interleaved in one run (alternating which goes first), so machine noise hits both alike."""
    names = list(sessions)
    feeds = [encoder.encode([s])[0] for s in sentences]
    output = encoder.spec.output
    times: dict[str, list[float]] = {n: [] for n in names}
    for feed in feeds:  # warm-up
        for n in names:
            sessions[n].run([output], feed)
    total = TIMING_PASSES * len(feeds)
    for k in items(range(total), "timing, interleaved", total=total):
        feed = feeds[k % len(feeds)]
        for n in names if k % 2 == 0 else reversed(names):
            t0 = time.perf_counter()
            sessions[n].run([output], feed)
            times[n].append(time.perf_counter() - t0)
    result: dict[str, Any] = {"batch": 1, "runs_each": total, "threads": "onnxruntime default"}
    for n in names:
        result[f"{n}_ms_median"] = statistics.median(times[n]) * 1000
        result[f"{n}_ms_total"] = sum(times[n]) * 1000
    first, second = names
    result["speedup"] = sum(times[first]) / sum(times[second])
    return result


def build_onnx(
    opts: BuildOptions,
    quant: str,
    sentences: list[str],
    calibration: list[str] | None,
    work: Path,
) -> Built:
    python = converter_python(opts.python, EXPORT_MODULES, "the ONNX export")
    exported = export(python, opts.model_dir, work / "export")
    tokenizer = exported.parent / "tokenizer.json"
    if not tokenizer.is_file():
        tokenizer = opts.model_dir / "tokenizer.json"
    if not tokenizer.is_file():
        raise BuildError(f"{opts.model_dir}: no tokenizer.json (a fast tokenizer is needed)")
    fp32_session = session(exported)
    spec = text_spec(opts, fp32_session, "tokenizer.json")
    encoder = TextEncoder(spec, tokenizer.parent, f"{opts.model_dir}")
    ref, library = reference(python, spec, opts, sentences, work)
    fp32 = embed(fp32_session, encoder, sentences, "FP32 ONNX vectors")
    report: dict[str, Any] = {
        "sentences": len(sentences),
        "reference": f"{library}, FP32 PyTorch",
        "min_cosine": opts.min_cosine,
        "fp32_onnx_vs_reference": cosines(fp32, ref),
    }
    sizes: dict[str, float] = {"fp32_bytes": exported.stat().st_size}
    model = exported
    if quant == "int8":
        model = work / "model.int8.onnx"
        report["quantization_method"] = quantize(
            exported, model, opts.per_channel, encoder, calibration
        )
        int8_session = session(model)
        int8 = embed(int8_session, encoder, sentences, "INT8 ONNX vectors")
        report["int8_vs_reference"] = cosines(int8, ref)
        report["int8_vs_fp32_onnx"] = cosines(int8, fp32)
        with step(f"latency FP32 vs INT8 over {len(sentences)} sentences, interleaved"):
            report["latency"] = latency(
                {"fp32": fp32_session, "int8": int8_session}, encoder, sentences
            )
        sizes["int8_bytes"] = model.stat().st_size
        sizes["ratio"] = sizes["fp32_bytes"] / sizes["int8_bytes"]
        served = report["int8_vs_reference"]
    else:
        served = report["fp32_onnx_vs_reference"]
    report["size"] = sizes
    report["passed"] = served["mean"] >= opts.min_cosine
    report["verdict"] = (
        f"mean cosine {served['mean']:.4f} (min {served['min']:.4f}) against the reference, "
        f"{'at least' if report['passed'] else 'below'} {opts.min_cosine}"
    )
    say(report["verdict"])
    if "latency" in report:
        lat = report["latency"]
        say(
            f"latency per sentence: FP32 {lat['fp32_ms_median']:.2f} ms, INT8 "
            f"{lat['int8_ms_median']:.2f} ms (median; speed-up {lat['speedup']:.2f}x); size "
            f"{sizes['fp32_bytes'] / 2**20:.1f} -> {sizes['int8_bytes'] / 2**20:.1f} MiB"
        )
    pre, post = spec.to_json()
    params = {"text": {"reference": report["reference"], "python": sys.version.split()[0]}}
    return Built(
        model=model,
        report=report,
        extra_files={"tokenizer.json": tokenizer},
        preprocess=pre,
        postprocess=post,
        parameters=params,
    )
