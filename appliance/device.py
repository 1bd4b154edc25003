"""Device choice, in one place for every backend: `auto` prefers an accelerator, else the CPU.

A backend reports which accelerators its runtime really offers; this module decides, logs a
fallback once, and refuses an explicit `cuda` that cannot be honoured rather than silently
running on the CPU.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from .errors import ModelError

log = logging.getLogger("appliance.device")
_logged: set[str] = set()
_logged_lock = threading.Lock()


@dataclass(frozen=True)
class Placement:
    """Where a model actually runs, as reported in metadata, readiness and metrics."""

    device: str  # "cuda" or "cpu"
    #: Runtime detail, e.g. onnxruntime's execution providers in order.
    detail: str
    #: Why an accelerator was not used, when `auto` fell back to the CPU.
    fallback_reason: str | None = None


def log_once(key: str, message: str, *args: object) -> None:
    """Log a warning the first time `key` is seen in this process."""
    with _logged_lock:
        if key in _logged:
            return
        _logged.add(key)
    log.warning(message, *args)


def want_accelerator(requested: str, available: bool, why_not: str, what: str) -> bool:
    """Decide before loading whether to try the accelerator."""
    if requested == "cpu":
        return False
    if requested == "cuda" and not available:
        raise ModelError(f"{what}: device = 'cuda' was asked for but {why_not}")
    return available


def settle(requested: str, accelerated: bool, detail: str, why_not: str, what: str) -> Placement:
    """Turn what the runtime really did into a Placement, logging an `auto` fallback once."""
    if accelerated:
        return Placement("cuda", detail)
    if requested == "cuda":
        raise ModelError(f"{what}: device = 'cuda' was asked for but {why_not}")
    if requested == "auto":
        log_once(
            f"fallback:{why_not}",
            "no usable accelerator, running on the CPU: %s",
            why_not,
        )
        return Placement("cpu", detail, fallback_reason=why_not)
    return Placement("cpu", detail)
