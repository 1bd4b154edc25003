"""The server's side of an isolated model, driven directly (a real worker process behind it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from appliance.backends.base import LoadContext
from appliance.config import ModelConfig
from appliance.errors import InferenceFailed
from appliance.isolation.proxy import IsolatedTextBackend, start
from appliance.llm import Generation
from appliance.registry import Registry


def test_an_abandoned_stream_leaves_the_channel_clean(plugin: None, tmp_path: Path) -> None:
    f = tmp_path / "ticking.bin"
    f.write_bytes(b"fine")
    store = Registry(tmp_path / "models")
    mv = store.add("ticking", f, backend="ticking")
    backend = start(mv.manifest, mv.file, LoadContext(ModelConfig(), tmp_path / "cache"), None)
    try:
        assert isinstance(backend, IsolatedTextBackend) and backend.mode == "chat"
        pieces: list[str] = []

        def emit(text: str) -> None:  # the consumer fails mid-stream (its loop closed, say)
            pieces.append(text)
            if len(pieces) == 3:
                raise RuntimeError("gone")

        with pytest.raises(RuntimeError, match="gone"):
            backend.generate(Generation("completion", prompt="x"), emit, lambda: False)
        # the next call on the same (only) channel reads its own answer, not the stream's
        out = backend.run({"x": np.array([1.0, 2.0], np.float32)}, None)
        assert out["y"].tolist() == [2.0, 4.0]
        assert backend.supervisor._worker is not None and not backend.supervisor._worker.dead
    finally:
        backend.unload()


def test_outputs_the_protocol_cannot_carry_fail_that_call_only(
    plugin: None, tmp_path: Path
) -> None:
    from tests.support.plugins.appliance_crashy import UNSENDABLE

    f = tmp_path / "crashy.bin"
    f.write_bytes(b"fine")
    mv = Registry(tmp_path / "models").add("crashy", f, backend="crashy")
    backend = start(mv.manifest, mv.file, LoadContext(ModelConfig(), tmp_path / "cache"), None)
    try:
        with pytest.raises(InferenceFailed, match="outputs cannot be sent"):
            backend.run({"x": np.array([UNSENDABLE], np.float32)}, None)
        assert backend.run({"x": np.array([1.0], np.float32)}, None)["y"].tolist() == [2.0]
    finally:
        backend.unload()


def test_calls_made_on_the_event_loop_run_at_its_priority_the_others_lower(
    plugin: None, tmp_path: Path
) -> None:
    """An inline run holds the event loop until the worker answers: the worker's thread for it
    keeps the loop's CPU priority; queued work runs `worker_nice` steps lower, as in-process."""
    import asyncio
    import os

    from tests.support.plugins.appliance_crashy import NICE

    f = tmp_path / "crashy.bin"
    f.write_bytes(b"fine")
    mv = Registry(tmp_path / "models").add("crashy", f, backend="crashy")
    ours = os.getpriority(os.PRIO_PROCESS, 0)
    config = ModelConfig(worker_nice=3)
    backend = start(mv.manifest, mv.file, LoadContext(config, tmp_path / "cache"), None)
    nice = {"x": np.array([NICE], np.float32)}
    try:

        async def on_the_loop() -> float:
            return float(backend.run(nice, None)["y"][0])

        for _ in range(2):  # the same channel again, and its thread kept its priority
            assert asyncio.run(on_the_loop()) == ours
            assert backend.run(nice, None)["y"][0] == min(19, ours + 3)
        worker = backend.supervisor._worker
        assert worker is not None
        assert len(worker.channels) == worker.pooled + 1
    finally:
        backend.unload()
