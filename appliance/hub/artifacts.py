"""Model files behind one small interface, `ArtifactStore`; `LocalArtifacts` is a directory.

Keys are the hash-prefixed TUF target paths ("name/version/<sha256>.model.onnx"), already
checked against a strict pattern by the caller and checked again here, so a key never walks out
of the store. An S3-compatible store implements the same four methods (put = multipart upload,
read = ranged GET) and the device protocol does not change.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from ..errors import NotFound
from ..names import is_name


def check_key(key: str) -> str:
    """Every part of a key follows the name rule (appliance/names.py): no '..', no leading '.'."""
    if not all(is_name(p) for p in key.split("/")):
        raise NotFound(f"no artifact {key!r}")
    return key


class ArtifactStore(Protocol):
    def put_file(self, key: str, source: Path) -> None:
        """Store `source` under `key` atomically (readers never see half a file); consumes it."""

    def size(self, key: str) -> int | None:
        """The stored length, or None when there is no such artifact."""

    def read(self, key: str, start: int, end: int, chunk: int = 1 << 20) -> Iterator[bytes]:
        """Bytes [start, end) of the artifact, in chunks (blocking: run it in a thread)."""

    def delete(self, key: str) -> None: ...


class LocalArtifacts:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put_file(self, key: str, source: Path) -> None:
        final = self._path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=".upload.", suffix=".partial")
        os.close(fd)
        try:
            shutil.move(str(source), tmp)  # a rename when both lie on one filesystem
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)  # noqa: PTH101
            Path(tmp).replace(final)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        with contextlib.suppress(OSError):
            dfd = os.open(final.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

    def size(self, key: str) -> int | None:
        try:
            return self._path(key).stat().st_size
        except (FileNotFoundError, NotFound):
            return None

    def read(self, key: str, start: int, end: int, chunk: int = 1 << 20) -> Iterator[bytes]:
        with self._path(key).open("rb") as f:
            f.seek(start)
            left = end - start
            while left > 0:
                block = f.read(min(chunk, left))
                if not block:
                    return
                left -= len(block)
                yield block

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)
