"""`appliance bench --isolation`: in-process and isolated side by side, run very briefly.

Only the shape and sanity of the figures are checked, never a speed: a loaded CI machine must not
fail this. The figures themselves come from a real run (see the isolation branch's report)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from appliance.bench.isolation import _env_key
from appliance.bench.options import parse_levels
from appliance.errors import ConfigError
from tests.bench.test_bench import appliance


def test_isolation_bench_smoke(samples: Path) -> None:
    proc = appliance(
        "bench", str(samples / "sample.onnx"), "--isolation", "1,4", "--requests", "40",
        "--warmup", "4", "--rounds", "1", "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    f = json.loads(proc.stdout)
    assert sorted((r["concurrency"], r["mode"]) for r in f["runs"]) == [
        (1, "in-process"), (1, "isolated"), (4, "in-process"), (4, "isolated"),
    ]  # fmt: skip
    for r in f["runs"]:
        assert r["rps"] > 0 and 0 < r["p50_us"] <= r["p99_us"]
    assert set(f["startup_s"]) == {"in-process, first start", "in-process", "isolated"}
    assert math.isfinite(f["added_p50_us_at_lowest"]) and f["process_round_trip_p50_us"] > 0
    assert f["throughput_isolated_vs_in_process_at_top"] > 0
    memory = f["memory"]
    assert memory["in-process"]["worker_rss_mib"] == []  # no worker process
    assert len(memory["isolated"]["worker_rss_mib"]) == 1


def test_isolation_arguments() -> None:
    assert parse_levels("32,1", "--isolation") == [1, 32]
    with pytest.raises(ConfigError, match="--isolation"):
        parse_levels("0", "--isolation")
    assert _env_key("sample") == "APPLIANCE_MODELS__SAMPLE__ISOLATION"
    assert _env_key("My-Model") == "APPLIANCE_MODEL_DEFAULTS__ISOLATION"
