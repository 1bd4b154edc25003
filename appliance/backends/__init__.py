"""Backends by name, imported lazily so a device only loads the runtimes its models use."""

from __future__ import annotations

import importlib
from pathlib import Path

from ..errors import ModelError
from .base import Backend

#: name -> "module:Class"
_BACKENDS: dict[str, str] = {
    "onnx": "appliance.backends.onnx:OnnxBackend",
    "gguf": "appliance.backends.gguf:GgufBackend",
    "tflite": "appliance.backends.tflite:TfliteBackend",
}
#: file suffix -> backend name
_SUFFIXES: dict[str, str] = {
    ".onnx": "onnx",
    ".ort": "onnx",
    ".gguf": "gguf",
    ".tflite": "tflite",
}


def names() -> list[str]:
    return sorted(_BACKENDS)


def get_backend(name: str) -> type[Backend]:
    """The backend class for `name`; a missing runtime gives a message saying what to install."""
    target = _BACKENDS.get(name)
    if target is None:
        raise ModelError(f"unknown backend {name!r} (known: {', '.join(names())})")
    module_name, _, cls_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelError(
            f"backend {name!r} is not available: {exc} (install the '{name}' extra: "
            f"pip install 'appliance[{name}]')"
        ) from None
    cls: type[Backend] = getattr(module, cls_name)
    return cls


def runtime_report() -> list[str]:
    """One line per backend: its runtime version and the devices it can use here, or why not."""
    lines = []
    for name in names():
        module_name = _BACKENDS[name].partition(":")[0]
        try:
            module = importlib.import_module(module_name)
            info: str = module.runtime_info()
        except (ImportError, ModelError) as exc:
            info = f"not available ({exc})"
        lines.append(f"{name}: {info}")
    return lines


def detect_backend(path: Path) -> str:
    """Which backend reads this file: by magic bytes first, then by suffix."""
    try:
        with path.open("rb") as f:
            head = f.read(8)
    except OSError as exc:
        raise ModelError(f"cannot read {path}: {exc.strerror}") from None
    if head[:4] == b"GGUF":
        return "gguf"
    if head[4:8] == b"TFL3":
        return "tflite"
    backend = _SUFFIXES.get(path.suffix.lower())
    if backend is None:
        raise ModelError(
            f"{path}: cannot tell the model format (expected one of: "
            f"{', '.join(sorted(_SUFFIXES))})"
        )
    return backend
