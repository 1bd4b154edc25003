"""What this build is: version, git revision, and the runtimes it can use on this machine."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

from . import __version__


def git_revision() -> str:
    """The revision baked in at binary build time, else the source checkout's, else 'unknown'."""
    try:
        from ._buildinfo import GIT_REVISION  # type: ignore[import-not-found, import-untyped, unused-ignore]

        return str(GIT_REVISION)
    except ImportError:
        pass
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return "unknown"
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def version_text() -> str:
    """`appliance --version`: one line per fact, then one per backend."""
    from .backends import runtime_report

    frozen = " (frozen binary)" if getattr(sys, "frozen", False) else ""
    lines = [
        f"appliance {__version__} (git {git_revision()}){frozen}",
        f"python {platform.python_version()} on {platform.system().lower()} {platform.machine()}",
        "backends:",
    ]
    lines += [f"  {line}" for line in runtime_report()]
    lines.append("features:")
    lines += [f"  {line}" for line in feature_report()]
    return "\n".join(lines)


#: Optional features: (name, the module that provides it, what it does).
FEATURES = (
    ("image", "PIL", "JPEG/PNG inputs (Pillow)"),
    ("text", "tokenizers", "text embedding models on ONNX (tokenizers)"),
    ("sync", "tuf", "fleet sync with a hub (python-tuf)"),
    ("grpc", "grpc", "KServe v2 over gRPC (grpcio)"),
)


def feature_report() -> list[str]:
    """One line per optional feature: the library version it runs on, or 'not available'."""
    import importlib

    lines = []
    for name, module_name, what in FEATURES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            lines.append(f"{name}: not available ({what})")
            continue
        lines.append(f"{name}: {module_name} {getattr(module, '__version__', '?')}")
    return lines
