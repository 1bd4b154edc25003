"""The manifest that describes one immutable model version on disk."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from .errors import ModelError
from .tensors import DATATYPES, Signature, TensorSpec

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Manifest:
    """What a version directory holds and how to serve it.

    `parameters` carries backend hints that travel with the model (for example a chat template).
    `preprocess` and `postprocess` declare how raw client data (an image, text) becomes the
    model's input tensors and how outputs become answers; appliance.preprocess reads them, keyed
    by their "type".
    """

    name: str
    version: str
    backend: str
    file: str
    sha256: str
    size: int
    signature: Signature
    created_at: str
    source: str
    parameters: dict[str, Any] = field(default_factory=dict)
    preprocess: dict[str, Any] | None = None
    postprocess: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA_VERSION,
            "name": self.name,
            "version": self.version,
            "backend": self.backend,
            "file": self.file,
            "sha256": self.sha256,
            "size": self.size,
            "inputs": [t.to_json() for t in self.signature.inputs],
            "outputs": [t.to_json() for t in self.signature.outputs],
            "created_at": self.created_at,
            "source": self.source,
            "parameters": self.parameters,
            **({"preprocess": self.preprocess} if self.preprocess is not None else {}),
            **({"postprocess": self.postprocess} if self.postprocess is not None else {}),
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any], where: str) -> Manifest:
        try:
            inputs = tuple(TensorSpec.from_json(t) for t in obj["inputs"])
            outputs = tuple(TensorSpec.from_json(t) for t in obj["outputs"])
            for t in inputs + outputs:
                if t.datatype not in DATATYPES:
                    raise ValueError(f"tensor {t.name!r} has unknown datatype {t.datatype!r}")
            manifest = cls(
                name=str(obj["name"]),
                version=str(obj["version"]),
                backend=str(obj["backend"]),
                file=str(obj["file"]),
                sha256=str(obj["sha256"]),
                size=int(obj["size"]),
                signature=Signature(inputs, outputs),
                created_at=str(obj.get("created_at", "")),
                source=str(obj.get("source", "")),
                parameters=dict(obj.get("parameters") or {}),
                preprocess=_optional_object(obj, "preprocess"),
                postprocess=_optional_object(obj, "postprocess"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"{where}: invalid manifest: {exc!s}") from None
        if Path(manifest.file).name != manifest.file or manifest.file in ("", ".", ".."):
            raise ModelError(
                f"{where}: manifest 'file' must be a plain file name, got {manifest.file!r}"
            )
        return manifest

    @classmethod
    def read(cls, path: Path) -> Manifest:
        try:
            obj = orjson.loads(path.read_bytes())
        except OSError as exc:
            raise ModelError(f"cannot read manifest {path}: {exc.strerror}") from None
        except orjson.JSONDecodeError as exc:
            raise ModelError(f"{path}: manifest is not valid JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise ModelError(f"{path}: manifest must be a JSON object")
        return cls.from_json(obj, str(path))


def _optional_object(obj: dict[str, Any], key: str) -> dict[str, Any] | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise ValueError(f"{key!r} must be an object with a string 'type'")
    return dict(value)


def sha256_file(path: Path, chunk: int = 1 << 20) -> tuple[str, int]:
    """SHA-256 hex digest and size of a file, read in chunks (model files can be gigabytes)."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def verify_file(path: Path, manifest: Manifest) -> None:
    """Refuse a model file whose size or sha256 no longer matches its manifest."""
    try:
        actual, size = sha256_file(path)
    except OSError as exc:
        raise ModelError(
            f"model {manifest.name!r} version {manifest.version}: "
            f"cannot read {path}: {exc.strerror}"
        ) from None
    if size != manifest.size or actual != manifest.sha256:
        raise ModelError(
            f"model {manifest.name!r} version {manifest.version}: refusing to load {path}: "
            f"sha256 {actual} ({size} bytes) does not match the manifest's "
            f"{manifest.sha256} ({manifest.size} bytes); the file was modified or corrupted"
        )
