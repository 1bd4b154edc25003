"""The first load of a model file happens in a throwaway worker process.

Runtimes have crashed on malformed files (llama.cpp's GGUF parser, onnxruntime's graph
loader); loading an untrusted file first in a child means such a crash kills the child, and
the server reports a load failure naming the signal instead of dying. A file that loaded once
is remembered by its sha256 (a marker in the cache directory), so a restart does not pay again.
The probe loads on the CPU with one instance: it checks the file, not the accelerator.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from pathlib import Path

from ..backends.base import LoadContext
from ..errors import ModelError
from ..manifest import Manifest

log = logging.getLogger("appliance.isolation")

#: How long the test load may take.
PROBE_TIMEOUT_S = 300.0
_SHA256 = re.compile(r"[0-9a-f]{64}")


def marker(manifest: Manifest, cache_dir: Path) -> Path | None:
    """Where the passed probe of this content is remembered (None: unhashed, never)."""
    if not _SHA256.fullmatch(manifest.sha256):
        return None
    return cache_dir / "probed" / manifest.sha256


def remember(manifest: Manifest, cache_dir: Path) -> None:
    """Record that this content loaded in a child process. The cache lies in the model store:
    where there is none (`serve --model FILE` without one), nothing is written, and the file
    is probed again at the next start."""
    path = marker(manifest, cache_dir)
    if path is not None and cache_dir.parent.is_dir():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
        except OSError as exc:  # a read-only cache costs a probe at the next start, no more
            log.warning("cannot record the probe of %s: %s", manifest.file, exc.strerror)


def probe_once(manifest: Manifest, path: Path, context: LoadContext) -> None:
    """`probe`, unless this content (by sha256) passed it before."""
    done = marker(manifest, context.cache_dir)
    if done is not None and done.exists():
        return
    probe(manifest, path, context)
    remember(manifest, context.cache_dir)


def probe(manifest: Manifest, path: Path, context: LoadContext) -> None:
    """Load the file once in a worker process; ModelError if that fails or crashes."""
    # here: a restart that finds the marker spawns nothing, so needs not the worker's modules
    from .process import WorkerProcess, describe_exit, load_call

    what = f"model {manifest.name!r} version {manifest.version}"
    cfg = context.config
    cfg = dataclasses.replace(cfg, device="cpu", gguf=dataclasses.replace(cfg.gguf, instances=1))
    t0 = time.perf_counter()
    worker = WorkerProcess.spawn(f"{manifest.name}/{manifest.version}")
    try:
        worker.load(load_call(manifest, path, cfg, context.cache_dir), lambda _: 1,
                    PROBE_TIMEOUT_S)  # fmt: skip
    except ModelError:
        rc = worker.returncode
        if rc is not None and rc < 0:
            limited = (
                f" (its memory limited to {cfg.max_memory_mb} MiB by max_memory_mb)"
                if cfg.max_memory_mb
                else ""
            )
            raise ModelError(
                f"{what}: the {manifest.backend} runtime {describe_exit(rc)} while loading "
                f"{path.name} in a test process{limited}; refusing to load it into the server"
            ) from None
        raise
    finally:
        worker.stop(5.0)
    log.info(
        "model %s version %s: %s loaded in a test process first (%.3f s)",
        manifest.name,
        manifest.version,
        path.name,
        time.perf_counter() - t0,
    )
