"""The model store on disk: models/<name>/<version>/ (immutable) and models/<name>/ACTIVE.

ACTIVE is a small text file: the active version on its first line, then the versions that were
active before it, newest first (what `rollback` walks back through). It is replaced by
write-then-rename, so a crash leaves either the old or the new file, never half of one.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from . import names
from .backends import PLUGIN_OF, detect_backend, get_backend
from .errors import ModelError, NotFound, StoreFull, is_disk_full
from .manifest import MANIFEST_NAME, Manifest, check_steps, is_plain_name, sha256_file
from .tensors import Signature, TensorSpec

ACTIVE_NAME = names.ACTIVE_FILE
#: A stored pipeline's manifest backend and file (appliance/pipelines/served.py).
PIPELINE = "pipeline"
PIPELINE_FILE = "pipeline.json"
_READ_ONLY = stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH
_SEARCH = stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH


def check_name(value: str, what: str) -> str:
    """Names and versions become directory names: the one name rule (appliance/names.py)
    keeps them inside the store and off its own files. A ModelError: a store problem."""
    return names.check_name(value, what, ModelError)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be fsynced
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def store_full(exc: OSError, root: Path, what: str) -> StoreFull:
    """The error for a full disk under the store (the caller has already undone its part)."""
    return StoreFull(
        f"model store {root}: no space left on the device while {what}; nothing was changed "
        f"(free some space and try again): {exc.strerror or exc}"
    )


def atomic_write(path: Path, data: bytes) -> None:
    """Write a file so that readers see the old or the new content, never a mix."""
    import tempfile  # here, as below: only writing to the store needs it, serving does not

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide ACTIVE from a server run as another user
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


@dataclass(frozen=True)
class ModelVersion:
    manifest: Manifest
    directory: Path

    @property
    def file(self) -> Path:
        return self.directory / self.manifest.file


@dataclass(frozen=True)
class ModelEntry:
    name: str
    active: str | None
    history: tuple[str, ...]
    versions: tuple[str, ...]


def _version_key(v: str) -> tuple[int, int | str]:
    return (0, int(v)) if v.isdigit() else (1, v)


class Registry:
    """Reads and changes the store; every change is atomic on disk."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    # -- reading ---------------------------------------------------------------------------
    def model_dir(self, name: str) -> Path:
        return self.root / check_name(name, "model name")

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and names.is_name(p.name))

    def versions(self, name: str) -> list[str]:
        d = self.model_dir(name)
        if not d.is_dir():
            raise NotFound(f"model {name!r} is not in the store at {self.root}")
        found = [
            p.name
            for p in d.iterdir()
            if p.is_dir() and names.is_name(p.name) and (p / MANIFEST_NAME).is_file()
        ]
        return sorted(found, key=_version_key)

    def _read_active(self, name: str) -> list[str]:
        try:
            text = (self.model_dir(name) / ACTIVE_NAME).read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        return [line.strip() for line in text.splitlines() if line.strip()]

    def entry(self, name: str) -> ModelEntry:
        versions = self.versions(name)
        lines = self._read_active(name)
        active = lines[0] if lines else None
        return ModelEntry(name, active, tuple(lines[1:]), tuple(versions))

    def get(self, name: str, version: str) -> ModelVersion:
        directory = self.model_dir(name) / check_name(version, "version")
        path = directory / MANIFEST_NAME
        if not path.is_file():
            raise NotFound(f"model {name!r} has no version {version!r} in {self.root}")
        manifest = Manifest.read(path)
        if manifest.name != name or manifest.version != version:
            raise ModelError(
                f"{path}: manifest says {manifest.name!r} version {manifest.version!r}, "
                f"but it lives at {name}/{version}"
            )
        return ModelVersion(manifest, directory)

    def active(self, name: str) -> ModelVersion:
        lines = self._read_active(name)
        if not lines:
            raise NotFound(f"model {name!r} has no active version")
        return self.get(name, lines[0])

    # -- changing --------------------------------------------------------------------------
    def add(
        self,
        name: str,
        source: Path,
        version: str | None = None,
        activate: bool = True,
        backend: str | None = None,
        extra_files: Mapping[str, Path] | None = None,
        preprocess: dict[str, Any] | None = None,
        postprocess: dict[str, Any] | None = None,
        parameters: dict[str, Any] | None = None,
        steps: dict[str, Any] | None = None,
        templates: Mapping[str, Path] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> ModelVersion:
        """Copy a model file in as a new immutable version and (by default) activate it.

        `progress` is told the bytes of the model file copied so far (`models add` of big files).

        `extra_files` (name in the version -> source file: a tokenizer, a report) are copied
        beside it and hashed into the manifest's `files`; `parameters` go over the backend's.
        `preprocess` / `postprocess` / `steps` are written into the manifest (see
        appliance/steps/chain.py), checked against the model's inputs and outputs first: a
        step type nobody knows or a wrong declaration refuses the model, and nothing is kept.
        `templates` (output format -> a Jinja2 file: appliance/formats/templates.py) are stored
        as further files under their own names and compiled first, so a broken one is refused
        here."""
        check_name(name, "model name")
        try:
            steps = check_steps(steps)
        except ValueError as exc:
            raise ModelError(f"model {name!r}: {exc}") from None
        if not source.is_file():
            raise ModelError(f"{source}: no such file")
        extras = dict(extra_files or {})
        template_names = {}
        for fmt, template in (templates or {}).items():
            if extras.get(template.name, template) != template:
                raise ModelError(f"two different files would be stored as {template.name!r}")
            extras[template.name] = template
            template_names[fmt] = template.name
        for extra_name, extra_source in extras.items():
            if not is_plain_name(extra_name) or extra_name == MANIFEST_NAME:
                raise ModelError(f"invalid file name {extra_name!r} for a model version")
            if not extra_source.is_file():
                raise ModelError(f"{extra_source}: no such file")
        backend_name = backend or detect_backend(source)
        pipeline = backend_name == PIPELINE
        backend_cls = None if pipeline else get_backend(backend_name)
        if version is not None:
            check_name(version, "version")
        model_dir = self.model_dir(name)
        created = not model_dir.exists()
        model_dir.mkdir(parents=True, exist_ok=True)
        if version is None:
            numeric = [int(v) for v in self.versions(name) if v.isdigit()]
            version = str(max(numeric, default=0) + 1)
        final = model_dir / version
        if final.exists():
            raise ModelError(
                f"model {name!r} version {version!r} already exists: versions never change"
            )

        import tempfile

        staging = Path(tempfile.mkdtemp(dir=model_dir, prefix=f".{version}.", suffix=".partial"))
        try:
            file_name = f"model{source.suffix.lower()}" if source.suffix else "model"
            if pipeline:
                file_name = PIPELINE_FILE
            if file_name in extras:
                raise ModelError(f"{file_name!r} is the model file's own name in the version")
            target = staging / file_name
            if progress is None:
                shutil.copyfile(source, target)
            else:
                from .progress import copy_file

                copy_file(source, target, progress)
            digest, size = sha256_file(target)
            files: dict[str, dict[str, Any]] = {}
            for extra_name, extra_source in sorted(extras.items()):
                shutil.copyfile(extra_source, staging / extra_name)
                extra_digest, extra_size = sha256_file(staging / extra_name)
                files[extra_name] = {"sha256": extra_digest, "size": extra_size}
            try:
                params: dict[str, Any] = {}
                if backend_cls is None:
                    signature = self._check_pipeline(name, target)
                else:
                    signature, params = backend_cls.inspect(target)
            except ModelError as exc:  # name the user's file, not the staging copy
                raise ModelError(exc.message.replace(str(target), str(source))) from None
            except Exception as exc:  # a plugin's own bug: name the plugin
                if backend_cls not in PLUGIN_OF:
                    raise
                plugin, dist = PLUGIN_OF[backend_cls]
                raise ModelError(
                    f"backend {plugin!r} (plugin {dist!r}) cannot read {source}: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            manifest = Manifest(
                name=name,
                version=version,
                backend=backend_name,
                file=file_name,
                sha256=digest,
                size=size,
                signature=signature,
                created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                source=str(source.resolve()),
                parameters={**params, **(parameters or {})},
                preprocess=preprocess,
                postprocess=postprocess,
                steps=steps,
                files=files,
                templates=template_names,
            )
            Manifest.from_json(manifest.to_json(), f"model {name!r} version {version}")
            if template_names:
                from .config import FormatsConfig
                from .formats.templates import load_templates

                where = f"model {name!r} version {version}"
                load_templates(staging, template_names, FormatsConfig(), where)
            if manifest.processing != (None, None, None):
                from .config import ModelConfig
                from .steps.chain import build_chain

                build_chain(manifest, signature, {}, ModelConfig())
            (staging / MANIFEST_NAME).write_bytes(
                orjson.dumps(manifest.to_json(), option=orjson.OPT_INDENT_2)
            )
            for f in staging.iterdir():
                with f.open("rb") as fh:
                    os.fsync(fh.fileno())
                f.chmod(_READ_ONLY)
            staging.chmod(_READ_ONLY | _SEARCH)  # mkdtemp's 0700 -> r-x for all, like the files
            staging.rename(final)
            _fsync_dir(model_dir)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                staging.chmod(stat.S_IRWXU)
            shutil.rmtree(staging, ignore_errors=True)
            if created:  # a failed first add leaves no empty model behind
                with contextlib.suppress(OSError):
                    model_dir.rmdir()
            if isinstance(exc, OSError) and is_disk_full(exc):
                raise store_full(exc, self.root, f"adding {name} version {version}") from exc
            raise
        if activate:
            self.activate(name, version)
        return ModelVersion(manifest, final)

    def add_pipeline(
        self, name: str, source: Path, version: str | None = None, activate: bool = True
    ) -> ModelVersion:
        """Store a pipeline declaration as a version, like a model (so the hub rolls it out):
        checked first (its steps, its wiring, and its models' signatures where the store
        has them), with the template files it names copied beside it."""
        if not source.is_file():
            raise ModelError(f"{source}: no such file")
        try:
            doc = orjson.loads(source.read_bytes())
        except orjson.JSONDecodeError as exc:
            raise ModelError(f"pipeline {name!r}: {source} is not valid JSON: {exc}") from None
        templates = doc.get("templates") if isinstance(doc, dict) else None
        extras: dict[str, Path] = {}
        if isinstance(templates, dict):
            for fmt, file_name in templates.items():
                if not isinstance(file_name, str) or not is_plain_name(file_name):
                    raise ModelError(
                        f"pipeline {name!r}: templates.{fmt}: a file name beside the "
                        f"declaration, got {file_name!r}"
                    )
                extras[file_name] = source.parent / file_name
        return self.add(name, source, version, activate, backend=PIPELINE, extra_files=extras)

    def _check_pipeline(self, name: str, path: Path) -> Signature:
        """The declaration checked, and bound to the store's models where it has them."""
        from .pipelines.declaration import bind
        from .pipelines.served import read_declaration

        decl = read_declaration(path, name)

        def lookup(model: str, pin: str | None) -> tuple[str, Signature] | None:
            try:
                mv = self.get(model, pin) if pin is not None else self.active(model)
            except (ModelError, NotFound):
                return None
            if mv.manifest.backend == PIPELINE or not mv.manifest.signature.inputs:
                return None
            return mv.manifest.version, mv.manifest.signature

        return bind(decl, lookup, strict=False).signature

    def activate(self, name: str, version: str) -> None:
        self.get(name, version)  # must exist and have a readable manifest
        lines = self._read_active(name)
        if lines and lines[0] == version:
            return
        history = [v for v in lines if v != version]
        try:
            atomic_write(
                self.model_dir(name) / ACTIVE_NAME,
                ("\n".join([version, *history]) + "\n").encode(),
            )
        except OSError as exc:
            if is_disk_full(exc):
                raise store_full(exc, self.root, f"activating {name} version {version}") from exc
            raise

    def rollback(self, name: str) -> str:
        """Re-activate the version that was active before the current one."""
        lines = self._read_active(name)
        if not lines:
            raise ModelError(f"model {name!r} has no active version to roll back from")
        existing = set(self.versions(name))
        previous = [v for v in lines[1:] if v in existing]
        if not previous:
            raise ModelError(f"model {name!r}: no earlier version to roll back to")
        try:
            atomic_write(self.model_dir(name) / ACTIVE_NAME, ("\n".join(previous) + "\n").encode())
        except OSError as exc:
            if is_disk_full(exc):
                raise store_full(exc, self.root, f"rolling {name} back") from exc
            raise
        return previous[0]

    def remove(self, name: str, version: str) -> None:
        """Delete a version that is not active (rename away first, so it vanishes at once)."""
        entry = self.entry(name)
        check_name(version, "version")
        if version not in entry.versions:
            raise NotFound(f"model {name!r} has no version {version!r}")
        if entry.active == version:
            raise ModelError(
                f"model {name!r} version {version!r} is active: activate another version "
                "or roll back first"
            )
        model_dir = self.model_dir(name)
        import tempfile

        trash = Path(tempfile.mkdtemp(dir=model_dir, prefix=f".{version}.", suffix=".trash"))
        # moving a directory to another parent rewrites its '..': it must be writable
        (model_dir / version).chmod(stat.S_IRWXU)
        (model_dir / version).rename(trash / version)
        _fsync_dir(model_dir)
        lines = [v for v in self._read_active(name) if v != version]
        if lines:
            atomic_write(model_dir / ACTIVE_NAME, ("\n".join(lines) + "\n").encode())
        for root, dirs, _files in os.walk(trash):
            for d in dirs:
                (Path(root) / d).chmod(stat.S_IRWXU)
        shutil.rmtree(trash, ignore_errors=True)


def describe(signature: Signature) -> str:
    """One line such as `input:FP32[-1, 4] -> probabilities:FP32[-1, 3]` for the CLI."""

    def one(t: TensorSpec) -> str:
        return f"{t.name}:{t.datatype}{list(t.shape)}"

    return (
        ", ".join(one(t) for t in signature.inputs)
        + " -> "
        + ", ".join(one(t) for t in signature.outputs)
    )
