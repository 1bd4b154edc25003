"""Crash isolation: a model served from a worker process of its own (`isolation = "process"`),
and the first load of every model file tried in a throwaway one (`probe_first_load`).

`load_backend` is the engine's one entry: it returns a `Backend` either way, so the engine and
its scheduler treat an isolated model as any other.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .. import backends
from ..backends.base import Backend, LoadContext
from ..manifest import Manifest

#: Told ("restarting", reason) when an isolated model's worker died, ("ready", None) once a
#: new one serves; called from the supervising thread.
StateHook = Callable[[str, "str | None"], None]


def load_backend(
    manifest: Manifest, path: Path, context: LoadContext, on_state: StateHook | None = None
) -> Backend:
    """Load a model as its settings say: in a worker process, or in this one (after a probe
    in a child process the first time this file is seen)."""
    from .probe import probe_once, remember

    if context.config.isolation == "process":
        from .proxy import start

        backend = start(manifest, path, context, on_state)
        remember(manifest, context.cache_dir)  # it loaded in a child: that was the probe
        return backend
    if context.config.probe_first_load:
        probe_once(manifest, path, context)
    return backends.load(manifest, path, context)
