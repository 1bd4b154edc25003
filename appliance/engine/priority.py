"""Priority levels of one model's queue: Triton's priorities, plus eviction under overload.

Triton's semantics (dynamic_batching.priority_levels, default_priority_level and a
ModelQueuePolicy per level), kept here:

- A request's `priority` parameter picks its level, 1 being the highest; none, 0 or a number
  above the model's levels take the default level.
- Workers always take from the highest level that has work; within a level, in arrival order.
- A level's `max_queue` bounds the requests of that level waiting at once (more are refused
  with 503, Triton's UNAVAILABLE).
- A level's `timeout_s` bounds how long its requests wait for a worker. Then `reject` answers
  503 (Triton: UNAVAILABLE "Request timeout expired"), and `delay` moves the request behind
  every request of its level still within its wait, arrivals to come included, but still ahead
  of every lower level: Triton's delayed queue, which belongs to the level.

Beyond Triton, which only refuses: when the model is full (max_concurrency + max_queue
admitted, and max_queue of them still waiting: requests a worker took into a batch wait no
more) and a request arrives, the queued request that would run last among those of a lower
level (the lowest level first, the newest first) is evicted with a 503 and Retry-After, and the
arrival takes its place: urgent work is never refused because background work filled the
queue. An arrival with nothing below it (the lowest level, say) is refused at once, as before.

Running requests are never preempted. So that an urgent request need not wait for the run in
progress, a model with levels has `urgent_workers` (1 by default) beside its usual workers:
threads that take only requests above the lowest level, at the event loop's CPU priority (the
usual workers run below it), so a background batch that is running, however large and however
starved of CPU by a flood, is never in an urgent request's way. With none, a level's
`max_batch_size` bounds that wait (a background level's small batches cost it some
throughput). Batches hold requests of one level: a higher level's request never waits for
lower-level rows to be computed in its own run (on a CPU a batch's run time grows with its
rows), and it is never held back by a lower level's batch that is still forming.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from ..config import PriorityConfig


class Queued(Protocol):
    """What the queue needs of a job: its level (1 is the highest)."""

    level: int


J = TypeVar("J", bound=Queued)


@dataclass(frozen=True)
class LevelPolicy:
    """One level's queue policy (config.PriorityQueueConfig, read once)."""

    max_queue: int = 0
    timeout_s: float = 0.0
    delay: bool = False
    #: Most rows in one batch of this level (0: the model's own limit).
    max_rows: int = 0


class Levels(Generic[J]):
    """The waiting requests of one model, one FIFO per level; shared by the event loop thread
    (put, remove, evict, delay) and the model's worker threads (take)."""

    def __init__(self, config: PriorityConfig) -> None:
        self.count = config.levels
        #: The level of requests that give none (or 0, or one out of range).
        self.default = config.default_level or config.levels
        given = {q.level: q for q in config.queues}
        self.policies = tuple(
            LevelPolicy(q.max_queue, q.timeout_s, q.timeout_action == "delay", q.max_batch_size)
            if (q := given.get(level)) is not None
            else LevelPolicy()
            for level in range(1, self.count + 1)
        )
        lock = threading.Lock()
        self._cond = threading.Condition(lock)
        #: Where urgent workers wait (same lock): a put wakes them only for a level they take,
        #: so a flood of background requests does not wake them (each wake-up would take the
        #: interpreter lock from the event loop for nothing).
        self._urgent = threading.Condition(lock)
        #: Per level (index 0 is level 1): waiting within their time, then past it (delayed).
        self._waiting: list[deque[J]] = [deque() for _ in range(self.count)]
        self._delayed: list[deque[J]] = [deque() for _ in range(self.count)]
        self._size = 0
        #: Workers waiting for more requests to join their batch (they need every put).
        self._gathering = 0
        #: Workers waiting that take only some levels (urgent workers), by the last level they
        #: take (index 0 is level 1).
        self._picky = [0] * self.count
        #: How often a waiting urgent worker woke (the tests count wasted wake-ups).
        self.urgent_wakeups = 0
        self._closed = False

    def level_of(self, priority: int | None) -> int:
        """Triton's mapping: 1..levels as given, anything else the default level."""
        if priority is None or not 1 <= priority <= self.count:
            return self.default
        return priority

    def policy(self, level: int) -> LevelPolicy:
        return self.policies[level - 1]

    @property
    def size(self) -> int:
        """Requests waiting, all levels together (an int read: no lock needed)."""
        return self._size

    def queued(self, level: int) -> int:
        with self._cond:
            return len(self._waiting[level - 1]) + len(self._delayed[level - 1])

    def queued_by_level(self) -> tuple[int, ...]:
        with self._cond:
            return tuple(len(w) + len(d) for w, d in zip(self._waiting, self._delayed, strict=True))

    # -- the event loop thread -------------------------------------------------------------
    def put(self, job: J) -> None:
        with self._cond:
            self._waiting[job.level - 1].append(job)
            self._size += 1
            self._wake(job.level, 1)

    def remove(self, job: J) -> bool:
        """Take `job` out of the queue; False if a worker has it already."""
        i = job.level - 1
        with self._cond:
            for queues in (self._waiting, self._delayed):
                try:
                    queues[i].remove(job)
                except ValueError:
                    continue
                self._size -= 1
                return True
        return False

    def delay(self, job: J) -> bool:
        """Move `job` behind its level's requests still within their wait (timeout_action
        "delay"); False if a worker has it already."""
        i = job.level - 1
        with self._cond:
            try:
                self._waiting[i].remove(job)
            except ValueError:
                return False
            self._delayed[i].append(job)
            return True

    def can_evict(self, level: int) -> bool:
        """Whether a request of `level` would find a queued request of a lower level."""
        with self._cond:
            return any(self._waiting[i] or self._delayed[i] for i in range(level, self.count))

    def evict(self, level: int) -> J | None:
        """Take out the queued request that would run last among those below `level`."""
        with self._cond:
            for i in range(self.count - 1, level - 1, -1):
                for q in (self._delayed[i], self._waiting[i]):
                    if q:
                        self._size -= 1
                        return q.pop()
        return None

    def close(self) -> None:
        """Workers finish what is queued, then `take` returns None."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            self._urgent.notify_all()

    # -- worker threads --------------------------------------------------------------------
    def take(self, upto: int = 0) -> J | None:
        """The next request (the highest level's oldest), waiting for one; None once closed
        and empty. `upto`: only from levels 1..upto (an urgent worker's), 0: any level."""
        if not upto or upto >= self.count:
            return self._take_any()
        waiting, delayed = self._waiting[:upto], self._delayed[:upto]
        with self._cond:
            while True:
                for w, d in zip(waiting, delayed, strict=True):
                    q = w or d
                    if q:
                        self._size -= 1
                        return q.popleft()
                if self._closed:
                    return None
                self._picky[upto - 1] += 1
                try:
                    self._urgent.wait()
                finally:
                    self._picky[upto - 1] -= 1
                self.urgent_wakeups += 1

    def _take_any(self) -> J | None:
        with self._cond:
            while not self._size:
                if self._closed:
                    return None
                self._cond.wait()
            for waiting, delayed in zip(self._waiting, self._delayed, strict=True):
                q = waiting or delayed
                if q:
                    self._size -= 1
                    return q.popleft()
        raise AssertionError("the queue's size disagrees with its levels")  # pragma: no cover

    def take_more(self, level: int, accept: Callable[[J], bool | None]) -> None:
        """Offer `level`'s queued requests to `accept`, in order: True takes one out of the
        queue, False leaves it in its place, None stops."""
        i = level - 1
        with self._cond:
            for q in (self._waiting[i], self._delayed[i]):
                kept: deque[J] = deque()
                stop = False
                while q:
                    verdict = accept(q[0])
                    if verdict is None:
                        stop = True
                        break
                    job = q.popleft()
                    if verdict:
                        self._size -= 1
                    else:
                        kept.append(job)
                q.extendleft(reversed(kept))
                if stop:
                    return

    def wait_more(self, level: int, until: float) -> bool:
        """Wait until `until` (perf_counter) or a put; False when the wait should end: time is
        up, the queue closed, or a higher level has work."""
        with self._cond:
            remaining = until - time.perf_counter()
            if remaining <= 0 or self._closed:
                return False
            self._gathering += 1
            try:
                self._cond.wait(remaining)
            finally:
                self._gathering -= 1
            return not self._closed and not any(
                self._waiting[i] or self._delayed[i] for i in range(level - 1)
            )

    def put_back(self, level: int, jobs: list[J]) -> None:
        """Return requests a worker took but will not run now to the front of their level."""
        with self._cond:
            self._waiting[level - 1].extendleft(reversed(jobs))
            self._size += len(jobs)
            self._wake(level, len(jobs))

    def _wake(self, level: int, n: int) -> None:
        """After `n` requests of `level` were queued (the lock held): wake the workers that
        may take them, the urgent ones only if they take that level."""
        if self._gathering:
            self._cond.notify_all()
        else:
            self._cond.notify(n)
        if any(self._picky[level - 1 :]):
            self._urgent.notify_all()
