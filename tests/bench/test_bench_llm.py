"""`appliance bench` on a GGUF chat model: streamed /v1/chat/completions against raw
llama-cpp-python, end to end (a real server subprocess), plus the SSE client's parser.

Figures are checked for sanity only (positive, finite, counts that agree), never against a
wall-clock threshold: a loaded CI machine must not fail these tests.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from appliance.bench.errors import BenchError
from appliance.bench.llm import SseReader, StreamRun

from .test_bench import appliance

TINY = "tiny-llama-q8_0.gguf"
FAST = ["--runs", "2", "--max-tokens", "16"]


def positive(value: Any) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def test_bench_llm_json(gguf_models: Path) -> None:
    proc = appliance("bench", str(gguf_models / TINY), *FAST, "--json", timeout=300)
    assert proc.returncode == 0, proc.stderr
    f: dict[str, Any] = json.loads(proc.stdout)
    assert f["kind"] == "llm"
    assert f["model"] == "tiny-llama-q8_0" and f["backend"] == "gguf"
    assert f["runs"] == 2 and f["max_tokens"] == 16
    # the server generated what llama-cpp-python generated (bench checks the text run by run)
    assert isinstance(f["tokens"], int) and 2 <= f["tokens"] <= 16, f
    for key in ("raw_ttft_ms", "http_ttft_ms", "raw_tokens_per_s"):
        assert positive(f[key]), (key, f)
    assert math.isfinite(f["added_ttft_ms"]), f
    for key in ("raw_ttft_ms_runs", "http_ttft_ms_runs", "raw_tokens_per_s_runs"):
        assert len(f[key]) == 2 and all(positive(x) for x in f[key]), (key, f)
    # The tiny model decodes its few tokens in a couple of milliseconds: on a busy machine they
    # can all reach the client in one read, which leaves the HTTP pace unmeasured (and says so).
    if f["http_tokens_per_s"] is None:
        assert f["tokens_per_s_ratio"] is None and f["tokens_per_s_note"], f
    else:
        assert positive(f["http_tokens_per_s"]) and positive(f["tokens_per_s_ratio"]), f
        assert f["tokens_per_s_note"] is None
    for key in ("server_idle_rss_mib", "server_after_rss_mib", "server_peak_rss_mib"):
        if Path("/proc/self/status").exists():
            assert positive(f[key]), (key, f)
    # the official openai client ran in the same rounds, on the same text
    assert f["clients"] == ["http", "openai"] and f["openai_note"] is None, f
    assert positive(f["openai_ttft_ms"]) and math.isfinite(f["openai_added_ttft_ms"]), f
    assert len(f["openai_ttft_ms_runs"]) == 2, f
    if f["openai_tokens_per_s"] is not None:
        assert positive(f["openai_tokens_per_s_ratio"]), f
    # round by round: each client's run against the raw run of the same round
    for prefix in ("", "openai_"):
        assert math.isfinite(f[f"{prefix}paired_added_ttft_ms"]), f
        low, high = f[f"{prefix}paired_added_ttft_ms_quartiles"]
        assert low <= f[f"{prefix}paired_added_ttft_ms"] <= high, f
        if f[f"{prefix}paired_tokens_per_s_ratio"] is not None:
            assert positive(f[f"{prefix}paired_tokens_per_s_ratio"]), f
    if Path("/proc/self/task").exists():  # CPU time per token: the server's, all threads and loop
        for key in ("raw_cpu_ms_per_token", "http_server_cpu_ms_per_token",
                    "openai_server_cpu_ms_per_token", "http_server_loop_cpu_us_per_token",
                    "openai_server_loop_cpu_us_per_token"):  # fmt: skip
            assert positive(f[key]), (key, f)
        assert f["openai_server_loop_cpu_us_per_token"] * 1e-3 < f["openai_server_cpu_ms_per_token"]


def test_bench_llm_table(gguf_models: Path) -> None:
    proc = appliance("bench", str(gguf_models / TINY), "--runs", "1", "--max-tokens", "8")
    assert proc.returncode == 0, proc.stderr
    for text in ("time to first token (ms)", "decode (tokens/s)", "raw llama.cpp",
                 "HTTP stream", "openai client", "event loop CPU", "server RSS",
                 "paired   HTTP stream: tokens/s ratio"):  # fmt: skip
        assert text in proc.stdout


def test_bench_llm_bad_arguments(gguf_models: Path) -> None:
    for flag in ("--runs", "--max-tokens"):
        proc = appliance("bench", str(gguf_models / TINY), flag, "0")
        assert proc.returncode == 2
        assert flag in proc.stderr


# -- the SSE reader ---------------------------------------------------------------------------
def _chunked(*parts: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


EVENTS = [b'data: {"a": 1}\n\n', b'data: {"b": 2}\n\n', b"data: [DONE]\n\n"]


@pytest.mark.parametrize("step", [1, 3, 7, 1000])
def test_sse_reader_chunked_in_any_pieces(step: int) -> None:
    """Events come out whole however the bytes are split, across chunks and reads."""
    body = _chunked(EVENTS[0] + EVENTS[1][:5], EVENTS[1][5:], EVENTS[2]) + b"HTTP/1.1 200"
    reader = SseReader(chunked=True, length=None)
    got: list[bytes] = []
    for i in range(0, len(body), step):
        got += reader.feed(body[i : i + step])
    assert got == [b'{"a": 1}', b'{"b": 2}', b"[DONE]"]
    assert reader.done and reader.rest.endswith(b"HTTP/1.1 200")


def test_sse_reader_content_length() -> None:
    body = b"".join(EVENTS)
    reader = SseReader(chunked=False, length=len(body))
    assert reader.feed(body[:10]) == []
    assert reader.feed(body[10:] + b"next") == [b'{"a": 1}', b'{"b": 2}', b"[DONE]"]
    assert reader.done and reader.rest == b"next"


def test_sse_reader_bad_chunk_size() -> None:
    with pytest.raises(BenchError, match="chunk size"):
        SseReader(chunked=True, length=None).feed(b"zz\r\nabc\r\n")


def test_stream_run_rate() -> None:
    assert StreamRun(1, 2_000_000, 5, "abcde", "stop").tokens_per_s == pytest.approx(2000.0)
    assert math.isnan(StreamRun(1, 0, 5, "abcde", "stop").tokens_per_s)  # all in one read
    assert math.isnan(StreamRun(1, 0, 1, "a", "stop").tokens_per_s)
