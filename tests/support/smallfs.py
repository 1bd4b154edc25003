"""A small real filesystem for disk-full tests: a tmpfs of a few MiB mounted for one test
(we run as root in CI), filled to the last byte on demand and freed again.

Skips, saying why, where mounting is not permitted (no root, a container without
CAP_SYS_ADMIN)."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

FILLER = ".filler"


class SmallFs:
    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def free_bytes(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def fill(self) -> None:
        """Write a filler file until the filesystem says ENOSPC: every later write fails."""
        fd = os.open(self.path / FILLER, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        block = b"\0" * 65536
        try:
            while True:
                try:
                    os.write(fd, block)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    if len(block) == 1:
                        break
                    block = block[: len(block) // 2]
        finally:
            os.close(fd)
        assert self.free_bytes == 0

    def free(self) -> None:
        """Space returns (the operator deleted something)."""
        (self.path / FILLER).unlink(missing_ok=True)


@contextlib.contextmanager
def small_fs(where: Path, size: str = "8m") -> Iterator[SmallFs]:
    """A tmpfs of `size` mounted at `where` for the duration (unmounted after, lazily if a
    process still holds a file there)."""
    where.mkdir(parents=True, exist_ok=True)
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {mount.stderr.strip()}")
    try:
        yield SmallFs(where)
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)
