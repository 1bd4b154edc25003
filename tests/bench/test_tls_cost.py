"""The short CI variant of tests/bench/tls_cost.py: both servers start, wrk drives each over its
scheme (so HTTPS on the fast path answers 200s under load at two concurrencies), and the
figures and ratios come out. The long run is `tests/bench/tls_cost.py` itself."""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import pytest

from tests.bench.tls_cost import measure


def test_tls_cost_runs_both_schemes_side_by_side(samples: Path) -> None:
    if shutil.which("wrk") is None:
        if os.environ.get("CI"):
            pytest.fail("CI needs wrk (.ci/run installs it)")
        pytest.skip("wrk is not installed")
    args = argparse.Namespace(
        model=str(samples / "sample.onnx"), levels="1,4", seconds=1.0, rounds=1, server_cpus=""
    )
    figures = measure(args)
    for scheme in ("http", "https"):
        for c in (1, 4):
            got = figures["results"][scheme][c]  # wrk refuses non-200 answers and socket errors
            assert got["rps"] > 0 and got["p50_us"] > 0 and got["cpu_us_per_req"] > 0
    assert set(figures["ratio_https_over_http"][4]) == {"rps", "p50_us", "p99_us", "cpu_us_per_req"}
