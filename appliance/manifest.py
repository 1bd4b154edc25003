"""The manifest that describes one immutable model version on disk."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

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
    model's input tensors and how outputs become answers; `steps` (`{"input": [...],
    "output": [...]}`) declares more steps after them. appliance/steps builds the model's chain
    from all three (`declared`), keyed by each declaration's "type".
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
    #: Processing steps: "input" ones run on the request's inputs, "output" ones on the
    #: model's outputs (after the legacy preprocess / postprocess, which come first).
    steps: dict[str, list[dict[str, Any]]] | None = None
    #: Further files of the version (a tokenizer, a validation report): plain file name ->
    #: {"sha256", "size"}; verify_file checks them with the model file.
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Report templates by output format ("html", "markdown", "text") -> a file of `files`
    #: (Jinja2, rendered in a sandbox: appliance/formats/templates.py).
    templates: dict[str, str] = field(default_factory=dict)

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
            **({"steps": self.steps} if self.steps is not None else {}),
            **({"files": self.files} if self.files else {}),
            **({"templates": self.templates} if self.templates else {}),
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
                steps=check_steps(obj.get("steps")),
                files=_files(obj.get("files")),
                templates=_templates(obj.get("templates")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"{where}: invalid manifest: {exc!s}") from None
        if not is_plain_name(manifest.file):
            raise ModelError(
                f"{where}: manifest 'file' must be a plain file name, got {manifest.file!r}"
            )
        for file_name in manifest.files:
            if not is_plain_name(file_name):
                raise ModelError(
                    f"{where}: manifest 'files' must name plain file names, got {file_name!r}"
                )
        if manifest.file in manifest.files or MANIFEST_NAME in manifest.files:
            raise ModelError(f"{where}: manifest 'files' repeats the model file or the manifest")
        for fmt, file_name in manifest.templates.items():
            if file_name not in manifest.files:
                raise ModelError(
                    f"{where}: manifest 'templates'[{fmt!r}] names {file_name!r}, which is not "
                    "one of its 'files' (templates are verified like the model file)"
                )
        return manifest

    def declared(self, side: Literal["input", "output"]) -> list[tuple[str, dict[str, Any]]]:
        """The step declarations of one side, in order, each with the key it came from: the
        legacy `preprocess` / `postprocess` first, then `steps.<side>[i]`."""
        legacy = self.preprocess if side == "input" else self.postprocess
        out = [("preprocess" if side == "input" else "postprocess", legacy)] if legacy else []
        for i, decl in enumerate((self.steps or {}).get(side, [])):
            out.append((f"steps.{side}[{i}]", decl))
        return out

    @property
    def processing(self) -> tuple[Any, ...]:
        """Everything that decides how requests are prepared and answered (two versions with
        equal `processing` can take each other's prepared requests)."""
        return (self.preprocess, self.postprocess, self.steps)

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


STEP_SIDES = ("input", "output")


def check_steps(value: Any) -> dict[str, list[dict[str, Any]]] | None:
    """The shape of a `steps` object: {"input": [step, ...], "output": [step, ...]}, each step
    an object with a string "type" (what each step holds is checked by the step itself, at
    `models add` and at load). ValueError names the place."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError('\'steps\' must be an object {"input": [...], "output": [...]}')
    unknown = sorted(set(value) - set(STEP_SIDES))
    if unknown:
        raise ValueError(f"'steps' has unknown key {unknown[0]!r} (known: input, output)")
    out: dict[str, list[dict[str, Any]]] = {}
    for side in STEP_SIDES:
        decls = value.get(side)
        if decls is None:
            continue
        if not isinstance(decls, list):
            raise ValueError(f"'steps.{side}' must be a list of step objects")
        for i, decl in enumerate(decls):
            if not isinstance(decl, dict) or not isinstance(decl.get("type"), str):
                raise ValueError(f"'steps.{side}[{i}]' must be an object with a string 'type'")
        out[side] = [dict(d) for d in decls]
    return out


def is_plain_name(name: str) -> bool:
    """A file name that stays inside its version directory."""
    return Path(name).name == name and name not in ("", ".", "..")


def _files(value: Any) -> dict[str, dict[str, Any]]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError("'files' must be an object of file name -> {sha256, size}")
    out: dict[str, dict[str, Any]] = {}
    for name, entry in value.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            raise ValueError(f"'files'[{name!r}] must be an object with a string 'sha256'")
        size = entry.get("size")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"'files'[{name!r}] must have an integer 'size'")
        out[str(name)] = {"sha256": entry["sha256"], "size": size}
    return out


#: The output formats a template may give (appliance/formats: TEMPLATED).
TEMPLATE_FORMATS = ("html", "markdown", "text")


def _templates(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError("'templates' must be an object of format -> template file name")
    for fmt, file_name in value.items():
        if fmt not in TEMPLATE_FORMATS:
            raise ValueError(
                f"'templates' has unknown format {fmt!r} (one of {', '.join(TEMPLATE_FORMATS)})"
            )
        if not isinstance(file_name, str) or not is_plain_name(file_name):
            raise ValueError(f"'templates'[{fmt!r}] must be a plain file name")
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
    """Refuse a model file (or one of the version's further `files`, which lie beside it) whose
    size or sha256 no longer matches its manifest."""
    _verify_one(path, manifest, manifest.sha256, manifest.size)
    for name, entry in manifest.files.items():
        _verify_one(path.parent / name, manifest, entry["sha256"], entry["size"])


def _verify_one(path: Path, manifest: Manifest, sha256: str, expected_size: int) -> None:
    try:
        actual, size = sha256_file(path)
    except OSError as exc:
        raise ModelError(
            f"model {manifest.name!r} version {manifest.version}: "
            f"cannot read {path}: {exc.strerror}"
        ) from None
    if size != expected_size or actual != sha256:
        raise ModelError(
            f"model {manifest.name!r} version {manifest.version}: refusing to load {path}: "
            f"sha256 {actual} ({size} bytes) does not match the manifest's "
            f"{sha256} ({expected_size} bytes); the file was modified or corrupted"
        )
