"""The `appliance build` command line (arguments here; the work in pipeline.py)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", type=Path, help="a Hugging Face model folder (config.json, ...)")
    p.add_argument(
        "--task",
        required=True,
        help="embedding (aliases feature-extraction, sentence-similarity) or causal-lm "
        "(alias text-generation)",
    )
    p.add_argument(
        "--format", choices=["onnx", "gguf"], help="default: onnx for embedding, gguf for causal-lm"
    )
    p.add_argument("--name", help="model name in the store (default: the folder's name)")
    p.add_argument(
        "--quantize",
        help="onnx: int8 (default) | none; gguf: q8_0 (default) | q4_0 | q4_k_m | q5_k_m | "
        "q6_k | f16",
    )
    p.add_argument(
        "--per-tensor",
        action="store_true",
        help="INT8 scales per tensor instead of per channel (smaller loss of accuracy is the "
        "reason per-channel is the default)",
    )
    p.add_argument(
        "--calibration",
        type=Path,
        metavar="FILE",
        help="static INT8 calibrated on these sentences (one per line) instead of dynamic",
    )
    p.add_argument(
        "--sentences",
        type=Path,
        metavar="FILE",
        help="validation sentences, one per line (default: the 117 bundled ones)",
    )
    p.add_argument(
        "--min-cosine",
        type=float,
        default=0.99,
        help="embedding builds pass at this mean cosine to the FP32 reference (default 0.99)",
    )
    p.add_argument(
        "--min-agreement",
        type=float,
        default=0.9,
        help="causal-lm builds pass at this share of next tokens equal to F16's (default 0.9)",
    )
    p.add_argument("--max-length", type=int, help="tokens per text (default: from the folder)")
    p.add_argument("--pooling", choices=["mean", "cls"], help="default: from the folder, or mean")
    p.add_argument("--no-normalize", action="store_true", help="do not scale vectors to length 1")
    p.add_argument("--out", type=Path, help="write into this store folder instead of --models")
    p.add_argument("--version", help="version name (default: the next integer)")
    p.add_argument("--no-activate", action="store_true", help="store without activating")
    p.add_argument(
        "--python",
        help="the converter Python, with optimum-onnx/torch/transformers (default: "
        "$APPLIANCE_CONVERT_PYTHON, ./.venv-convert/bin/python, or this Python)",
    )
    p.add_argument(
        "--llama-cpp",
        type=Path,
        metavar="DIR",
        help="folder with llama.cpp's convert_hf_to_gguf.py and gguf-py/ (default: fetched "
        "once from the llama-cpp-python sdist into --cache)",
    )
    p.add_argument("--cache", type=Path, help="tool cache (default: ~/.cache/appliance)")
    p.add_argument("--work", type=Path, help="keep intermediate files here (default: a temp dir)")


def run(args: argparse.Namespace, store: Path) -> int:
    from .pipeline import BuildOptions, default_cache, run_build

    opts = BuildOptions(
        model_dir=args.model_dir,
        task=args.task,
        store=args.out or store,
        format=args.format,
        name=args.name,
        quantize=args.quantize,
        per_channel=not args.per_tensor,
        calibration=args.calibration,
        sentences=args.sentences,
        min_cosine=args.min_cosine,
        min_agreement=args.min_agreement,
        max_length=args.max_length,
        pooling=args.pooling,
        normalize=not args.no_normalize,
        version=args.version,
        activate=not args.no_activate,
        python=args.python,
        llama_cpp=args.llama_cpp,
        cache=args.cache or default_cache(),
        work=args.work,
    )
    version, report = run_build(opts)
    m = version.manifest
    print(
        f"built {m.name} version {m.version} ({m.backend}, {report['quantization']}, "
        f"{m.size} bytes) in {version.directory}"
    )
    print(f"  validation: {report['verdict']}")
    return 0
