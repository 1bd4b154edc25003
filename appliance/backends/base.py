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
from ..tensors import DATATYPES, Signature


@dataclass(frozen=True)
class Quantization:
    """Affine quantization of a model input or output: real = (raw - zero_point) * scale.

    A backend that lists a tensor here takes and gives it as real (FP32) values; the raw
    integer form stays available on request (see appliance/preprocess)."""

    datatype: str  # the raw KServe datatype: INT8, UINT8 or INT16
    scale: float
    zero_point: int

    def to_json(self) -> dict[str, Any]:
        return {"datatype": self.datatype, "scale": self.scale, "zero_point": self.zero_point}

    def quantize(self, values: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        """Real values to raw integers: round half away from zero (as TFLite does), clamp."""
        dtype = DATATYPES[self.datatype]
        scaled = values.astype(np.float32) / np.float32(self.scale)
        rounded = np.sign(scaled) * np.floor(np.abs(scaled) + np.float32(0.5))
        info = np.iinfo(dtype)
        out: np.ndarray[Any, Any] = np.clip(rounded + self.zero_point, info.min, info.max)
        return out.astype(dtype)

    def dequantize(self, values: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        real: np.ndarray[Any, Any] = (values.astype(np.int32) - self.zero_point) * np.float32(
            self.scale
        )
        return real.astype(np.float32)


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
    #: Inputs and outputs the backend converts between real values and quantized integers.
    quantization: dict[str, Quantization] = {}

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
