"""`appliance bench --priority`: an urgent stream alone, then through a flood, run very briefly.

Speeds are never checked (a loaded machine must not fail this); what must hold at any speed is:
no urgent request refused, every answer 200 or 503, every 503 with Retry-After. The figures
themselves come from a real run on the heavy model (see README, "Priority levels").
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from appliance.api.http import PRIORITY_HEADER as SERVER_PRIORITY_HEADER
from appliance.bench.options import PriorityOptions
from appliance.bench.priority import PRIORITY_HEADER, bucket_quantile, level_request, server_env
from appliance.codec import decode_request
from appliance.errors import ConfigError
from tests.bench.test_bench import appliance


@pytest.mark.parametrize(
    ("binary", "by"), [(False, "body"), (True, "header")], ids=["json-body", "binary-header"]
)
def test_priority_bench_smoke(samples: Path, binary: bool, by: str) -> None:
    fixed = ["--flood-rps", "1000"] if binary else []  # level 1 then at 0.05 * 1000 / 10
    proc = appliance(
        "bench", str(samples / "sample.onnx"), "--priority", "--priority-seconds", "0.5",
        "--requests", "60", "--warmup", "4", "--concurrency", "2", "--flood-connections", "24",
        "--flood-batch", "2", "--priority-by", by, *(["--binary"] if binary else []), "--json",
        *fixed,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    f = json.loads(proc.stdout)
    assert f["capacity_rps"] > 0 and f["flood_max_batch_size"] == 2
    assert f["flood_rps_fixed"] == binary
    if binary:
        assert (f["flood_target_rps"], f["high_target_rps"]) == (1000.0, 5.0)
    assert f["priority_by"] == by and f["encoding"] == ("binary" if binary else "json")
    for run in (f["alone"], f["flood"]):
        assert not run["client_errors"]
        assert run["high"]["sent"] > 0 and set(run["high"]["statuses"]) == {"200"}
        assert run["high"]["server_p99_under_ms"] is not None
    assert f["high_not_200_under_flood"] == 0
    low = f["flood"]["low"]
    assert low["sent"] > 0 and set(low["statuses"]) <= {"200", "503"}
    assert low["all_503_have_retry_after"]
    assert low["client"]["sent"] == low["sent"]  # every flood request was answered
    assert "evicted_level2" in f["server_counters"]


def _split(request: bytes) -> tuple[dict[str, str], bytes]:
    head, _, body = request.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")[1:]
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}, body


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_level_request_names_the_level_in_the_header_or_the_body(binary: bool) -> None:
    inputs = {"x": np.array([[1.0, 2.0]], dtype=np.float32)}
    for by in ("header", "body"):
        request = level_request(
            ("127.0.0.1", 8080), "m", inputs, {"x": "FP32"}, binary, "tok", 1, by
        )  # fmt: skip
        assert request.startswith(b"POST /v2/models/m/infer HTTP/1.1\r\n")
        headers, body = _split(request)
        assert headers["Authorization"] == "Bearer tok"
        assert int(headers["Content-Length"]) == len(body)
        raw_length = headers.get("Inference-Header-Content-Length")
        assert (raw_length is not None) == binary
        decoded = decode_request(body, int(raw_length) if raw_length else None)
        assert decoded.inputs["x"].tolist() == [[1.0, 2.0]]
        if by == "header":
            assert headers[PRIORITY_HEADER] == "1" and decoded.priority is None
        else:
            assert PRIORITY_HEADER not in headers and decoded.priority == 1


def test_the_bench_sends_the_servers_priority_header() -> None:
    assert PRIORITY_HEADER == SERVER_PRIORITY_HEADER


def test_priority_options_are_checked() -> None:
    PriorityOptions().check()
    for bad, flag in (
        (PriorityOptions(seconds=0.1), "--priority-seconds"),
        (PriorityOptions(high_share=1.0), "--high-share"),
        (PriorityOptions(flood_factor=0.5), "--flood-factor"),
        (PriorityOptions(flood_connections=0), "--flood-connections"),
        (PriorityOptions(flood_nice=-1), "--flood-nice"),
        (PriorityOptions(flood_rps=-1), "--flood-rps"),
        (PriorityOptions(server_cpus="x"), "--server-cpus"),
    ):
        with pytest.raises(ConfigError, match=flag):
            bad.check()
    assert server_env("sample", 4)["APPLIANCE_MODELS__SAMPLE__PRIORITY__LEVELS"] == "2"
    assert "APPLIANCE_MODEL_DEFAULTS__PRIORITY__DEFAULT_LEVEL" in server_env("My-Model", 0)


def test_priority_bench_bad_arguments(samples: Path) -> None:
    model = str(samples / "sample.onnx")
    proc = appliance("bench", model, "--priority", "--priority-by", "query")
    assert proc.returncode == 2 and "--priority-by" in proc.stderr
    proc = appliance("bench", model, "--priority", "--high-share", "2")
    assert proc.returncode == 2 and "--high-share" in proc.stderr


def test_bucket_quantile_reads_the_requests_between_two_scrapes() -> None:
    before = [(0.005, 10.0), (0.01, 10.0), (float("inf"), 10.0)]
    after = [(0.005, 10.0), (0.01, 19.0), (float("inf"), 20.0)]
    assert bucket_quantile(before, after, 0.5) == 0.01
    assert bucket_quantile(before, after, 0.99) == float("inf")
    assert bucket_quantile(before, before, 0.5) is None


async def test_the_flood_times_every_answer_from_its_due_time() -> None:
    """A real server that answers 503 + Retry-After in two writes: the flood reads heads and
    bodies across reads, keeps one request per connection, and backlogs what finds none."""
    import asyncio
    import time

    from appliance.bench.flood import flood

    request = b"POST /x HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc"
    answer = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\nRetry-After: 1\r\n\r\nbusy"
    seen = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal seen
        try:
            while True:
                await reader.readexactly(len(request))
                seen += 1
                writer.write(answer[:20])
                await writer.drain()
                await asyncio.sleep(0.002)  # every connection busy a while: a backlog forms
                writer.write(answer[20:])
        except asyncio.IncompleteReadError:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    start = time.monotonic() + 0.05
    answers, errors, stats = await flood(
        ("127.0.0.1", port), request, 2000.0, start, start + 0.25, 2, 10.0
    )
    server.close()
    await server.wait_closed()
    assert not errors
    assert stats["sent"] == len(answers) == seen >= 400
    assert stats["backlogged"] > 0 and stats["max_backlog"] > 0
    assert all(status == 503 and retry for status, _, retry in answers)
    assert min(ns for _, ns, _ in answers) >= 2_000_000  # from its due time: the 2 ms wait
