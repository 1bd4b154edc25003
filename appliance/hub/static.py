"""The hub's TUF repository as plain files, for any HTTP server, CDN or LAN cache to serve.

TUF makes mirrors untrusted: a device verifies every file it takes from one, so the files can
sit anywhere. Layout (TUF consistent snapshots, the same paths as the hub's /tuf/ routes):

    DIR/metadata/N.root.json       every root version (a device walks the chain N -> N+1)
    DIR/metadata/N.targets.json    the kept versions (repository.KEEP_VERSIONS)
    DIR/metadata/N.snapshot.json
    DIR/metadata/timestamp.json    the only file whose content changes: written last
    DIR/targets/NAME/VERSION/<sha256>.<file>   hash-prefixed: a path never changes content

One export is one consistent snapshot: it starts from the newest timestamp, takes exactly the
snapshot version that timestamp names and the targets version that snapshot names, and copies
the files that targets version lists. Each file is written to a temporary name and renamed, so a
server never hands out half a file, and timestamp.json comes last, so whatever it names is in
place before any device can ask for it. Versioned files are written once (the store refuses a
second body under one version), which is what lets a mirror cache them for ever.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuf.api.metadata import Metadata, Snapshot, Targets, Timestamp
from tuf.api.serialization import DeserializationError

from ..errors import ConfigError
from .artifacts import ArtifactStore, check_key
from .repository import KEEP_VERSIONS
from .storage import HubStore

log = logging.getLogger("appliance.hub.static")

_VERSIONED = re.compile(r"^([1-9][0-9]{0,17})\.(root|targets|snapshot)\.json$")


@dataclass
class Export:
    """What one export wrote (files skipped because they were there already are not listed)."""

    timestamp_version: int
    snapshot_version: int
    targets_version: int
    root_version: int
    written: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_atomic(path: Path, chunks: Iterator[bytes]) -> None:
    """Readable by the web server (0644), complete or absent under its final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".export.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # noqa: PTH101
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _load(body: bytes, cls: type[Any], what: str) -> Metadata[Any]:
    md: Metadata[Any] = Metadata.from_bytes(body)
    if not isinstance(md.signed, cls):
        raise ConfigError(f"stored {what} holds a {type(md.signed).__name__}")
    return md


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """One writer at a time (the serving hub and a manual `hub export-static`): two writers
    could otherwise leave an older timestamp.json last."""
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / ".export.lock").open("a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _current(store: HubStore) -> tuple[bytes, bytes, bytes, int, int]:
    """timestamp, snapshot and targets bytes that belong together, with their versions.

    Read outside a transaction: a publish in between can prune the snapshot this timestamp
    names (after KEEP_VERSIONS publishes), so the caller retries with the newer timestamp."""
    found = store.latest_metadata("timestamp")
    if found is None:
        raise ConfigError("the hub has no TUF metadata: run `appliance hub init` first")
    ts_body = found[1]
    ts = _load(ts_body, Timestamp, "timestamp")
    snap_version = int(ts.signed.snapshot_meta.version)
    snap_body = store.metadata("snapshot", snap_version)
    if snap_body is None:
        raise LookupError(f"snapshot version {snap_version}")
    snap = _load(snap_body, Snapshot, "snapshot")
    targets_version = int(snap.signed.meta["targets.json"].version)
    targets_body = store.metadata("targets", targets_version)
    if targets_body is None:
        raise LookupError(f"targets version {targets_version}")
    return ts_body, snap_body, targets_body, snap_version, targets_version


def export_static(store: HubStore, artifacts: ArtifactStore, directory: Path) -> Export:
    """Bring `directory` up to the hub's current metadata and targets; returns what changed."""
    with _locked(directory):
        for _ in range(5):
            try:
                ts_body, snap_body, targets_body, snap_v, targets_v = _current(store)
                break
            except LookupError as exc:
                log.info("metadata changed while exporting (%s pruned): reading again", exc)
        else:
            raise ConfigError("the hub's metadata keeps changing: static export gave up")
        meta_dir, target_dir = directory / "metadata", directory / "targets"
        ts = _load(ts_body, Timestamp, "timestamp")
        targets = _load(targets_body, Targets, "targets")
        latest_root = store.latest_metadata("root")
        assert latest_root is not None
        out = Export(int(ts.signed.version), snap_v, targets_v, latest_root[0])

        # 1. Target files: hash-prefixed, so one already there with the signed length is taken
        # for the same file (one damaged in place fails the devices' hash check: delete it and
        # the next export copies it again).
        for path, info in sorted(targets.signed.targets.items()):
            directory_part, _, basename = path.rpartition("/")
            key = check_key(f"{directory_part}/{info.hashes['sha256']}.{basename}")
            final = target_dir / key
            if final.is_file() and final.stat().st_size == info.length:
                continue
            size = artifacts.size(key)
            if size is None:
                raise ConfigError(f"target {path} is signed but missing from the artifact store")
            chunks = artifacts.read(key, 0, size)
            try:
                _write_atomic(final, chunks)
            finally:
                chunks.close()  # type: ignore[attr-defined]
            out.written.append(f"targets/{key}")

        # 2. Versioned metadata, never rewritten: every root (the chain), then targets and
        # snapshot. A body that differs from the store's (a hub restored from an older
        # backup) is replaced, and said.
        def put(name: str, body: bytes) -> None:
            final = meta_dir / name
            with contextlib.suppress(FileNotFoundError):
                if final.read_bytes() == body:
                    return
                if name != "timestamp.json":
                    log.warning("static %s differed from the hub's: replaced", name)
            _write_atomic(final, iter([body]))
            out.written.append(f"metadata/{name}")

        for version in range(1, latest_root[0] + 1):
            body = store.metadata("root", version)
            if body is not None:
                put(f"{version}.root.json", body)
        put(f"{targets_v}.targets.json", targets_body)
        put(f"{snap_v}.snapshot.json", snap_body)

        # 3. timestamp.json last, and never an older one over a newer one.
        ts_path = meta_dir / "timestamp.json"
        there = 0
        with contextlib.suppress(OSError, DeserializationError):
            there = int(Metadata.from_bytes(ts_path.read_bytes()).signed.version)
        if there <= out.timestamp_version:
            put("timestamp.json", ts_body)

        # 4. Versions a device can no longer be sent to (the hub keeps the same window).
        for f in meta_dir.iterdir():
            m = _VERSIONED.match(f.name)
            if m is None or m.group(2) == "root":
                continue
            newest = snap_v if m.group(2) == "snapshot" else targets_v
            if int(m.group(1)) <= newest - KEEP_VERSIONS:
                f.unlink(missing_ok=True)
                out.removed.append(f"metadata/{f.name}")
        return out
