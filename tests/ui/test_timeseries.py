"""The status page's ring buffer (appliance/timeseries.py), on a clock the test moves."""

from __future__ import annotations

import pytest

from appliance.timeseries import BOUNDS, MAX_NAMES, RecentErrors, RequestSeries, percentile


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_counts_rates_and_errors_per_bucket() -> None:
    clock = Clock()
    series = RequestSeries(bucket_s=10, buckets=6, clock=clock)
    for _ in range(20):
        series.record("m", 200, 0.002)
    series.record("m", 500, 0.002)
    series.record("m", 400, 0.002)
    clock.now += 10
    for _ in range(5):
        series.record("m", 200, 0.002)
    out = series.series("m")
    assert len(out["rate"]) == 6
    assert out["rate"][-2:] == [2.2, 0.5]
    assert out["error_rate"][-2] == pytest.approx(1 / 22, abs=1e-4)
    assert out["error_rate"][-1] == 0.0
    assert out["error_rate"][0] is None  # no request then
    assert (out["requests"], out["errors"], out["client_errors"]) == (27, 1, 1)


def test_old_buckets_fall_out_of_the_ring() -> None:
    clock = Clock()
    series = RequestSeries(bucket_s=10, buckets=6, clock=clock)
    series.record("m", 200, 0.001)
    clock.now += 50  # still the oldest of 6 buckets
    assert series.series("m")["requests"] == 1
    clock.now += 10  # gone, and its slot is reused by the new bucket, not added to
    series.record("m", 200, 0.001)
    out = series.series("m")
    assert out["requests"] == 1
    assert out["rate"] == [0.0] * 5 + [0.1]


def test_percentiles_are_within_a_bucket_of_the_truth() -> None:
    clock = Clock()
    series = RequestSeries(bucket_s=10, buckets=6, clock=clock)
    for i in range(1, 1001):  # 1 ms .. 1 s
        series.record("m", 200, i / 1000)
    w = series.window("m", 60)
    assert w["requests"] == 1000
    assert w["p50_ms"] == pytest.approx(500, rel=0.13)
    assert w["p99_ms"] == pytest.approx(990, rel=0.13)
    assert w["rate"] == pytest.approx(1000 / 60, rel=1e-3)


def test_window_merges_buckets_and_ignores_older_ones() -> None:
    clock = Clock()
    series = RequestSeries(bucket_s=10, buckets=60, clock=clock)
    series.record("m", 200, 0.1)  # older than the window below
    clock.now += 100
    for _ in range(3):
        series.record("m", 503, 0.001)
        clock.now += 10
    w = series.window("m", 30)
    assert (w["requests"], w["errors"], w["error_rate"]) == (2, 2, 1.0)
    assert series.window("other", 30) == {
        "seconds": 30, "requests": 0, "errors": 0, "client_errors": 0, "rate": 0.0,
        "error_rate": 0.0, "p50_ms": None, "p99_ms": None,
    }  # fmt: skip


def test_extreme_latencies_land_in_the_end_buckets() -> None:
    assert percentile([0] * (len(BOUNDS) + 1), 0.5) is None
    clock = Clock()
    series = RequestSeries(clock=clock)
    series.record("m", 200, 0.0)
    series.record("m", 200, 1e9)
    w = series.window("m", 10)
    assert w["p50_ms"] is not None and w["p50_ms"] < 0.01
    assert w["p99_ms"] == pytest.approx(BOUNDS[-1] * 1000, rel=1e-6)


def test_names_are_bounded() -> None:
    series = RequestSeries(clock=Clock())
    for i in range(MAX_NAMES + 10):
        series.record(f"m{i}", 200, 0.001)
    assert len(series.names()) == MAX_NAMES


def test_recent_errors_keep_the_last_ones_cut_short() -> None:
    errors = RecentErrors(size=3)
    for i in range(5):
        errors.add(400 + i, "m", "/v2/models/m/infer", "x" * 1000, f"r{i}")
    items = errors.items()
    assert [e.request_id for e in items] == ["r2", "r3", "r4"]
    assert all(len(e.message) == 300 for e in items)
