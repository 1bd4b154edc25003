"""A per-model circuit breaker: a model that keeps failing gets a rest instead of more traffic.

Closed, it counts outcomes over a sliding window (ten buckets of `window_s / 10`); once at least
`min_requests` finished in the window and the failed fraction reaches `error_rate`, it opens.
Open, it refuses at once (the router then sends the request to the task's fallback, or answers
503 with Retry-After) for `open_s`. Then it is half-open: `half_open_probes` requests go through;
if all succeed it closes with a fresh window, and one failure opens it again.

Only server-side faults count as failures (the runtime raising, a timeout). A client's mistake
(4xx) and a full queue (backpressure, 503) say nothing about the model's health and count as
neither. Everything runs on the event loop thread, so plain integers suffice; the clock is
injectable so tests drive time without sleeping.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

from ..config import BreakerConfig
from ..errors import ApplianceError

State = Literal["closed", "open", "half_open"]
#: Gauge values of the states in /metrics.
STATE_VALUE: dict[State, int] = {"closed": 0, "open": 1, "half_open": 2}
_BUCKETS = 10


class CircuitOpen(ApplianceError):
    """The model's circuit breaker is open: it is not asked until it has had a rest."""

    status = 503

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def verdict(exc: BaseException) -> bool | None:
    """False when `exc` is a fault of the model (counts as a failure), None when it is not."""
    if not isinstance(exc, ApplianceError):
        return False
    if exc.status == 500 or exc.status == 504:
        return False
    return None


class Breaker:
    def __init__(self, name: str, config: BreakerConfig, clock: Callable[[], float]) -> None:
        self.name = name
        self.config = config
        self.clock = clock
        self.state: State = "closed"
        #: The model version the counts are about; a new version starts closed.
        self.version = ""
        self.opened_at = 0.0
        #: Times it opened (a counter in /metrics).
        self.trips = 0
        self._width = config.window_s / _BUCKETS
        self._epoch = [-1] * _BUCKETS
        self._ok = [0] * _BUCKETS
        self._failed = [0] * _BUCKETS
        self._probing = 0
        self._probes_ok = 0
        self._last = (0, 0)  # (failed, total) when it last opened, for the message

    def reset(self, version: str) -> None:
        self.version = version
        self.state = "closed"
        self._epoch = [-1] * _BUCKETS
        self._probing = self._probes_ok = 0

    def admit(self) -> bool:
        """Let a request through; True when it is a half-open probe. CircuitOpen otherwise."""
        if self.state == "closed":
            return False
        if self.state == "open":
            left = self.opened_at + self.config.open_s - self.clock()
            if left > 0:
                failed, total = self._last
                raise CircuitOpen(
                    f"model {self.name!r} is failing: its circuit breaker opened after {failed} "
                    f"of {total} requests failed within {self.config.window_s:g} s; it is tried "
                    f"again in {math.ceil(left)} s",
                    left,
                )
            self.state = "half_open"
            self._probing = self._probes_ok = 0
        if self._probing + self._probes_ok >= self.config.half_open_probes:
            raise CircuitOpen(
                f"model {self.name!r} is recovering: its circuit breaker lets only "
                f"{self.config.half_open_probes} probe request(s) through until they succeed",
                1.0,
            )
        self._probing += 1
        return True

    def record(self, probe: bool, ok: bool | None) -> None:
        """The outcome of an admitted request: True success, False failure, None neither."""
        if probe:
            self._probing -= 1
            if self.state != "half_open":
                return
            if ok is False:
                self._open(*self._last)
            elif ok:
                self._probes_ok += 1
                if self._probes_ok >= self.config.half_open_probes:
                    self.reset(self.version)
            return
        if ok is None or self.state != "closed":
            return
        epoch = int(self.clock() // self._width)
        i = epoch % _BUCKETS
        if self._epoch[i] != epoch:
            self._epoch[i], self._ok[i], self._failed[i] = epoch, 0, 0
        if ok:
            self._ok[i] += 1
            return
        self._failed[i] += 1
        failed = total = 0
        for j in range(_BUCKETS):
            if self._epoch[j] > epoch - _BUCKETS:
                failed += self._failed[j]
                total += self._failed[j] + self._ok[j]
        if total >= self.config.min_requests and failed >= self.config.error_rate * total:
            self._open(failed, total)

    def _open(self, failed: int, total: int) -> None:
        self.state = "open"
        self.opened_at = self.clock()
        self.trips += 1
        self._last = (failed, total)
