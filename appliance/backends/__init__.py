"""Backends by name, imported lazily so a device only loads the runtimes its models use.

Installed packages add backends through the `appliance.backends` entry-point group
(`name = "module:Class"`, a `Backend` subclass); the built-in names cannot be taken over.
"""

from __future__ import annotations

import importlib
import importlib.metadata
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


#: The entry-point group plugins register backends in.
ENTRY_POINT_GROUP = "appliance.backends"


def plugins() -> dict[str, str]:
    """Backends installed packages add: name -> "module:Class" (read only when asked for: it
    scans the installed distributions)."""
    found = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    return {ep.name: ep.value for ep in found if ep.name not in _BACKENDS}


def names() -> list[str]:
    return sorted({*_BACKENDS, *plugins()})


def get_backend(name: str) -> type[Backend]:
    """The backend class for `name`; a missing runtime gives a message saying what to install."""
    target = _BACKENDS.get(name)
    plugin = target is None
    if target is None:
        target = plugins().get(name)
    if target is None:
        raise ModelError(f"unknown backend {name!r} (known: {', '.join(names())})")
    module_name, _, cls_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        hint = (
            f"the plugin's module {module_name!r} does not import"
            if plugin
            else f"install the '{name}' extra: pip install 'appliance[{name}]'"
        )
        raise ModelError(f"backend {name!r} is not available: {exc} ({hint})") from None
    cls = getattr(module, cls_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise ModelError(f"backend {name!r}: {target} is not a Backend class")
    return cls


def runtime_report() -> list[str]:
    """One line per backend: its runtime version and the devices it can use here, or why not."""
    lines = []
    targets = {**plugins(), **_BACKENDS}
    for name in sorted(targets):
        module_name = targets[name].partition(":")[0]
        try:
            module = importlib.import_module(module_name)
            report = getattr(module, "runtime_info", None)
            info = str(report()) if report is not None else "plugin (no runtime report)"
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
