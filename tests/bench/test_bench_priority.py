"""`appliance bench --priority`: an urgent stream alone, then through a flood, run very briefly.

Speeds are never checked (a loaded machine must not fail this); what must hold at any speed is:
no urgent request refused, every answer 200 or 503, every 503 with Retry-After. The figures
themselves come from a real run on the heavy model (see README, "Priority levels").
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance.bench_priority import bucket_quantile, with_priority
from appliance.codec import decode_request
from tests.bench.test_bench import appliance


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_priority_bench_smoke(samples: Path, binary: bool) -> None:
    proc = appliance(
        "bench", str(samples / "sample.onnx"), "--priority", "--priority-seconds", "0.5",
        "--requests", "60", "--warmup", "4", "--concurrency", "2", "--flood-connections", "24",
        "--flood-batch", "2", *(["--binary"] if binary else []), "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    f = json.loads(proc.stdout)
    assert f["capacity_rps"] > 0 and f["flood_max_batch_size"] == 2
    for run in (f["alone"], f["flood"]):
        assert not run["client_errors"]
        assert run["high"]["sent"] > 0 and set(run["high"]["statuses"]) == {"200"}
        assert run["high"]["server_p99_under_ms"] is not None
    assert f["high_not_200_under_flood"] == 0
    low = f["flood"]["low"]
    assert low["sent"] > 0 and set(low["statuses"]) <= {"200", "503"}
    assert low["all_503_have_retry_after"]
    assert "evicted_level2" in f["server_counters"]


def test_priority_is_added_to_json_and_binary_bodies() -> None:
    head = b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1],"data":[1.0]}]}'
    body, length = with_priority(head, None, 1)
    assert length is None and decode_request(body).priority == 1
    binary_head = (
        b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1],'
        b'"parameters":{"binary_data_size":4}}]}'
    )
    body, length = with_priority(binary_head + b"\0\0\x80?", len(binary_head), 2)
    assert length is not None
    request = decode_request(body, length)
    assert request.priority == 2 and request.inputs["x"].tolist() == [1.0]


def test_bucket_quantile_reads_the_requests_between_two_scrapes() -> None:
    before = [(0.005, 10.0), (0.01, 10.0), (float("inf"), 10.0)]
    after = [(0.005, 10.0), (0.01, 19.0), (float("inf"), 20.0)]
    assert bucket_quantile(before, after, 0.5) == 0.01
    assert bucket_quantile(before, after, 0.99) == float("inf")
    assert bucket_quantile(before, before, 0.5) is None
