"""A new version's error watch counts every request it answers from the switch on.

`Engine.activate` switches to the new version, then drains the old one, which waits for what
the old version still runs. The sync agent's watch must count the requests the new version
answers meanwhile: here the old version is held busy on purpose, the new one fails every
request during the drain, and the watch must roll it back. (CI once saw the same race with the
ACTIVE write's thread hop: those errors were in the watch's baseline, and nothing rolled back.)
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from appliance.codec import InferRequest
from appliance.config import Config, HubConfig, StoreConfig
from appliance.engine import Engine, ModelSource
from appliance.errors import ApplianceError
from appliance.metrics import Metrics
from appliance.registry import Registry
from appliance.sync.agent import SyncAgent
from appliance.sync.client import Assignment
from tests.sync.conftest import batch_failure


async def _until(what: str, check: Any, timeout_s: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def test_errors_during_the_old_versions_drain_are_watched(
    samples: Path, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    registry = Registry(store)
    registry.add("sample", samples / "sample.onnx", "1", activate=True)
    two = registry.add(
        "sample", batch_failure(samples / "sample.onnx", tmp_path / "b.onnx"), "2", activate=False
    )
    (tmp_path / "token").write_text("device-token\n")
    (tmp_path / "root.json").write_text("{}")  # never read: this agent never polls the hub
    config = Config(
        store=StoreConfig(path=str(store)),
        hub=HubConfig(
            url="http://127.0.0.1:9",
            token_file=str(tmp_path / "token"),
            root_file=str(tmp_path / "root.json"),
            min_requests=3,
            error_rate_threshold=0.5,
        ),
    )
    metrics = Metrics()
    one = registry.active("sample")
    engine = Engine(config, metrics, [ModelSource(one.manifest, one.file)], store / ".cache")
    await engine.start()
    agent = SyncAgent(config, engine, registry, metrics)
    busy, release = threading.Event(), threading.Event()
    try:
        old = engine.model_or_none("sample")
        assert old is not None and old.runner is not None and old.version == "1"

        def hold(backend: Any, cancelled: Any) -> None:
            busy.set()
            release.wait(30)

        held = asyncio.ensure_future(old.runner.call(hold, 60.0))
        assert await asyncio.to_thread(busy.wait, 10)
        activating = asyncio.ensure_future(
            agent._activate(
                Assignment("sample", "2", "sample/2", "r1"),
                ModelSource(two.manifest, two.file),
                {"acceptance": []},  # the smoke inference (one item) passes
                two.manifest.sha256,
            )
        )

        def serving() -> str | None:
            model = engine.model_or_none("sample")
            return model.version if model is not None else None

        await _until("version 2 serving", lambda: serving() == "2")
        assert not activating.done()  # still draining version 1
        new = engine.model_or_none("sample")
        assert new is not None
        pair = InferRequest(inputs={"input": np.full((2, 4), 0.5, np.float32)})
        for _ in range(4):
            with pytest.raises(ApplianceError):
                await engine.infer_on(new, pair)
        release.set()
        await held
        await activating
        assert agent.watches["sample"].version == "2"
        await agent._check_watches()
        assert serving() == "1"
        assert agent.updates["rolled_back"] == 1
        assert ("sample", "2") in agent.rejected
    finally:
        release.set()
        await agent.stop()
        await engine.stop()
