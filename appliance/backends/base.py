"""The interface every runtime implements: load from a manifest, describe, run a batch, unload."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..config import ModelConfig
from ..device import Placement
from ..manifest import Manifest
from ..tensors import Signature


@dataclass(frozen=True)
class LoadContext:
    """What a backend may need beyond the manifest: its settings and a cache directory."""

    config: ModelConfig
    cache_dir: Path


class Backend(ABC):
    """A loaded model. `run` may be called from several worker threads at once only if
    `thread_safe` is true; otherwise the engine serialises calls per instance."""

    name: ClassVar[str]
    platform: ClassVar[str]
    thread_safe: ClassVar[bool] = True
    #: `run` takes inputs of several requests concatenated along dimension 0 and answers row
    #: for row (the engine merges queued requests only for such backends; see engine/batching).
    batchable: ClassVar[bool] = False
    #: Requests the backend can run at once, when it decides that itself (GGUF: one per llama
    #: context); None means the model's max_concurrency setting.
    parallelism: int | None = None

    signature: Signature
    placement: Placement

    @classmethod
    @abstractmethod
    def inspect(cls, path: Path) -> tuple[Signature, dict[str, Any]]:
        """Read a model file's inputs, outputs and backend parameters (for `models add`)."""

    @abstractmethod
    def __init__(self, manifest: Manifest, path: Path, context: LoadContext) -> None:
        """Load the model; raise ModelError with a clear reason on failure."""

    @abstractmethod
    def run(
        self, inputs: dict[str, np.ndarray[Any, Any]], outputs: list[str] | None
    ) -> dict[str, np.ndarray[Any, Any]]:
        """Run one batch; returns the requested outputs (all when None), in model order."""

    def unload(self) -> None:  # noqa: B027 - optional hook
        """Release native resources."""
