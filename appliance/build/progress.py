"""Progress for long build steps: a ticking line (tqdm) on a terminal, start/done lines in logs."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

T = TypeVar("T")


def say(message: str) -> None:
    print(f"[build] {message}", file=sys.stderr, flush=True)


def _tqdm() -> Any:
    try:
        from tqdm import tqdm  # type: ignore[import-untyped]
    except ImportError:  # progress is a nicety: plain lines without it
        return None
    return tqdm


@contextmanager
def step(what: str) -> Iterator[None]:
    """Announce a step, tick its elapsed time while it runs (on a terminal), report its time."""
    tqdm = _tqdm() if sys.stderr.isatty() else None
    start = time.perf_counter()
    if tqdm is None:
        say(f"{what} ...")
        yield
    else:
        bar = tqdm(total=None, desc=f"[build] {what}", bar_format="{desc} {elapsed}", leave=False)
        done = threading.Event()

        def tick() -> None:
            while not done.wait(0.5):
                bar.refresh()

        ticker = threading.Thread(target=tick, daemon=True)
        ticker.start()
        try:
            yield
        finally:
            done.set()
            ticker.join()
            bar.close()
    say(f"{what}: done in {time.perf_counter() - start:.1f} s")


def items(iterable: Iterable[T], what: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a progress bar on a terminal (validation over many sentences)."""
    tqdm = _tqdm() if sys.stderr.isatty() else None
    if tqdm is None:
        yield from iterable
        return
    yield from tqdm(iterable, desc=f"[build] {what}", total=total, leave=False)


def run_tool(cmd: Sequence[str], what: str, env: dict[str, str] | None = None) -> str:
    """Run a build tool as a step; its output is kept and shown only if it fails."""
    with step(what):
        done = subprocess.run(list(cmd), capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-30:])
        raise ToolFailed(f"{what} failed (exit {done.returncode}):\n{tail}")
    return done.stdout


class ToolFailed(RuntimeError):
    """A build tool ran and failed."""
