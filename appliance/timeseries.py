"""The last hour of requests per model, task or pipeline, in memory: what the status page draws.

Why not Prometheus: a device has no Prometheus server, and a technician at a gateway wants the
last hour at a glance. `RequestPath.finish` records each request here (the one place requests
are accounted), so the cost per request is kept to a clock read, a dict lookup, a bisect and
three increments; everything else (rates, percentiles) is worked out when someone asks.

Buckets are `bucket_s` seconds of the monotonic clock (a wall-clock jump neither loses nor
duplicates a bucket); each holds the request count, the 4xx and 5xx counts and a latency
histogram with log-spaced bounds (about ±12 % on a percentile), made when first used.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

#: Latency bounds in seconds: 10 µs * 1.25^k up to about two minutes.
BOUNDS: tuple[float, ...] = tuple(1e-5 * 1.25**k for k in range(74))
#: Names remembered at most (a client may send any name; the known ones come first).
MAX_NAMES = 256


class _Bucket:
    __slots__ = ("at", "client_errors", "count", "end", "errors", "latency")

    def __init__(self, at: int, bucket_s: float) -> None:
        self.at = at
        #: Where the next bucket starts, on the clock (a request before it lands here).
        self.end = (at + 1) * bucket_s
        self.count = 0
        self.errors = 0
        self.client_errors = 0
        self.latency = [0] * (len(BOUNDS) + 1)


class _Ring:
    """The buckets of one name; `current` spares most requests the modulo and the lookup."""

    __slots__ = ("buckets", "current")

    def __init__(self, size: int) -> None:
        self.buckets: list[_Bucket | None] = [None] * size
        self.current: _Bucket | None = None


class RequestSeries:
    """Per name, the last `buckets * bucket_s` seconds of requests (see the module docstring).

    `clock` is monotonic; RequestPath passes the time.perf_counter() it read anyway (also
    monotonic), so recording reads no clock of its own."""

    def __init__(
        self,
        bucket_s: float = 10.0,
        buckets: int = 360,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.bucket_s = bucket_s
        self.size = buckets
        self.clock = clock
        self._rings: dict[str, _Ring] = {}

    def record(self, name: str, status: int, seconds: float, now: float | None = None) -> None:
        """One answered request at `now` on the clock (the hot path: keep it short)."""
        ring = self._rings.get(name)
        if ring is None:
            if len(self._rings) >= MAX_NAMES:
                return
            ring = self._rings[name] = _Ring(self.size)
        if now is None:
            now = self.clock()
        bucket = ring.current
        if bucket is None or now >= bucket.end:
            bucket = self._turn(ring, now)
        bucket.count += 1
        if status >= 400:
            if status >= 500:
                bucket.errors += 1
            else:
                bucket.client_errors += 1
        bucket.latency[bisect_left(BOUNDS, seconds)] += 1

    def _turn(self, ring: _Ring, now: float) -> _Bucket:
        """The bucket `now` falls in: found in the ring, or new in the slot of a lap ago."""
        at = int(now // self.bucket_s)
        slot = at % self.size
        bucket = ring.buckets[slot]
        if bucket is None or bucket.at != at:
            bucket = ring.buckets[slot] = _Bucket(at, self.bucket_s)
        ring.current = bucket
        return bucket

    def names(self) -> list[str]:
        return sorted(self._rings)

    def series(self, name: str, points: int | None = None) -> dict[str, Any]:
        """The last `points` buckets (all by default), oldest first, the current one last:
        requests per second, 5xx share, p50 and p99 in milliseconds (None: no request)."""
        n = self.size if points is None else max(1, min(points, self.size))
        now = int(self.clock() // self.bucket_s)
        ring = self._rings.get(name)
        rate: list[float] = []
        errors: list[float | None] = []
        p50: list[float | None] = []
        p99: list[float | None] = []
        requests = failed = rejected = 0
        for at in range(now - n + 1, now + 1):
            bucket = ring.buckets[at % self.size] if ring is not None else None
            if bucket is None or bucket.at != at or bucket.count == 0:
                rate.append(0.0)
                errors.append(None)
                p50.append(None)
                p99.append(None)
                continue
            requests += bucket.count
            failed += bucket.errors
            rejected += bucket.client_errors
            rate.append(round(bucket.count / self.bucket_s, 3))
            errors.append(round(bucket.errors / bucket.count, 4))
            p50.append(_ms(percentile(bucket.latency, 0.50)))
            p99.append(_ms(percentile(bucket.latency, 0.99)))
        return {
            "bucket_s": self.bucket_s,
            "requests": requests,
            "errors": failed,
            "client_errors": rejected,
            "rate": rate,
            "error_rate": errors,
            "p50_ms": p50,
            "p99_ms": p99,
        }

    def window(self, name: str, seconds: float) -> dict[str, Any]:
        """Totals over the last `seconds` (whole buckets): the summary's numbers."""
        points = max(1, round(seconds / self.bucket_s))
        now = int(self.clock() // self.bucket_s)
        ring = self._rings.get(name)
        merged = [0] * (len(BOUNDS) + 1)
        count = errors = client_errors = 0
        if ring is not None:
            for at in range(now - points + 1, now + 1):
                bucket = ring.buckets[at % self.size]
                if bucket is None or bucket.at != at:
                    continue
                count += bucket.count
                errors += bucket.errors
                client_errors += bucket.client_errors
                for i, c in enumerate(bucket.latency):
                    if c:
                        merged[i] += c
        span = points * self.bucket_s
        return {
            "seconds": span,
            "requests": count,
            "errors": errors,
            "client_errors": client_errors,
            "rate": round(count / span, 3),
            "error_rate": round(errors / count, 4) if count else 0.0,
            "p50_ms": _ms(percentile(merged, 0.50)),
            "p99_ms": _ms(percentile(merged, 0.99)),
        }


def percentile(counts: list[int], q: float) -> float | None:
    """The q-quantile of a histogram over BOUNDS (the geometric middle of its bucket), in
    seconds; None when it is empty."""
    total = sum(counts)
    if not total:
        return None
    rank = q * total
    seen = 0
    for i, c in enumerate(counts):
        seen += c
        if seen >= rank and c:
            if i == 0:
                return BOUNDS[0] / 2
            if i >= len(BOUNDS):
                return BOUNDS[-1]
            return float((BOUNDS[i - 1] * BOUNDS[i]) ** 0.5)
    return BOUNDS[-1]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 4)


@dataclass(frozen=True, slots=True)
class ErrorRecord:
    """One failed request, for the status page's "last errors" (masked when it is shown)."""

    at: float
    status: int
    name: str | None
    path: str
    message: str
    request_id: str


class RecentErrors:
    """The last `size` failed requests (4xx and 5xx), newest last; messages cut to 300 chars."""

    def __init__(self, size: int = 20) -> None:
        self._items: deque[ErrorRecord] = deque(maxlen=size)

    def add(self, status: int, name: str | None, path: str, message: str, rid: str) -> None:
        self._items.append(ErrorRecord(time.time(), status, name, path, message[:300], rid))

    def items(self) -> list[ErrorRecord]:
        return list(self._items)
