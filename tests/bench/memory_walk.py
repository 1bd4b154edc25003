"""Part 2 of tests/bench/memory_breakdown.py, in a fresh interpreter: import the modules
`appliance serve` imported, in its order, with a meter on the import system (each module's own
RSS and anonymous-memory delta, its nested imports excluded), then make the floor's ONNX session.

    python tests/bench/memory_walk.py MODULES_TXT MODEL    (prints one JSON object)

It imports nothing before it measures but what the interpreter has loaded anyway.
"""

from __future__ import annotations

import os
import sys
from typing import Any

_PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


def statm() -> tuple[int, int]:
    """(RSS, anonymous RSS) of this process in KiB, cheap enough to read around every import."""
    with open("/proc/self/statm", "rb") as f:
        fields = f.read().split()
    rss, shared = int(fields[1]), int(fields[2])
    return rss * _PAGE_KIB, (rss - shared) * _PAGE_KIB


def walk(modules_file: str, model: str) -> None:
    """Import the modules with a meter on the import system, then make the floor's session."""
    start = statm()
    import _frozen_importlib as bootstrap  # the import system itself (importlib._bootstrap)
    import time

    own: dict[str, list[float]] = {}  # module -> [rss KiB, anon KiB, seconds], children excluded
    stack: list[list[float]] = []
    load = bootstrap._load_unlocked  # type: ignore[attr-defined]

    def metered(spec: Any) -> Any:
        # creating the module (dlopen of an extension) and running it, minus nested imports
        rss0, anon0 = statm()
        t0 = time.perf_counter()
        stack.append([0.0, 0.0, 0.0])
        try:
            return load(spec)
        finally:
            rss1, anon1 = statm()
            dt = time.perf_counter() - t0
            child = stack.pop()
            total = [rss1 - rss0, anon1 - anon0, dt]
            own[spec.name] = [t - c for t, c in zip(total, child, strict=True)]
            if stack:
                for i in range(3):
                    stack[-1][i] += total[i]

    bootstrap._load_unlocked = metered  # type: ignore[attr-defined]
    failed = []
    stages: list[tuple[str, tuple[int, int], int]] = []  # name, RSS then, modules then
    with open(modules_file) as f:
        names = [line.strip() for line in f if line.strip()]
    for name in names:
        if name.startswith("@"):  # a stage mark: the RSS so far, under that name
            stages.append((name[1:], statm(), len(own)))
            continue
        if name in sys.modules:
            continue
        try:
            __import__(name)
        except Exception:
            failed.append(name)
    bootstrap._load_unlocked = load  # type: ignore[attr-defined]
    after_imports = statm()

    import numpy as np
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    spec = session.get_inputs()[0]
    shape = [d if isinstance(d, int) and d > 0 else 1 for d in spec.shape]
    session.run(None, {spec.name: np.ones(shape, np.float32)})
    after_session = statm()
    import json

    print(
        json.dumps(
            {
                "start": start,
                "after_imports": after_imports,
                "after_session": after_session,
                "modules": own,
                "failed": failed,
                "stages": stages,
            }
        )
    )


if __name__ == "__main__":
    walk(sys.argv[1], sys.argv[2])
