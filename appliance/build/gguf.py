"""llama.cpp's converter and quantizer, shared by `appliance build` and build/make_gguf_models.py.

The converter (convert_hf_to_gguf.py with conversion/ and gguf-py/ beside it) ships in the
llama-cpp-python sdist; it is fetched once with pip (a tool, never weights) and cached per
version. Quantization is llama.cpp's own `llama_model_quantize`. Only the standard library is
imported here at module level: make_gguf_models.py reports missing tools with a bare Python.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

FALLBACK_LLAMA_CPP_VERSION = "0.3.36"
LLAMA_CPP_HINT = (
    'CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install llama-cpp-python==' + FALLBACK_LLAMA_CPP_VERSION
)
#: llama.cpp file types (enum llama_ftype) that `quantize` can write.
FTYPES = {"f16": 1, "q8_0": 7, "q4_0": 2, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}

Log = Callable[[str], None]


class ToolMissing(RuntimeError):
    """A package or program the build needs is not there."""


def _print(message: str) -> None:
    print(message, flush=True)


@contextmanager
def step(what: str, log: Log = _print) -> Iterator[None]:
    log(f"{what} ...")
    start = time.perf_counter()
    yield
    log(f"{what}: done in {time.perf_counter() - start:.1f} s")


def llama_cpp_module() -> Any:
    """llama_cpp, imported (its shared library loaded), or ToolMissing saying how to install."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise ToolMissing(
            f"Python module 'llama_cpp' is not importable ({exc}); {LLAMA_CPP_HINT}"
        ) from exc
    return llama_cpp


def llama_cpp_version() -> str:
    version = getattr(llama_cpp_module(), "__version__", None)
    return str(version) if version else FALLBACK_LLAMA_CPP_VERSION


def is_valid_gguf(path: Path) -> bool:
    """A complete GGUF file: the magic, a known version and at least one tensor."""
    try:
        with path.open("rb") as f:
            head = f.read(24)
    except OSError:
        return False
    if len(head) < 24 or head[:4] != b"GGUF":
        return False
    version = int.from_bytes(head[4:8], "little")
    n_tensors = int.from_bytes(head[8:16], "little")
    return version in (2, 3) and n_tensors > 0


def tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def converter_dir(cache: Path, version: str, log: Log = _print) -> Path:
    """convert_hf_to_gguf.py with conversion/ and gguf-py/ beside it, cached per version."""
    target = cache / f"llama.cpp-converter-{version}"
    if (target / ".complete").is_file():
        log(f"converter: cached in {target}")
        return target
    if importlib.util.find_spec("pip") is None:
        raise ToolMissing(f"pip is needed to fetch the llama-cpp-python=={version} sdist")
    cache.mkdir(parents=True, exist_ok=True)
    with (
        step(f"fetching llama-cpp-python=={version} sdist (for convert_hf_to_gguf.py)", log),
        tempfile.TemporaryDirectory(dir=cache) as tmp,
    ):
        download = Path(tmp) / "sdist"
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:"]
        cmd += ["--no-deps", "-d", str(download), f"llama-cpp-python=={version}"]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        archives = sorted(download.glob("llama_cpp_python-*.tar.gz"))
        if done.returncode != 0 or not archives:
            raise ToolMissing(
                f"could not fetch the llama-cpp-python=={version} sdist with pip "
                f"(exit {done.returncode}): {done.stderr.strip()[-2000:]}"
            )
        staging = Path(tmp) / "converter"
        extract_converter(archives[0], staging, log)
        (staging / ".complete").write_text(version + "\n", encoding="utf-8")
        if not (target / ".complete").is_file():  # else a concurrent run got there first
            if target.exists():
                shutil.rmtree(target)  # an incomplete earlier attempt
            staging.rename(target)
    log(f"converter: extracted into {target}")
    return target


def extract_converter(archive: Path, dest: Path, log: Log = _print) -> None:
    wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
    count = 0
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            parts = member.name.split("/", 1)
            if len(parts) != 2 or not parts[1].startswith("vendor/llama.cpp/"):
                continue
            rel = parts[1].removeprefix("vendor/llama.cpp/")
            if not member.isfile() or not rel.startswith(wanted) or ".." in rel.split("/"):
                continue
            out = dest / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            source = tar.extractfile(member)
            if source is None:
                continue
            with source, out.open("wb") as f:
                shutil.copyfileobj(source, f)
            count += 1
    if not (dest / "convert_hf_to_gguf.py").is_file() or not (dest / "gguf-py").is_dir():
        raise ToolMissing(f"{archive.name} holds no vendor/llama.cpp/convert_hf_to_gguf.py")
    log(f"converter: {count} files from {archive.name}")


class Converter:
    """convert_hf_to_gguf.py, run by `python` (it needs torch, transformers, sentencepiece)."""

    def __init__(self, directory: Path, python: str | None = None) -> None:
        self.directory = directory
        self.python = python or sys.executable

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        gguf_py = str(self.directory / "gguf-py")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (gguf_py, env.get("PYTHONPATH")) if p)
        env["HF_HUB_OFFLINE"] = "1"
        env["TRANSFORMERS_OFFLINE"] = "1"
        return env

    def convert(
        self, model_dir: Path, out: Path, outtype: str, name: str, vocab_only: bool = False
    ) -> None:
        """convert_hf_to_gguf.py MODEL_DIR --outfile OUT (written under a temporary name first)."""
        tmp = tmp_path(out)
        cmd = [self.python, str(self.directory / "convert_hf_to_gguf.py"), str(model_dir)]
        cmd += ["--outfile", str(tmp), "--outtype", outtype, "--model-name", name]
        if vocab_only:
            cmd.append("--vocab-only")
        done = subprocess.run(cmd, env=self.env(), capture_output=True, text=True, check=False)
        if done.returncode != 0 or not tmp.is_file():
            tmp.unlink(missing_ok=True)
            raise RuntimeError(
                f"convert_hf_to_gguf.py failed on {model_dir} (exit {done.returncode}):\n"
                + "\n".join((done.stdout + done.stderr).splitlines()[-30:])
            )
        tmp.replace(out)


def quantize(src: Path, dst: Path, kind: str) -> None:
    """llama_model_quantize SRC -> DST (K-quants need rows divisible by 256, else fall back)."""
    llama_cpp = llama_cpp_module()
    # llama-cpp-python prints llama.cpp's log at this logger's level: keep warnings (fallbacks).
    logging.getLogger("llama-cpp-python").setLevel(logging.WARNING)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[kind]
    params.nthread = os.cpu_count() or 1
    tmp = tmp_path(dst)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
    if rc != 0 or not is_valid_gguf(tmp):
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"llama_model_quantize {src.name} -> {kind} failed (rc={rc})")
    tmp.replace(dst)
