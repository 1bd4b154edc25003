"""The model under test: which file, under which name, loaded as the server loads it, and its bare
runtime call (the floor no server can beat)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ModelError

if TYPE_CHECKING:
    import numpy as np

    from ..backends.base import Backend
    from ..config import Config
    from ..engine import ModelSource

    Array = np.ndarray[Any, Any]


@dataclass
class Target:
    """What is benchmarked: the file the server is given and the name it serves it under."""

    name: str
    file: Path
    source: ModelSource


def resolve_model(spec: str, config: Config) -> Target:
    """A model file, or else the active version of a model in the store."""
    from ..engine import ModelSource
    from ..errors import NotFound
    from ..registry import Registry
    from ..server import source_from_file

    path = Path(spec)
    if path.is_file():
        src = source_from_file(path)
        return Target(src.manifest.name, path, src)
    store = Path(config.store.path)
    registry = Registry(store)
    known = spec in registry.names()
    try:
        mv = registry.active(spec)
    except (NotFound, ModelError) as exc:
        if not known:
            raise ModelError(
                f"{spec}: no such model file, and no model of that name in the store at {store}"
            ) from None
        raise ModelError(f"{spec}: {exc.message}") from None
    return Target(mv.manifest.name, mv.file, ModelSource(mv.manifest, mv.file))


def load_backend(target: Target, config: Config) -> Backend:
    """The model loaded exactly as the server loads it: same backend, same effective settings."""
    from ..backends import get_backend
    from ..backends.base import LoadContext

    cls = get_backend(target.source.manifest.backend)
    context = LoadContext(config.model_config(target.name), Path(config.store.path) / ".cache")
    return cls(target.source.manifest, target.file, context)


def raw_call(backend: Backend, inputs: dict[str, Array]) -> tuple[Callable[[], Any], list[str]]:
    """The bare runtime call (ONNX `session.run`, LiteRT's interpreter), and the names of the
    outputs it returns."""
    session = getattr(backend, "session", None)
    if backend.name == "onnx" and session is not None:
        run = session.run
        names = [o.name for o in session.get_outputs()]
        return (lambda: run(None, inputs)), names
    bare = getattr(backend, "bare_call", None)
    if backend.name == "tflite" and bare is not None:
        call: tuple[Callable[[], Any], list[str]] = bare(inputs)
        return call
    names = [t.name for t in backend.signature.outputs]
    return (lambda: list(backend.run(inputs, None).values())), names
