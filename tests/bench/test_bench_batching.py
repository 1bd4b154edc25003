"""`appliance bench --sweep`: batching on and off side by side, run very briefly.

Only the shape and sanity of the figures are checked, never a speed: a loaded CI machine must not
fail this. The figures themselves come from a real run (see README, "Dynamic batching").
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from appliance.bench.batching import _env_key
from appliance.bench.options import parse_cpus, parse_levels
from appliance.errors import ConfigError
from tests.bench.test_bench import appliance


def test_sweep_and_overload_smoke(samples: Path) -> None:
    proc = appliance(
        "bench", str(samples / "sample.onnx"), "--sweep", "1,4", "--requests", "40",
        "--warmup", "4", "--rounds", "1", "--overload", "0.5", "--overload-connections", "8",
        "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    f = json.loads(proc.stdout)
    assert [(r["concurrency"], r["batching"]) for r in f["runs"]] == [
        (1, "off"), (1, "on"), (4, "off"), (4, "on"),
    ]  # fmt: skip
    for r in f["runs"]:
        assert r["rps"] > 0 and 0 < r["p50_us"] <= r["p99_us"]
    assert f["raw_ceiling_rows"] == 4 and f["raw_ceiling_rps"] > 0
    assert len(f["raw_ceiling_rounds_rps"]) == 2  # before the sweep and after its top level
    assert math.isfinite(f["throughput_on_vs_off_at_top"])
    o = f["overload"]
    assert o["answered_200"] > 0 and o["other_statuses"] == [] and not o["client_errors"]
    assert o["all_503_have_retry_after"] and o["all_200_after_first"]
    assert o["first_200_after_stop_ms"] is not None


def test_sweep_arguments() -> None:
    assert parse_levels("32,1,8,8") == [1, 8, 32]
    for bad in ("", "0,1", "a"):
        with pytest.raises(ConfigError):
            parse_levels(bad)
    assert parse_cpus("0,2-3") == {0, 2, 3}
    with pytest.raises(ConfigError):
        parse_cpus("x")
    assert _env_key("sample") == "APPLIANCE_MODELS__SAMPLE__BATCHING__ENABLED"
    assert _env_key("My-Model") == "APPLIANCE_MODEL_DEFAULTS__BATCHING__ENABLED"
