"""`appliance bench MODEL.gguf` for a GGUF chat model: streamed chat completions.

Time to first token and decode tokens/s of llama-cpp-python's own
`create_chat_completion(stream=True)`, against the same greedy request streamed from
/v1/chat/completions (server-sent events timed as they arrive) by two clients: a cheap one on
raw sockets, and the official `openai` client. The three run in turn, round by round, in one
process, so load elsewhere on the machine touches every side alike.
"""

from __future__ import annotations

import gc
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ModelError
from .client import HttpConnection, build_request, error_text, header
from .errors import BenchError
from .inputs import SEED
from .report import say
from .server import STOP_GRACE_S, open_server, rss_and_peak, server_for
from .timing import no_gc

if TYPE_CHECKING:
    from ..config import Config, GgufConfig
    from ..device import Placement
    from .model import Target
    from .options import BenchOptions


#: The chat request of the LLM bench: one user message, greedy decoding.
LLM_MESSAGES: list[dict[str, str]] = [
    {"role": "user", "content": "Beautiful is better than ugly."},
]
#: Untimed streamed completions on each side before the timed ones (first-call costs: the
#: prompt's first evaluation, buffers, page faults on the mapped weights).
LLM_WARMUP_RUNS = 1
#: Idle time before each timed run: after a stream, llama.cpp's OpenMP threads keep spinning
#: on a core for some 10-20 ms (measured here: ~10 ms of CPU in the first 20 ms); without a
#: pause, the next side (another process) starts its prompt on one core, which counts against
#: whichever side follows another, not against serving.
LLM_GAP_S = 0.1


@dataclass(frozen=True)
class StreamRun:
    """One streamed completion: when its text arrived, and the text."""

    ttft_ns: int  # request (or call) -> first piece of content
    decode_ns: int  # first piece -> last piece
    tokens: int  # pieces of content (llama-cpp-python streams one per token)
    text: str
    finish: str | None

    @property
    def tokens_per_s(self) -> float:
        """Decode speed: the tokens after the first over the time from the first to the last;
        NaN when they all came at once (a short generation read in one go)."""
        if self.tokens < 2 or self.decode_ns <= 0:
            return math.nan
        return (self.tokens - 1) * 1e9 / self.decode_ns


_ONE_READ = (
    "in every run all tokens reached the client in one read (the generation was too short to "
    "time its pace): use a larger --max-tokens or a bigger model"
)


def gguf_chat_config(target: Target, config: Config) -> GgufConfig | None:
    """The effective GGUF settings when the target is a GGUF chat model, else None."""
    if target.source.manifest.backend != "gguf":
        return None
    from ..backends.gguf import model_mode
    from ..backends.gguf_file import read_gguf

    cfg = config.model_config(target.name).gguf
    return cfg if model_mode(read_gguf(target.file), cfg.mode) == "chat" else None


def open_llama(target: Target, config: Config, cfg: GgufConfig) -> tuple[Any, Placement]:
    """`llama_cpp.Llama` with the server's own arguments and chat template, in-process (after
    the same header check and child-process probe the server does)."""
    from ..backends.base import LoadContext
    from ..backends.gguf import WHY_NO_GPU, _llama, _template_handler, llama_kwargs
    from ..backends.gguf_file import read_gguf
    from ..device import settle, want_accelerator
    from ..isolation.probe import probe_once

    llama_cpp = _llama()
    model_cfg = config.model_config(target.name)
    manifest = target.source.manifest
    what = f"model {manifest.name!r}"
    info = read_gguf(target.file)
    probe_once(manifest, target.file, LoadContext(model_cfg, Path(config.store.path) / ".cache"))
    gpu = bool(llama_cpp.llama_supports_gpu_offload())
    use_gpu = want_accelerator(model_cfg.device, gpu, WHY_NO_GPU, what)
    kwargs = llama_kwargs(target.file, cfg, info, use_gpu)
    try:
        llm = llama_cpp.Llama(**kwargs)
    except Exception as exc:
        raise ModelError(f"{what}: llama.cpp cannot load {target.file.name}: {exc}") from None
    if cfg.chat_template:
        llm.chat_handler = _template_handler(llm, cfg.chat_template)
    detail = f"llama.cpp, {kwargs['n_gpu_layers']} GPU layers, {kwargs['n_threads']} threads"
    return llm, settle(model_cfg.device, use_gpu, detail, WHY_NO_GPU, what)


def raw_stream(llm: Any, max_tokens: int, seed: int) -> StreamRun:
    """One streamed chat completion straight from llama-cpp-python."""
    clock = time.perf_counter_ns
    pieces: list[str] = []
    first = last = 0
    finish: str | None = None
    t0 = clock()
    stream = llm.create_chat_completion(
        messages=LLM_MESSAGES, stream=True, max_tokens=max_tokens, temperature=0.0, seed=seed
    )
    try:
        for chunk in stream:
            choice = chunk["choices"][0]
            text = (choice.get("delta") or {}).get("content")
            if text:
                last = clock()
                if not pieces:
                    first = last
                pieces.append(text)
            if choice.get("finish_reason"):
                finish = choice["finish_reason"]
    finally:
        stream.close()
    if not pieces:
        raise BenchError("the model generated no text for the bench prompt")
    return StreamRun(first - t0, last - first, len(pieces), "".join(pieces), finish)


def chat_request_body(model: str, max_tokens: int, seed: int) -> bytes:
    import orjson

    return orjson.dumps(
        {
            "model": model,
            "messages": LLM_MESSAGES,
            "stream": True,
            "max_tokens": max_tokens,
            "temperature": 0,
            "seed": seed,
        }
    )


class SseReader:
    """The body of a streamed response, chunked or not, as server-sent events."""

    def __init__(self, chunked: bool, length: int | None) -> None:
        self.chunked = chunked
        self.left = length  # unchunked: bytes of body still to come (None: until close)
        self.raw = b""  # received, not yet de-chunked
        self.text = b""  # de-chunked, not yet split into events
        self.done = False  # the body is complete
        self.rest = b""  # bytes after the body (the next response on the connection)

    def feed(self, data: bytes) -> list[bytes]:
        """Take received bytes; return the `data:` payloads of the events now complete."""
        if self.done:
            self.rest += data
            return []
        if not self.chunked:
            if self.left is not None:
                self.rest, data = data[self.left :], data[: self.left]
                self.left -= len(data)
                self.done = self.left <= 0
            self.text += data
        else:
            buf = self.raw + data
            pos = 0
            while not self.done:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    break
                try:
                    size = int(buf[pos:eol].split(b";", 1)[0], 16)
                except ValueError:
                    raise BenchError(f"malformed chunk size {buf[pos:eol][:40]!r}") from None
                if size == 0:  # the last chunk, then trailers up to an empty line
                    end = buf.find(b"\r\n\r\n", eol)
                    if end < 0:
                        break
                    self.done, self.rest, pos = True, buf[end + 4 :], len(buf)
                    break
                if len(buf) < eol + 2 + size + 2:
                    break
                self.text += buf[eol + 2 : eol + 2 + size]
                pos = eol + 2 + size + 2
            self.raw = buf[pos:] if not self.done else b""
        events: list[bytes] = []
        while (end := self.text.find(b"\n\n")) >= 0:
            event, self.text = self.text[:end], self.text[end + 2 :]
            lines = [line[5:].lstrip(b" ") for line in event.split(b"\n") if line[:5] == b"data:"]
            if lines:
                events.append(b"\n".join(lines))
        return events


def http_stream(conn: HttpConnection, request: bytes) -> StreamRun:
    """One streamed chat completion through the server; every event is timed as it arrives.

    While the stream runs the client only reads and timestamps what arrives (the client shares
    the CPUs with the server); the events are parsed once the body looks complete."""
    import orjson

    clock = time.perf_counter_ns
    recv = conn.recv
    t0 = clock()
    try:
        conn.sock.sendall(request)
    except OSError as exc:
        raise BenchError(f"cannot send to the server: {exc}") from None
    buf, now = conn.pending, clock()
    while (end := buf.find(b"\r\n\r\n")) < 0:
        buf += recv()
        now = clock()
    head = buf[:end]
    try:
        status = int(head[9:12])
    except ValueError:
        raise BenchError(f"malformed HTTP response: {head[:80]!r}") from None
    if status != 200:
        conn.pending = buf
        _, _, body = conn.exchange(b"")  # the (plain) error body
        raise BenchError(f"the server answered {status}: {error_text(body)}")
    chunked = b"chunked" in (header(head, b"Transfer-Encoding") or b"").lower()
    length = header(head, b"Content-Length")
    if not chunked and length is None:
        raise BenchError("the server's stream has neither chunked encoding nor a length")
    reader = SseReader(chunked, None if chunked else int(length or 0))
    received = [(now, buf[end + 4 :])]
    tail, size = received[0][1][-4:], len(received[0][1])
    pieces: list[str] = []
    first = last = 0
    finish: str | None = None
    seen_done = False
    while True:
        # the cheap part, while the server streams: read until the body may be complete
        if chunked:
            while tail != b"\r\n\r\n":  # the last chunk (and trailers) end so
                data = recv()
                received.append((clock(), data))
                tail = (tail + data)[-4:]
        else:
            while size < reader.left:  # type: ignore[operator]
                data = recv()
                received.append((clock(), data))
                size += len(data)
        for arrived, data in received:
            for payload in reader.feed(data):
                if payload == b"[DONE]":
                    seen_done = True
                    continue
                try:
                    obj = orjson.loads(payload)
                    if "error" in obj:
                        raise BenchError(f"the server's stream failed: {obj['error']}")
                    choice = obj["choices"][0]
                except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
                    raise BenchError(f"unexpected event in the stream: {payload[:200]!r}") from None
                text = (choice.get("delta") or {}).get("content")
                if text:
                    last = arrived
                    if not pieces:
                        first = arrived
                    pieces.append(text)
                if choice.get("finish_reason"):
                    finish = choice["finish_reason"]
        received = []
        if reader.done:
            break
        tail = b""  # that ended a chunk's payload, not the body: read on
    conn.pending = reader.rest
    if not seen_done:
        raise BenchError("the server's stream ended without `data: [DONE]`")
    if not pieces:
        raise BenchError("the server streamed no text for the bench prompt")
    return StreamRun(first - t0, last - first, len(pieces), "".join(pieces), finish)


def openai_stream(client: Any, model: str, max_tokens: int, seed: int) -> StreamRun:
    """One streamed chat completion through the official `openai` client (its own HTTP stack,
    SSE decoder and typed chunks: what most applications run), timed as chunks come out."""
    clock = time.perf_counter_ns
    pieces: list[str] = []
    first = last = 0
    finish: str | None = None
    t0 = clock()
    try:
        stream = client.chat.completions.create(
            model=model, messages=LLM_MESSAGES, stream=True, max_tokens=max_tokens,
            temperature=0, seed=seed,
        )  # fmt: skip
        with stream:
            for chunk in stream:
                if not chunk.choices:
                    continue
                choice = chunk.choices[0]
                text = choice.delta.content if choice.delta is not None else None
                if text:
                    last = clock()
                    if not pieces:
                        first = last
                    pieces.append(text)
                if choice.finish_reason:
                    finish = choice.finish_reason
    except Exception as exc:  # the openai client's own errors (APIError, connection errors)
        if isinstance(exc, BenchError):
            raise
        raise BenchError(f"the openai client failed: {exc}") from None
    if not pieces:
        raise BenchError("the server streamed no text to the openai client")
    return StreamRun(first - t0, last - first, len(pieces), "".join(pieces), finish)


def _openai_client(address: tuple[str, int], token: str, timeout_s: float) -> Any:
    """The official client on the server, or None where the `openai` package is missing."""
    try:
        import openai
    except ImportError:
        return None
    host, port = address
    return openai.OpenAI(
        base_url=f"http://{host}:{port}/v1", api_key=token or "none", max_retries=0,
        timeout=timeout_s,
    )  # fmt: skip


def _median(values: Sequence[float]) -> float:
    """The median of the finite values; NaN when there are none."""
    import statistics

    finite = [v for v in values if math.isfinite(v)]
    return float(statistics.median(finite)) if finite else math.nan


def _quartiles(values: Sequence[float]) -> list[float] | None:
    """The first and third quartiles of the finite values (the spread of a median); None
    with fewer than two."""
    import statistics

    finite = [v for v in values if math.isfinite(v)]
    if len(finite) < 2:
        return None
    q1, _, q3 = statistics.quantiles(finite, n=4, method="inclusive")
    return [q1, q3]


def paired(side: Sequence[StreamRun], raw: Sequence[StreamRun]) -> dict[str, list[float]]:
    """Round by round, each side's run against the raw run of the same round: its tokens/s
    ratio and its added time to first token. The rounds interleave the sides, so a burst of
    load elsewhere touches both runs of a pair: their ratio moves less than a ratio of two
    medians taken over different moments."""
    return {
        "ratio": [a.tokens_per_s / b.tokens_per_s for a, b in zip(side, raw, strict=True)],
        "added_ttft": [(a.ttft_ns - b.ttft_ns) / 1e6 for a, b in zip(side, raw, strict=True)],
    }


def thread_cpu_ns(pid: int, tid: int | None = None) -> int | None:
    """CPU time of one thread (the main thread by default) in nanoseconds, or None."""
    try:
        return int(Path(f"/proc/{pid}/task/{tid or pid}/schedstat").read_bytes().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def process_cpu_ns(pid: int) -> int | None:
    """CPU time of every thread of a process in nanoseconds (/proc/PID/task/*/schedstat: finer
    than /proc/PID/stat's 10 ms ticks); None where /proc does not have it."""
    total = 0
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return None
    for task in tasks:
        try:
            total += int((task / "schedstat").read_bytes().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # a thread that ended meanwhile
    return total


#: The sides of one round, in this order in the first round; each round starts one later, so
#: no side always runs first (after an idle moment) or last.
SIDES = ("raw", "http", "openai")


@dataclass
class _Side:
    """The runs of one side, with the CPU time they took (the server's, or the raw process's)."""

    runs: list[StreamRun]
    cpu_ns: int = 0
    loop_ns: int = 0  # the server's main thread: its event loop (HTTP sides only)
    cpu_known: bool = True


def run_llm(
    options: BenchOptions, config: Config, target: Target, cfg: GgufConfig
) -> dict[str, Any]:
    """Streamed chat completions, interleaved round by round: raw llama-cpp-python in this
    process, the server with a cheap client (raw sockets, parsed after the stream), and the
    server with the official `openai` client. llama.cpp's threads take every core, so any client
    competes with them: interleaving keeps other load on the machine from favouring one side."""
    quiet = options.quiet
    runs, max_tokens = options.runs, options.max_tokens
    model_cfg = config.model_config(target.name)
    token = config.token()
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    timeout_s = model_cfg.timeout_s + 30.0
    body = chat_request_body(target.name, max_tokens, SEED)
    load_before = [round(x, 2) for x in os.getloadavg()]

    say(quiet, f"loading {target.file} in-process ...")
    llm, placement = open_llama(target, config, cfg)
    server = server_for(options, config, target, token)
    conn: HttpConnection | None = None
    client: Any = None
    sides: dict[str, _Side] = {}
    try:
        conn, address, idle_rss = open_server(server, target.name, timeout_s, quiet)
        request = build_request("POST", "/v1/chat/completions", *address, body, headers)
        client = _openai_client(address, token, timeout_s)
        active = [s for s in SIDES if s != "openai" or client is not None]
        assert conn is not None
        http_conn = conn

        def one(side: str) -> StreamRun:
            if side == "raw":
                return raw_stream(llm, max_tokens, SEED)
            if side == "http":
                return http_stream(http_conn, request)
            return openai_stream(client, target.name, max_tokens, SEED)

        say(quiet, f"timing streamed chat completions, {', '.join(active)} in turn "
                   f"({LLM_WARMUP_RUNS} + {runs} rounds) ...")  # fmt: skip
        for _ in range(LLM_WARMUP_RUNS):
            for side in active:
                one(side)
        sides = {s: _Side([]) for s in active}
        with no_gc():
            for i in range(runs):
                for k in range(len(active)):
                    side = active[(i + k) % len(active)]
                    time.sleep(LLM_GAP_S)
                    pid = None if side == "raw" else server.pid
                    before = time.process_time_ns() if pid is None else process_cpu_ns(pid)
                    loop_before = thread_cpu_ns(server.pid)
                    sides[side].runs.append(one(side))
                    after = time.process_time_ns() if pid is None else process_cpu_ns(pid)
                    loop_after = thread_cpu_ns(server.pid)
                    if before is None or after is None or loop_before is None or not loop_after:
                        sides[side].cpu_known = False
                    else:
                        sides[side].cpu_ns += after - before
                        sides[side].loop_ns += loop_after - loop_before
        server.alive_or_raise()
        after_rss, peak_rss = rss_and_peak(server.pid)
    finally:
        if client is not None:
            client.close()
        if conn is not None:
            conn.close()
        server.stop(config.server.shutdown_timeout_s + STOP_GRACE_S)
        llm.close()
    gc.collect()

    # Same work on every side, or the figures compare nothing.
    raw = sides["raw"].runs
    for side in active[1:]:
        for i, (a, b) in enumerate(zip(raw, sides[side].runs, strict=True)):
            if b.text != a.text:
                raise BenchError(
                    f"run {i + 1}: the server generated {b.text[:80]!r} ({side} client), "
                    f"llama-cpp-python {a.text[:80]!r} for the same greedy request"
                )
            if b.tokens != a.tokens:
                raise BenchError(
                    f"run {i + 1}: the server streamed {b.tokens} tokens ({side} client), "
                    f"llama-cpp-python {a.tokens}"
                )

    def r(x: float | None, digits: int = 2) -> float | None:
        return None if x is None or not math.isfinite(x) else round(x, digits)

    def figures(side: str) -> dict[str, Any]:
        got = sides.get(side)
        if got is None:
            return {}
        ttft = [x.ttft_ns / 1e6 for x in got.runs]
        tps = [x.tokens_per_s for x in got.runs]
        tokens = sum(x.tokens for x in got.runs)
        cpu = got.cpu_ns / 1e6 / tokens if got.cpu_known and tokens else None
        loop = got.loop_ns / 1e3 / tokens if got.cpu_known and tokens else None
        return {"ttft": _median(ttft), "tps": _median(tps), "ttft_runs": ttft, "tps_runs": tps,
                "cpu": cpu, "loop": loop}  # fmt: skip

    fr, fh, fo = figures("raw"), figures("http"), figures("openai")
    out: dict[str, Any] = {
        "kind": "llm",
        "model": target.name,
        "model_file": str(target.file),
        "backend": target.source.manifest.backend,
        "device": placement.device,
        "runtime_detail": placement.detail,
        "cpu_count": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "runs": runs,
        "warmup_runs": LLM_WARMUP_RUNS,
        "gap_s": LLM_GAP_S,
        "clients": active[1:],
        "max_tokens": max_tokens,
        "seed": SEED,
        "messages": LLM_MESSAGES,
        "tokens": raw[0].tokens,
        "finish_reason": raw[0].finish,
        "request_bytes": len(body),
        "raw_ttft_ms": r(fr["ttft"], 3),
        "raw_tokens_per_s": r(fr["tps"]),
        "raw_cpu_ms_per_token": r(fr["cpu"], 4),
        "raw_ttft_ms_runs": [r(x, 3) for x in fr["ttft_runs"]],
        "raw_tokens_per_s_runs": [r(x) for x in fr["tps_runs"]],
        "openai_note": None if "openai" in active else "the openai package is not installed",
    }
    for prefix, f in (("http", fh), ("openai", fo)):
        if not f:
            continue
        out |= {
            f"{prefix}_ttft_ms": r(f["ttft"], 3),
            f"{prefix}_tokens_per_s": r(f["tps"]),
            f"{prefix}_server_cpu_ms_per_token": r(f["cpu"], 4),
            # the event loop's share: what serving adds per token, least touched by other load
            f"{prefix}_server_loop_cpu_us_per_token": r(f["loop"], 1),
            f"{prefix}_ttft_ms_runs": [r(x, 3) for x in f["ttft_runs"]],
            f"{prefix}_tokens_per_s_runs": [r(x) for x in f["tps_runs"]],
        }
    # The cheap client's figures keep their first names (added_ttft_ms, tokens_per_s_ratio).
    for prefix, name, f in (("", "http", fh), ("openai_", "openai", fo)):
        if not f:
            continue
        out |= {
            f"{prefix}added_ttft_ms": r(f["ttft"] - fr["ttft"], 3),
            f"{prefix}tokens_per_s_ratio": r(f["tps"] / fr["tps"], 4),
            f"{prefix}tokens_per_s_note": None if math.isfinite(f["tps"]) else _ONE_READ,
        }
        if f["cpu"] is not None and fr["cpu"] is not None:
            out[f"{name}_server_cpu_over_raw_ms_per_token"] = r(f["cpu"] - fr["cpu"], 4)
        pairs = paired(sides[name].runs, raw)
        ratio_q, ttft_q = _quartiles(pairs["ratio"]), _quartiles(pairs["added_ttft"])
        out |= {
            f"{prefix}paired_tokens_per_s_ratio": r(_median(pairs["ratio"]), 4),
            f"{prefix}paired_tokens_per_s_ratio_quartiles": None
            if ratio_q is None
            else [r(x, 4) for x in ratio_q],
            f"{prefix}paired_added_ttft_ms": r(_median(pairs["added_ttft"]), 3),
            f"{prefix}paired_added_ttft_ms_quartiles": None
            if ttft_q is None
            else [r(x, 3) for x in ttft_q],
        }
    out |= {
        "server_idle_rss_mib": r(idle_rss, 1),
        "server_after_rss_mib": r(after_rss, 1),
        "server_peak_rss_mib": r(peak_rss, 1),
    }
    return out
