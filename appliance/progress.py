"""Progress of long byte transfers (uploads, copies, downloads): a tqdm bar on a terminal, plain
lines at a bounded rate otherwise (logs, CI, systemd's journal).

Light on purpose: the device imports it on its sync path, so tqdm is imported only when a bar
is really drawn, and is optional (no tqdm: plain lines on a terminal too).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

#: A transfer below this size shows no progress at all from the CLI (it is over in a blink).
MIN_BYTES = 16 << 20


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover (the loop returns)


def describe(what: str, done: int, total: int | None, elapsed: float) -> str:
    """One plain progress line: `what: 40 % (3.2 MiB of 8.0 MiB, 12.1 MiB/s)`."""
    rate = f"{human(done / elapsed)}/s" if elapsed > 0 else "-"
    if total:
        return f"{what}: {100 * done // total} % ({human(done)} of {human(total)}, {rate})"
    return f"{what}: {human(done)} ({rate})"


class Throttle:
    """When a plain line is due: `step` of the total more done (at most one line per
    `min_s`), or `max_s` since the last line while bytes still move; always at the end."""

    def __init__(
        self,
        total: int | None,
        step: float = 0.1,
        min_s: float = 1.0,
        max_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = total
        self.step = step
        self.min_s = min_s
        self.max_s = max_s
        self.clock = clock
        self.start = clock()
        self._at = self.start
        self._done = 0
        self.finished = False

    def due(self, done: int) -> bool:
        if self.finished:
            return False
        now = self.clock()
        if self.total is not None and done >= self.total:
            self.finished = True
        elif done <= self._done:
            return False
        else:
            waited = now - self._at
            grown = self.total and (done - self._done) >= self.step * self.total
            if not (waited >= self.max_s or (grown and waited >= self.min_s)):
                return False
        self._at, self._done = now, done
        return True

    @property
    def elapsed(self) -> float:
        return self.clock() - self.start


def _tqdm() -> Any:
    try:
        from tqdm import tqdm  # type: ignore[import-untyped]
    except ImportError:
        return None
    return tqdm


class Progress:
    """Bytes done of one transfer for a command line tool; call it with the bytes done so far.

    On a terminal with tqdm installed: a bar; otherwise lines through `Throttle` on `stream`.
    Below `min_bytes` nothing is shown."""

    def __init__(
        self,
        what: str,
        total: int | None,
        stream: TextIO | None = None,
        min_bytes: int = MIN_BYTES,
    ) -> None:
        self.what = what
        self.total = total
        self.stream = stream or sys.stderr
        self.quiet = total is not None and total < min_bytes
        self.throttle = Throttle(total)
        self.bar: Any = None
        self._done = 0
        tqdm = None if self.quiet or not self.stream.isatty() else _tqdm()
        if tqdm is not None:
            self.bar = tqdm(
                total=total, desc=what, unit="B", unit_scale=True, unit_divisor=1024,
                file=self.stream, leave=True,
            )  # fmt: skip

    def __call__(self, done: int) -> None:
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.update(done - self._done)
        elif self.throttle.due(done):
            line = describe(self.what, done, self.total, self.throttle.elapsed)
            print(line, file=self.stream, flush=True)
        self._done = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def copy_file(
    source: Path, target: Path, progress: Callable[[int], None], chunk: int = 1 << 20
) -> int:
    """Copy `source` to `target` in chunks, reporting the bytes copied; returns the size."""
    done = 0
    with source.open("rb") as src, target.open("wb") as out:
        while block := src.read(chunk):
            out.write(block)
            done += len(block)
            progress(done)
    return done
