"""The soak's CI variant: 60 s of mixed load with a rollout, a broker restart and a hub restart
(tests/soak/soak.py; `make soak` runs 30 min). No QoS 1 request lost, no telemetry gap, no
failed HTTP or SSE request, RSS within 5 % of its post-warm-up level, fds and threads flat."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.soak.soak import soak
from tests.support.mosquitto import require_tool

SECONDS = float(os.environ.get("SOAK_CI_SECONDS", 60))


@pytest.mark.soak
def test_a_minute_of_mixed_load_loses_nothing_and_leaks_nothing(
    tmp_path: Path, samples: Path, gguf_models: Path
) -> None:
    require_tool("mosquitto")
    summary = soak(SECONDS, tmp_path / "soak", samples, gguf_models / "tiny-llama-q8_0.gguf")
    print(json.dumps({k: v for k, v in summary.items() if k != "events"}, indent=1))
    assert summary["mqtt"]["lost"] == 0 and summary["mqtt"]["sent"] > 0
    assert summary["telemetry"]["gaps"] == 0 and summary["telemetry"]["duplicates"] == 0
    assert all(summary["loads"][k]["ok"] > 0 for k in ("fast", "aiohttp", "sse", "mqtt"))
    assert any("rollout" in e for _, e in summary["events"])
    assert any("broker started" in e for _, e in summary["events"])
    assert any("hub started" in e for _, e in summary["events"])
    assert summary["failures"] == [], summary["failures"]
    assert (tmp_path / "soak" / "soak.svg").read_text().startswith("<svg")
