"""Polling for the peer's next packet before sleeping in the kernel: bounded and self-tuning.

A blocking receive puts the thread to sleep, and on an otherwise idle CPU the CPU itself
halts; the packet that follows then has to wake both, which on a virtual machine goes through
the host (10-55 µs each way measured here, see tests/bench/ipc_floor.py). At c=1 an isolated
model's round trip pays that twice: the worker sleeps between calls and the event loop sleeps
while the worker runs. Polling (non-blocking receives) for a moment first avoids both when the
packet comes soon, as glibc's adaptive mutexes spin before they sleep.

`Spin` decides how long: it keeps an average of the waits seen and polls only while that
average stays under the cap, for twice the average at most. Each wait counts as four times
the cap at most: one idle time stops the polling at once, and a call or two close together
bring it back. Calls far apart (an idle device) therefore poll never, and no wait polls
longer than the cap.

Polling only pays while each side has a CPU of its own. The poll yields the CPU at every turn
(sched_yield: another runnable thread goes first); a turn that took long means another thread
ran, so the CPU is wanted: the wait blocks, and the next ones do not poll at all, more of them
each time this happens again (up to `_MAX_SKIP`), fewer again after a clean poll.
"""

from __future__ import annotations

#: Weight of the newest wait in the average.
_WEIGHT = 0.25
#: Added to twice the average: a wait a little over the usual still ends while polling.
_MARGIN_S = 20e-6
#: A turn of the polling loop longer than this: another thread had the CPU meanwhile.
PREEMPTED_S = 30e-6
#: The most waits that do not poll after the CPU was found wanted.
_MAX_SKIP = 1024


class Spin:
    """How long one side of a channel polls before it blocks (`cap_s` 0: never)."""

    __slots__ = ("_backoff", "average", "cap", "counts", "skip")

    def __init__(self, cap_s: float) -> None:
        self.cap = cap_s
        #: Starts above the cap: no polling before waits were seen to be short.
        self.average = 2 * cap_s
        #: Waits left that block at once (the CPU was found wanted).
        self.skip = 0
        self._backoff = 1
        #: Polls that got their packet, that gave the CPU up, that ran out (for tests and
        #: benchmarks).
        self.counts = [0, 0, 0]

    def window(self) -> float:
        """Seconds to poll for the next packet; 0: block at once."""
        average, cap = self.average, self.cap
        if average >= cap:
            return 0.0
        if self.skip:
            self.skip -= 1
            return 0.0
        return min(cap, 2 * average + _MARGIN_S)

    def expired(self) -> None:
        """A poll ran out before its packet came."""
        self.counts[2] += 1

    def observe(self, waited_s: float) -> None:
        """Learn from one wait (polled, blocked, or both) until the packet came."""
        self.average += _WEIGHT * (min(waited_s, 4 * self.cap) - self.average)

    def caught(self) -> None:
        """A poll got its packet and kept its CPU throughout."""
        self.counts[0] += 1
        self._backoff = max(1, self._backoff >> 1)

    def wanted(self) -> None:
        """Another thread ran on this CPU during a poll: stop polling for a while."""
        self.counts[1] += 1
        self.skip = self._backoff
        self._backoff = min(_MAX_SKIP, self._backoff * 2)
