"""An isolated model's worker threads, served by the engine: queued runs at `worker_nice` steps
below the event loop (as an in-process model's inference threads), inline runs, which hold the
loop until they are answered, at the loop's own priority (the worker's loop channel)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from appliance.registry import Registry
from tests.support.plugins.appliance_crashy import NICE

from .conftest import add_crashy

NICE_REQUEST = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [NICE]}]}


async def test_queued_runs_are_lowered_once_and_inline_runs_keep_the_loop_s_priority(
    plugin: None, serve: Any, store: Registry, tmp_path: Path
) -> None:
    add_crashy(store, tmp_path, "crashy")
    # a generous inline budget: the runs measured decide nothing here, only where they ran
    overrides = {"models": {"crashy": {"isolation": "process", "worker_nice": 4,
                                       "inline_max_us": 1e6}}}  # fmt: skip
    client = await serve(overrides)
    loop_nice = os.getpriority(os.PRIO_PROCESS, 0)
    seen = []
    for _ in range(20):  # the first 16 are measured on the engine's threads, then inline
        r = await client.post("/v2/models/crashy/infer", json=NICE_REQUEST)
        assert r.status == 200
        seen.append((await r.json())["outputs"][0]["data"][0])
    lowered = min(19, loop_nice + 4)
    assert seen[0] == lowered  # lowered once (by the worker), not again by the loading thread
    assert seen[-1] == loop_nice
    assert set(seen) == {lowered, loop_nice}
