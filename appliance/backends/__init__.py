"""Backends by name, imported lazily so a device only loads the runtimes its models use.

Installed packages add backends through the `appliance.backends` entry-point group
(`name = "module:Class"`, a `Backend` subclass); the built-in names cannot be taken over. A
plugin's failures name it: one that does not import, or fails to load a model, makes only that
model not ready (ModelError naming the plugin); one that raises while running gives that
request a 500 naming the plugin and its backend (`failure`, used by the engine's scheduler and
the isolation worker), and the server goes on.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from ..errors import ApplianceError, ModelError
from ..manifest import Manifest
from ..plugins import entries
from .base import Backend, LoadContext

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


#: A plugin backend class -> (its registered name, the distribution it came from), so a
#: failure names the plugin to blame (filled by `get_backend`).
PLUGIN_OF: dict[type[Backend], tuple[str, str]] = {}


def plugins() -> dict[str, str]:
    """Backends installed packages add: name -> "module:Class" (read only when asked for: it
    scans the installed distributions)."""
    return {name: target for name, (target, _dist) in _plugin_entries().items()}


def _plugin_entries() -> dict[str, tuple[str, str]]:
    """name -> ("module:Class", distribution name)."""
    return entries(ENTRY_POINT_GROUP, _BACKENDS)


def names() -> list[str]:
    return sorted({*_BACKENDS, *plugins()})


def get_backend(name: str) -> type[Backend]:
    """The backend class for `name`; a missing runtime gives a message saying what to install."""
    target = _BACKENDS.get(name)
    dist = None
    if target is None:
        found = _plugin_entries().get(name)
        if found is None:
            raise ModelError(f"unknown backend {name!r} (known: {', '.join(names())})")
        target, dist = found
    module_name, _, cls_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if dist is not None:
            raise _not_available(name, dist, exc) from None
        raise ModelError(
            f"backend {name!r} is not available: {exc} "
            f"(install the '{name}' extra: pip install 'appliance[{name}]')"
        ) from None
    except Exception as exc:  # a plugin may fail in any way while importing
        if dist is None:
            raise
        raise _not_available(name, dist, exc) from None
    cls = getattr(module, cls_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        origin = f" (plugin {dist!r})" if dist else ""
        raise ModelError(f"backend {name!r}{origin}: {target} is not a Backend class")
    if dist is not None:
        PLUGIN_OF[cls] = (name, dist)
    return cls


def _not_available(name: str, dist: str, exc: BaseException) -> ModelError:
    return ModelError(
        f"backend {name!r} (plugin {dist!r}) is not available: it does not import: "
        f"{type(exc).__name__}: {exc}"
    )


def load(manifest: Manifest, path: Path, context: LoadContext) -> Backend:
    """The manifest's backend, loaded in this process; a plugin's own failure (anything but
    a ModelError) is a ModelError naming the plugin, so only this model is not ready."""
    cls = get_backend(manifest.backend)
    try:
        return cls(manifest, path, context)
    except ApplianceError:
        raise
    except Exception as exc:
        if cls not in PLUGIN_OF:
            raise
        name, dist = PLUGIN_OF[cls]
        raise ModelError(
            f"backend {name!r} (plugin {dist!r}) failed to load {path.name}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc


def failure(backend: Any, exc: BaseException, typed: bool = False) -> str:
    """What a backend's own exception during a run tells the client: the error (`typed`: with
    its type's name), and for a plugin, which plugin and backend raised it."""
    origin = PLUGIN_OF.get(type(backend))
    if origin is None:
        return f"{type(exc).__name__}: {exc}" if typed else str(exc)
    name, dist = origin
    return f"backend {name!r} (plugin {dist!r}) raised {type(exc).__name__}: {exc}"


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
