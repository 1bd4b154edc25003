"""Timers and the figures they give: percentiles of nanosecond samples.

The bench process's own garbage collections are kept out of every timed loop (`no_gc`).
"""

from __future__ import annotations

import contextlib
import gc
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from ..errors import ApplianceError
from .client import HttpConnection, error_text, header
from .errors import BenchError

#: One answer of an open loop: (status, nanoseconds, whether it had Retry-After).
Answer = tuple[int, int, bool]


@dataclass(frozen=True)
class Latency:
    """Percentiles of one measurement, in microseconds."""

    p50_us: float
    p99_us: float
    mean_us: float
    count: int

    @classmethod
    def of(cls, samples_ns: Sequence[int]) -> Latency:
        import numpy as np

        if not samples_ns:
            raise BenchError("no latency samples were taken")
        us = np.asarray(samples_ns, dtype=np.float64) / 1000.0
        p50, p99 = np.percentile(us, [50, 99])
        return cls(float(p50), float(p99), float(us.mean()), len(us))


@contextlib.contextmanager
def no_gc() -> Iterator[None]:
    """The bench process's own garbage collections are not the server's latency."""
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def time_calls(call: Callable[[], object], warmup: int, requests: int) -> list[int]:
    """Nanoseconds per call, after `warmup` untimed calls."""
    clock = time.perf_counter_ns
    for _ in range(warmup):
        call()
    samples: list[int] = []
    append = samples.append
    with no_gc():
        for _ in range(requests):
            t0 = clock()
            call()
            append(clock() - t0)
    return samples


def time_paced(call: Callable[[], object], gap_s: float, requests: int) -> list[int]:
    """Nanoseconds per call with an idle gap before each, as a server sees its requests.

    Back to back, a runtime call runs with hot caches; in a server, the time between requests
    (the client's turn, the network stack) cools them. This is the floor a server can reach."""
    clock, sleep = time.perf_counter_ns, time.sleep
    samples: list[int] = []
    append = samples.append
    with no_gc():
        for _ in range(requests):
            sleep(gap_s)
            t0 = clock()
            call()
            append(clock() - t0)
    return samples


def time_http(conn: HttpConnection, request: bytes, warmup: int, requests: int) -> list[int]:
    """Sequential round trips on one keep-alive connection; every answer must be 200."""
    exchange = conn.exchange
    failure: list[tuple[int, bytes]] = []

    def one() -> None:
        status, _, body = exchange(request)
        if status != 200 and not failure:
            failure.append((status, body))

    samples = time_calls(one, warmup, requests)
    if failure:
        status, body = failure[0]
        raise BenchError(f"the server answered {status}: {error_text(body)}")
    return samples


def time_concurrent(
    address: tuple[str, int],
    request: bytes,
    concurrency: int,
    warmup: int,
    requests: int,
    timeout_s: float,
) -> tuple[list[int], float]:
    """`requests` round trips over `concurrency` keep-alive connections, one thread each.

    Returns the per-request latencies and the wall time in seconds from the common start to the
    last answer.
    """
    lock = threading.Lock()
    remaining = [requests]
    results: list[list[int]] = [[] for _ in range(concurrency)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(concurrency + 1)
    clock = time.perf_counter_ns

    def take() -> bool:
        with lock:
            if remaining[0] <= 0:
                return False
            remaining[0] -= 1
            return True

    def worker(index: int) -> None:
        conn: HttpConnection | None = None
        try:
            conn = HttpConnection(*address, timeout_s)
            for _ in range(warmup):
                conn.exchange(request)
            barrier.wait()
            samples = results[index]
            while take():
                t0 = clock()
                status, _, body = conn.exchange(request)
                samples.append(clock() - t0)
                if status != 200:
                    raise BenchError(f"the server answered {status}: {error_text(body)}")
        except threading.BrokenBarrierError:
            pass
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()
            with lock:
                remaining[0] = 0
        finally:
            if conn is not None:
                conn.close()

    threads = [
        threading.Thread(target=worker, args=(i,), name=f"bench-client-{i}", daemon=True)
        for i in range(concurrency)
    ]
    with no_gc():
        for t in threads:
            t.start()
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait()
        start = clock()
        for t in threads:
            t.join()
        wall_s = (clock() - start) / 1e9
    if errors:
        first = errors[0]
        if isinstance(first, ApplianceError):
            raise first
        raise BenchError(f"a client thread failed: {first!r}") from first
    return [s for r in results for s in r], wall_s


def open_loop(
    address: tuple[str, int],
    request: bytes,
    rate: float,
    start: float,
    stop_at: float,
    connections: int,
    timeout_s: float,
    errors: list[str],
) -> tuple[list[threading.Thread], list[list[Answer]]]:
    """Threads that offer `rate` requests/s from `start` to `stop_at` (time.monotonic, which
    other processes share), each keep-alive connection on its own schedule (at once when
    behind), whatever the answers; started, not joined. A client's failure ends its thread and
    is appended to `errors`."""
    interval = connections / rate
    results: list[list[Answer]] = [[] for _ in range(connections)]
    clock = time.monotonic

    def client(index: int) -> None:
        conn: HttpConnection | None = None
        out = results[index]
        due = start + index * interval / connections
        try:
            conn = HttpConnection(*address, timeout_s)
            while due < stop_at and clock() < stop_at:
                wait = due - clock()
                if wait > 0:
                    time.sleep(wait)
                t0 = time.perf_counter_ns()
                status, head, _ = conn.exchange(request)
                took = time.perf_counter_ns() - t0
                out.append((status, took, header(head, b"Retry-After") is not None))
                due += interval
        except BaseException as exc:
            errors.append(repr(exc))
        finally:
            if conn is not None:
                conn.close()

    threads = [
        threading.Thread(target=client, args=(i,), name=f"bench-open-{i}", daemon=True)
        for i in range(connections)
    ]
    for t in threads:
        t.start()
    return threads, results
