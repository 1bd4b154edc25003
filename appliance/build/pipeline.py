"""`appliance build`: check the request, pick the tools, build, validate, write the version.

    appliance build MODEL_DIR --task embedding [--format onnx|gguf] [--name NAME] [--out DIR]

The work happens in a scratch folder; only a build that passed validation becomes a version
(model file, tokenizer, validation.json, manifest) in the store, through Registry.add, so the
store's guarantees (immutable, hashed, atomic) hold for built models too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ApplianceError
from ..registry import ModelVersion, Registry, check_name
from .progress import ToolFailed, say

#: task -> the formats it builds to (the first is the default)
TASKS = {"embedding": ("onnx", "gguf"), "causal-lm": ("gguf",)}
ALIASES = {
    "feature-extraction": "embedding",
    "sentence-similarity": "embedding",
    "text-generation": "causal-lm",
}
#: --quantize choices per format (the first is the default)
QUANTIZATIONS = {
    "onnx": ("int8", "none"),
    "gguf": ("q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k", "f16"),
}
SENTENCES = Path(__file__).with_name("sentences.txt")
CONVERT_VENV = Path(".venv-convert")
CONVERT_HINT = (
    "make one with `make convert-venv` (or: python3 -m venv .venv-convert && "
    ".venv-convert/bin/pip install -r build/convert_requirements.txt) and pass "
    "--python .venv-convert/bin/python (or set APPLIANCE_CONVERT_PYTHON)"
)


class BuildError(ApplianceError):
    """The build cannot start or did not pass (a bad request, a missing tool, a failed check)."""

    status = 400


@dataclass
class BuildOptions:
    model_dir: Path
    task: str
    store: Path
    format: str | None = None
    name: str | None = None
    quantize: str | None = None
    per_channel: bool = True
    calibration: Path | None = None
    sentences: Path | None = None
    min_cosine: float = 0.99
    min_agreement: float = 0.9
    max_length: int | None = None
    pooling: str | None = None
    normalize: bool = True
    version: str | None = None
    activate: bool = True
    python: str | None = None
    llama_cpp: Path | None = None
    cache: Path = field(default_factory=lambda: default_cache())
    work: Path | None = None


@dataclass
class Built:
    """What a format's builder hands back: the model file and what goes beside it."""

    model: Path
    report: dict[str, Any]
    extra_files: dict[str, Path] = field(default_factory=dict)
    preprocess: dict[str, Any] | None = None
    postprocess: dict[str, Any] | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "appliance"


def read_sentences(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise BuildError(f"cannot read the sentences file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise BuildError(f"{path}: the sentences file is not UTF-8 text") from None
    lines = [line.strip() for line in text.splitlines()]
    sentences = [line for line in lines if line and not line.startswith("#")]
    if not sentences:
        raise BuildError(f"{path}: no sentences (one per line; '#' starts a comment)")
    return sentences


def check_options(opts: BuildOptions) -> tuple[str, str, str, str]:
    """(task, format, quantization, name), or BuildError naming what is wrong."""
    if not opts.model_dir.is_dir():
        raise BuildError(f"{opts.model_dir}: no such model folder")
    if not (opts.model_dir / "config.json").is_file():
        raise BuildError(
            f"{opts.model_dir}: not a Hugging Face model folder (it has no config.json)"
        )
    task = ALIASES.get(opts.task, opts.task)
    if task not in TASKS:
        known = ", ".join([*TASKS, *ALIASES])
        raise BuildError(f"unknown task {opts.task!r} (known: {known})")
    fmt = opts.format or TASKS[task][0]
    if fmt not in TASKS[task]:
        raise BuildError(
            f"task {task!r} builds to {' or '.join(TASKS[task])}, not {fmt!r}"
            + (" (causal LMs are served by llama.cpp: --format gguf)" if fmt == "onnx" else "")
        )
    quant = opts.quantize or QUANTIZATIONS[fmt][0]
    if quant not in QUANTIZATIONS[fmt]:
        raise BuildError(
            f"--quantize {quant!r} is not a {fmt} choice (known: {', '.join(QUANTIZATIONS[fmt])})"
        )
    if opts.calibration is not None and (fmt != "onnx" or quant != "int8"):
        raise BuildError("--calibration (static INT8) applies to --format onnx --quantize int8")
    if opts.pooling not in (None, "mean", "cls"):
        raise BuildError(f"--pooling must be mean or cls, got {opts.pooling!r}")
    if opts.max_length is not None and opts.max_length < 2:
        raise BuildError(f"--max-length must be at least 2, got {opts.max_length}")
    name = opts.name or opts.model_dir.resolve().name
    try:
        check_name(name, "model name")
        if opts.version is not None:
            check_name(opts.version, "version")
    except ApplianceError as exc:
        raise BuildError(exc.message) from None
    return task, fmt, quant, name


def converter_python(given: str | None, modules: list[str], purpose: str) -> str:
    """The Python that runs the Hugging Face tools: --python, $APPLIANCE_CONVERT_PYTHON,
    ./.venv-convert, or this one; BuildError when it lacks `modules`."""
    candidates = [given, os.environ.get("APPLIANCE_CONVERT_PYTHON")]
    local = CONVERT_VENV / "bin" / "python"
    python = next((c for c in candidates if c), None)
    if python is None:
        python = str(local.absolute()) if local.exists() else sys.executable
    probe = (
        "import importlib, json, sys\n"
        "missing = []\n"
        "for m in sys.argv[1:]:\n"
        "    try:\n"
        "        importlib.import_module(m)\n"
        "    except Exception:\n"
        "        missing.append(m)\n"
        "print(json.dumps(missing))\n"
    )
    try:
        done = subprocess.run(
            [python, "-c", probe, *modules], capture_output=True, text=True, timeout=300
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BuildError(
            f"cannot run the converter Python {python}: {exc}; {CONVERT_HINT}"
        ) from None
    try:
        missing = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise BuildError(
            f"the converter Python {python} did not start: {done.stderr.strip()[-500:]}"
        ) from None
    if missing:
        raise BuildError(
            f"{purpose} needs {', '.join(missing)} in the converter Python ({python}); "
            + CONVERT_HINT
        )
    return python


def run_build(opts: BuildOptions) -> tuple[ModelVersion, dict[str, Any]]:
    """Build, validate and store one model version; returns it and its validation report."""
    task, fmt, quant, name = check_options(opts)
    sentences = read_sentences(opts.sentences or SENTENCES)
    calibration = read_sentences(opts.calibration) if opts.calibration else None
    say(f"building {name} from {opts.model_dir} (task {task}, {fmt}, {quant})")
    with tempfile.TemporaryDirectory(prefix="appliance-build-") as scratch:
        work = opts.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        try:
            if fmt == "onnx":
                from .onnx_build import build_onnx

                built = build_onnx(opts, quant, sentences, calibration, work)
            else:
                from .gguf_build import build_gguf

                built = build_gguf(opts, task, quant, sentences, work)
        except ToolFailed as exc:
            raise BuildError(str(exc)) from None
        report = {"name": name, "task": task, "format": fmt, "quantization": quant, **built.report}
        report_path = work / "validation.json"
        report_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        if not report["passed"]:
            raise BuildError(
                f"validation failed, nothing was stored: {report['verdict']} "
                f"(report: {report_path if opts.work else 'use --work DIR to keep it'})"
            )
        registry = Registry(opts.store)
        version = registry.add(
            name,
            built.model,
            version=opts.version,
            activate=opts.activate,
            extra_files={**built.extra_files, "validation.json": report_path},
            preprocess=built.preprocess,
            postprocess=built.postprocess,
            parameters={**built.parameters, "build": _provenance(opts, task, quant)},
        )
    return version, report


def _provenance(opts: BuildOptions, task: str, quant: str) -> dict[str, Any]:
    return {
        "source": str(opts.model_dir.resolve()),
        "task": task,
        "quantization": quant,
        "per_channel": opts.per_channel,
        "static": opts.calibration is not None,
    }
