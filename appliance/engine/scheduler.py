"""Per-model worker threads with a bounded queue, so inference does not hold the event loop.

The hand-off is a `queue.SimpleQueue` into N threads and `call_soon_threadsafe` back; it is
leaner than `run_in_executor` (no concurrent.futures chaining). Admission is counted on the loop
thread only, so the bound is exact without locks: more than max_concurrency + max_queue requests
are refused at once.

Even so, the two thread wake-ups of a hand-off cost tens of microseconds on a small CPU, more
than a tiny model takes to run. A model whose *measured* runs stay under `inline_max_us` on
average, for inputs no larger than those measured, runs directly on the loop thread when nothing
else of it is queued or running. The loop is then held about that long (less than parsing a
large JSON body takes); anything slower, larger or unmeasured goes to the workers, and two runs
in a row far over the budget send the model back to them at once (one alone may be the loop
thread descheduled on a busy machine: it would have sent a tiny model to the workers, a thread
hop per request, for the next 16 runs).

With a batching policy (engine/batching.py), a worker merges what queued for the model into one
run. Every request keeps its own deadline: one that passed, or that the model's measured run
time can no longer meet, is answered 504 without running (at admission and again on the worker).

A model with priority levels (engine/priority.py) queues in a `Levels` instead, one FIFO per
level with eviction under overload; with one level (the default) nothing of it is on the path.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from ..backends import failure
from ..backends.base import Backend
from ..config import PriorityConfig
from ..errors import ApplianceError, DeadlineExceeded, InferenceFailed, Overloaded
from ..metrics import LevelStats, ModelStats
from .batching import BatchPolicy, merge, merge_key, preferred_cut, rows_of, split
from .priority import Levels

log = logging.getLogger("appliance.engine")

Arrays = dict[str, np.ndarray[Any, Any]]
T = TypeVar("T")

#: Runs measured on workers before a model may run inline.
_LEARN_RUNS = 16
#: One run this many times over the budget sends the model back to the workers at once.
_OUTLIER = 4.0
#: Lone runs whose fastest bounds the time a request still needs (deadline drops).
_SOLO_RUNS = 8
#: That bound is trusted only this long after the model last ran.
_STALE_S = 5.0
#: The run-time estimate before any run.
_UNMEASURED = float("inf")


@dataclass(slots=True)
class Timing:
    queue_s: float
    compute_s: float
    inline: bool = False
    #: Requests that shared the runtime call.
    batch: int = 1
    #: When it was queued (time.perf_counter): the queue wait and the run follow (traces).
    start: float = 0.0


class _Job:
    __slots__ = (
        "batch",
        "cancelled",
        "deadline",
        "enqueued",
        "error",
        "finished",
        "fn",
        "future",
        "inputs",
        "key",
        "level",
        "nbytes",
        "outputs",
        "ran",
        "result",
        "rows",
        "started",
        "stop",
        "timer",
    )

    def __init__(
        self,
        inputs: Arrays,
        outputs: list[str] | None,
        future: asyncio.Future[Any],
        deadline: float,
        nbytes: int,
    ) -> None:
        self.inputs = inputs
        self.outputs = outputs
        self.future = future
        self.deadline = deadline
        self.nbytes = nbytes
        self.enqueued = time.perf_counter()
        self.started = 0.0
        self.finished = 0.0
        self.cancelled = False
        self.result: Arrays | None = None
        self.error: BaseException | None = None
        self.timer: asyncio.TimerHandle | None = None
        #: Work other than a tensor batch (a generation, an embedding), run on the worker.
        self.fn: Callable[[Backend, Callable[[], bool]], Any] | None = None
        self.stop: Callable[[], bool] | None = None
        #: Worker-side: the merge key (see batching.merge_key), rows, whether the runtime ran it
        #: and with how many requests.
        self.key: Hashable = None
        self.rows = 0
        self.ran = False
        self.batch = 1
        #: Its priority level (1 is the highest; 0 when the model has one level).
        self.level = 0

    def is_cancelled(self) -> bool:
        return self.cancelled or (self.stop is not None and self.stop())


def lower_priority(nice: int) -> None:
    """Lower the calling thread's CPU priority by `nice` (Linux: each thread has its own).

    Workers and the runtime's own threads run below the event loop, so that on a saturated CPU
    the loop still answers at once: health, metrics and fast 503s under overload. Threads a
    thread starts inherit its priority. Best effort: silently unchanged where not supported."""
    if nice <= 0:
        return
    try:
        tid = threading.get_native_id()
        current = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, current + nice))
    except (AttributeError, OSError):
        pass


#: One runtime call a worker made: (compute seconds, input bytes, requests in it).
_Run = tuple[float, int, int]


class ModelRunner:
    def __init__(
        self,
        backend: Backend,
        label: str,
        concurrency: int,
        max_queue: int,
        stats: ModelStats,
        inline_max_us: float = 0.0,
        batching: BatchPolicy | None = None,
        nice: int = 0,
        priority: PriorityConfig | None = None,
    ) -> None:
        self.backend = backend
        self.label = label
        self.concurrency = concurrency if backend.thread_safe else 1
        self.max_queue = max_queue
        self._limit = self.concurrency + max_queue
        self._stats = stats
        self._loop = asyncio.get_running_loop()
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._pending = 0
        self._running = 0  # jobs inside backend.run on a worker (workers update it, locked)
        self._running_lock = threading.Lock()
        #: Read by the workers before each batch; set to None there if the model cannot batch.
        self.batching = batching
        #: How much lower the workers' CPU priority is than the event loop's.
        self.nice = nice
        self._input_names = [t.name for t in backend.signature.inputs]
        # Inline fast path (loop thread only): the budget, the runs measured so far, a decayed
        # estimate of the compute time, and the largest input measured within the budget.
        self._inline_budget = inline_max_us / 1e6
        self._measured = 0
        self._estimate = _UNMEASURED
        self._fast_nbytes = -1
        self._struck = False  # the last run was far over the budget
        #: When the last inline run started, and its compute seconds (for traces).
        self.inline_start = 0.0
        self.inline_s = 0.0
        # Deadline drops (read by workers too): the fastest of the recent runs of one request
        # alone, a lower bound of what a request still needs; and when a run last finished.
        self._solo: deque[float] = deque(maxlen=_SOLO_RUNS)
        self._floor = 0.0
        self._ran_at = 0.0
        #: Queues by priority level; None with one level (the SimpleQueue serves it).
        self._levels: Levels[_Job] | None = None
        #: Heads admitted (`admit_head`) whose requests are not queued yet, per level, and in
        #: all (loop thread only; see admit_head).
        self._heads: list[int] = []
        self._heads_total = 0
        work: Callable[[], None] = self._work
        urgent = 0
        if priority is not None and priority.levels > 1:
            levels = self._levels = Levels(priority)
            self._heads = [0] * levels.count
            if len(stats.levels) != levels.count:
                stats.levels = [LevelStats() for _ in range(levels.count)]
            if backend.thread_safe:
                urgent = priority.urgent_workers

            def work() -> None:
                self._work_levels(levels)

        self._threads = [
            threading.Thread(target=work, name=f"infer-{label}-{i}", daemon=True)
            for i in range(self.concurrency)
        ]
        if urgent:
            assert self._levels is not None
            self._threads += [
                threading.Thread(
                    target=self._work_levels,
                    args=(self._levels, self._levels.count - 1),
                    name=f"urgent-{label}-{i}",
                    daemon=True,
                )
                for i in range(urgent)
            ]
        #: Whether the model has priority levels (more than one).
        self.has_levels = self._levels is not None
        for t in self._threads:
            t.start()

    @property
    def pending(self) -> int:
        """Requests queued or running on workers (loop thread only)."""
        return self._pending

    @property
    def running(self) -> int:
        """Requests inside the runtime on a worker right now."""
        return self._running

    @property
    def priority_levels(self) -> int:
        return self._levels.count if self._levels is not None else 1

    def queued_by_level(self) -> tuple[int, ...]:
        """Requests waiting per priority level, from level 1; () with one level."""
        return self._levels.queued_by_level() if self._levels is not None else ()

    def floor_s(self, now: float) -> float:
        """The least time a request still needs to run (0 when unknown).

        The fastest of the last few lone runs: one slow run cannot raise it. If no run finished
        for a while (every request was dropped for lack of time, say), it is 0 until a request
        runs and measures the model again, so a stale figure cannot refuse requests for ever."""
        return self._floor if now - self._ran_at < _STALE_S else 0.0

    def _learn(self, seconds: float, nbytes: int, size: int = 1, now: float = 0.0) -> None:
        self._ran_at = now or time.perf_counter()
        if size == 1:
            solo = self._solo
            if len(solo) < _SOLO_RUNS:
                solo.append(seconds)
                self._floor = min(solo)
            else:  # the fastest of the last runs, without a pass over them on most runs
                dropped = solo[0]
                solo.append(seconds)
                if seconds <= self._floor:
                    self._floor = seconds
                elif dropped <= self._floor:
                    self._floor = min(solo)
        self._measured += 1
        outlier = seconds > _OUTLIER * self._inline_budget
        if outlier and not self._struck:
            # Once may be the machine: the thread descheduled mid-run by another process (a
            # time slice is milliseconds, a tiny model's run microseconds). Left out of the
            # estimate; the next run tells.
            self._struck = True
            return
        self._struck = outlier
        est = self._estimate
        self._estimate = seconds if est == _UNMEASURED else est + 0.2 * (seconds - est)
        if seconds <= self._inline_budget:
            if nbytes > self._fast_nbytes:
                self._fast_nbytes = nbytes
        elif outlier:
            # Far over the budget twice in a row: the model (or this input size) is slow, not
            # a hiccup: measure on the workers again before trusting the loop with it.
            self._measured = 0
            self._fast_nbytes = min(self._fast_nbytes, nbytes - 1)

    async def run(
        self,
        inputs: Arrays,
        outputs: list[str] | None,
        timeout_s: float,
        priority: int | None = None,
        inline: bool = True,
    ) -> tuple[Arrays, Timing]:
        """Run one request; `priority` is Triton's (1 the highest; None, 0 or out of range the
        model's default level). `inline=False`: always through the queue, for requests sent
        together that the batcher should merge (a pipeline's fan-out rows)."""
        if timeout_s < self._floor:
            self._check_floor(timeout_s)
        nbytes = self.inline_bytes(inputs) if inline else -1
        if nbytes >= 0:
            if self._levels is not None:
                return self._run_inline_level(
                    self._levels.level_of(priority), inputs, outputs, nbytes
                )
            ran = self._run_inline(inputs, outputs, nbytes)
            return ran, Timing(0.0, self.inline_s, True, 1, self.inline_start)
        nbytes = 0
        for array in inputs.values():
            nbytes += array.nbytes
        job = self._submit(inputs, outputs, timeout_s, nbytes, None, priority)
        result: Arrays = await job.future
        return result, Timing(
            job.started - job.enqueued, job.finished - job.started, False, job.batch, job.enqueued
        )

    def inline_bytes(self, inputs: Arrays) -> int:
        """The inputs' size when the request would run inline now (see the module docstring;
        loop thread only), else -1. Only a decision: nothing is counted or run."""
        if (
            self._pending
            or self._measured < _LEARN_RUNS
            or self._estimate > self._inline_budget
            or self._fast_nbytes < 0
        ):
            return -1
        nbytes = 0
        for array in inputs.values():
            nbytes += array.nbytes
        return nbytes if nbytes <= self._fast_nbytes else -1

    def run_now(
        self, inputs: Arrays, outputs: list[str] | None, timeout_s: float, nbytes: int
    ) -> Arrays:
        """`run` for a request `inline_bytes` took (`nbytes`), on the loop thread at once with
        no coroutine, for a model with one priority level (not `has_levels`). Its run's start and
        compute time are left in `inline_start` and `inline_s` (for a traced request)."""
        if timeout_s < self._floor:
            self._check_floor(timeout_s)
        return self._run_inline(inputs, outputs, nbytes)

    def _check_floor(self, timeout_s: float) -> None:
        """504 for a timeout shorter than the model's measured run time, unless that figure
        is stale (see floor_s)."""
        floor = self.floor_s(time.perf_counter())
        if timeout_s < floor:
            raise DeadlineExceeded(
                f"model {self.label}: the request's timeout of {timeout_s * 1e3:g} ms is shorter "
                f"than the model's measured run time of {floor * 1e3:.3g} ms; not queued"
            )

    async def call(
        self,
        fn: Callable[[Backend, Callable[[], bool]], T],
        timeout_s: float,
        stop: Callable[[], bool] | None = None,
        priority: int | None = None,
    ) -> T:
        """Run `fn(backend, cancelled)` on a worker, under the same queue bound and deadline.

        `cancelled()` turns true once the deadline passed or `stop()` does (a client that went
        away): long work such as a generation polls it and ends early. Never batched."""
        job = self._submit({}, None, timeout_s, 0, fn, priority)
        if stop is not None:
            job.stop = stop
        result: T = await job.future
        return result

    def check_capacity(self, priority: int | None = None) -> None:
        """Raise Overloaded when a request (of this priority) would be refused now (loop thread
        only). With priority levels, one that would evict a lower level's request passes."""
        levels = self._levels
        if levels is not None:
            self._make_room(levels, levels.level_of(priority), False)
        elif self._pending >= self._limit:
            raise Overloaded(
                f"model {self.label} is at capacity ({self.concurrency} running, "
                f"{self.max_queue} queued); retry later"
            )

    def admit_head(self, priority: int | None = None) -> None:
        """`check_capacity` for a request known only by its head (loop thread), whose body is
        yet to be read and decoded; with priority levels, the heads admitted in one round of
        the event loop count against the queue until their requests are queued.

        Why: under a flood, the loop reads the heads of many connections in one round, before
        any of their bodies is decoded; each one alone finds the room a worker just freed, so
        all would pass and be decoded, and all but the few that fit would then be refused,
        the costliest way. Counting the round's admitted heads refuses those from their heads
        (a decode saved per refusal). The count ends with the round, before the bodies are
        decoded (a callback queued ahead of their tasks), and a request queued meanwhile takes
        its level's count down: a body that comes late, or a request that fails before it is
        queued, keeps a place only until then."""
        levels = self._levels
        if levels is None:
            if self._pending >= self._limit:
                self.check_capacity(priority)  # (raises)
            return
        level = levels.level_of(priority)
        self._make_room(levels, level, False, True)
        if not self._heads_total:
            self._loop.call_soon(self._round_over)
        self._heads[level - 1] += 1
        self._heads_total += 1

    def _round_over(self) -> None:
        self._heads_total = 0
        self._heads = [0] * len(self._heads)

    def _queued_head(self, level: int) -> None:
        """A request of `level` is queued or run: one head admitted of its level is no more."""
        i = level - 1
        if self._heads and self._heads[i]:
            self._heads[i] -= 1
            self._heads_total -= 1

    def _submit(
        self,
        inputs: Arrays,
        outputs: list[str] | None,
        timeout_s: float,
        nbytes: int,
        fn: Callable[[Backend, Callable[[], bool]], Any] | None,
        priority: int | None = None,
    ) -> _Job:
        if self._levels is not None:
            return self._submit_level(
                self._levels, inputs, outputs, timeout_s, nbytes, fn, priority
            )
        self.check_capacity()
        loop = self._loop
        future: asyncio.Future[Any] = loop.create_future()
        job = _Job(inputs, outputs, future, time.perf_counter() + timeout_s, nbytes)
        job.fn = fn
        job.timer = loop.call_later(timeout_s, self._expire, job, timeout_s)
        self._pending += 1
        self._queue.put(job)
        return job

    def _run_inline(self, inputs: Arrays, outputs: list[str] | None, nbytes: int) -> Arrays:
        stats = self._stats
        stats.inline += 1  # (also its queue wait of 0 and its batch of 1: see ModelStats)
        self.inline_start = start = time.perf_counter()
        try:
            result = self.backend.run(inputs, outputs)
        except ApplianceError:
            raise
        except Exception as exc:
            log.exception("model %s failed", self.label)
            raise InferenceFailed(
                f"model {self.label} failed: {failure(self.backend, exc)}"
            ) from None
        finally:
            end = time.perf_counter()
            self.inline_s = elapsed = end - start
            stats.compute.observe(elapsed)
            self._learn(elapsed, nbytes, 1, end)
        return result

    def _expire(self, job: _Job, timeout_s: float) -> None:
        job.cancelled = True
        if self._levels is not None and self._levels.remove(job):
            self._pending -= 1  # its place in the queue is free at once
        if not job.future.done():
            where = "while running" if job.started else "in the queue"
            job.future.set_exception(
                DeadlineExceeded(f"model {self.label}: timed out after {timeout_s:g} s {where}")
            )

    def _done(self, jobs: list[_Job], runs: list[_Run]) -> None:
        """Back on the loop thread: answer the jobs a worker finished, record its runs."""
        stats = self._stats
        for compute, nbytes, size in runs:
            if nbytes >= 0:  # a tensor run, not a generation
                stats.batch.observe(size)
                self._learn(compute, nbytes, size)
        for job in jobs:
            self._pending -= 1
            stats.queue.observe(job.started - job.enqueued)
            if job.ran:
                stats.compute.observe(job.finished - job.started)
            if job.timer is not None:
                job.timer.cancel()
            fut = job.future
            if fut.done():
                continue
            if job.error is not None:
                fut.set_exception(job.error)
            else:
                fut.set_result(job.result)

    # -- priority levels (engine/priority.py) --------------------------------------------------
    def _make_room(self, levels: Levels[_Job], level: int, evict: bool, head: bool = False) -> None:
        """Admit a request of `level` (loop thread): refuse it, or with `evict` make room by
        evicting a lower level's queued request when the model is full; `evict` False only
        checks. `head`: the heads this round admitted count as queued (admit_head)."""
        policy = levels.policy(level)
        heads, mine = (self._heads_total, self._heads[level - 1]) if head else (0, 0)
        if policy.max_queue and levels.queued(level) + mine >= policy.max_queue:
            self._stats.levels[level - 1].refused += 1
            raise Overloaded(
                f"model {self.label}: priority level {level} has {policy.max_queue} requests "
                "waiting, its max_queue; retry later"
            )
        if self._pending + heads < self._limit or levels.size + heads < self.max_queue:
            return  # (requests in a running batch count in `pending`, but wait no more)
        if not evict:
            # (a head of a lower level may yet be queued, then evicted for this one)
            if levels.can_evict(level) or (head and any(self._heads[level:])):
                return
        else:
            victim = levels.evict(level)
            if victim is not None:
                self._evict(victim, level)
                return
        self._stats.levels[level - 1].refused += 1
        raise Overloaded(
            f"model {self.label} is at capacity ({self.concurrency} running, {self.max_queue} "
            f"queued), none of them below priority level {level}; retry later"
        )

    def _evict(self, victim: _Job, level: int) -> None:
        """Answer a queued request 503 to make room for one of a higher `level`."""
        self._pending -= 1
        victim.cancelled = True
        if victim.timer is not None:
            victim.timer.cancel()
        self._stats.levels[victim.level - 1].evicted += 1
        if not victim.future.done():
            victim.future.set_exception(
                Overloaded(
                    f"model {self.label} is at capacity: this request (priority level "
                    f"{victim.level}) was evicted from the queue for one of level {level}; "
                    "retry later"
                )
            )

    def _submit_level(
        self,
        levels: Levels[_Job],
        inputs: Arrays,
        outputs: list[str] | None,
        timeout_s: float,
        nbytes: int,
        fn: Callable[[Backend, Callable[[], bool]], Any] | None,
        priority: int | None,
    ) -> _Job:
        level = levels.level_of(priority)
        self._make_room(levels, level, True)
        self._queued_head(level)
        loop = self._loop
        future: asyncio.Future[Any] = loop.create_future()
        job = _Job(inputs, outputs, future, time.perf_counter() + timeout_s, nbytes)
        job.fn = fn
        job.level = level
        wait = levels.policy(level).timeout_s
        if wait and wait < timeout_s:
            job.timer = loop.call_later(wait, self._waited, job, timeout_s)
        else:
            job.timer = loop.call_later(timeout_s, self._expire, job, timeout_s)
        self._pending += 1
        levels.put(job)
        return job

    def _waited(self, job: _Job, timeout_s: float) -> None:
        """The request's level timeout passed (loop thread): reject or delay it if it is still
        queued; its own deadline keeps counting either way."""
        levels = self._levels
        assert levels is not None
        policy, stats = levels.policy(job.level), self._stats.levels[job.level - 1]
        if policy.delay:
            if levels.delay(job):
                stats.delayed += 1
        elif levels.remove(job):
            self._pending -= 1
            job.cancelled = True
            stats.rejected += 1
            if not job.future.done():
                job.future.set_exception(
                    Overloaded(
                        f"model {self.label}: the request waited {policy.timeout_s:g} s in the "
                        f"queue, the timeout_s of priority level {job.level}; retry later"
                    )
                )
            return
        remaining = max(0.0, job.deadline - time.perf_counter())
        job.timer = self._loop.call_later(remaining, self._expire, job, timeout_s)

    def _run_inline_level(
        self, level: int, inputs: Arrays, outputs: list[str] | None, nbytes: int
    ) -> tuple[Arrays, Timing]:
        self._queued_head(level)
        result = self._run_inline(inputs, outputs, nbytes)
        stats = self._stats.levels[level - 1]
        stats.queue.observe(0.0)
        stats.total.observe(self.inline_s)
        return result, Timing(0.0, self.inline_s, True, 1, self.inline_start)

    def _done_levels(self, jobs: list[_Job], runs: list[_Run]) -> None:
        self._done(jobs, runs)
        levels = self._stats.levels
        for job in jobs:
            stats = levels[job.level - 1]
            stats.queue.observe(job.started - job.enqueued)
            stats.total.observe(job.finished - job.enqueued)

    def _work_levels(self, levels: Levels[_Job], upto: int = 0) -> None:
        """A worker of a model with priority levels: the highest level's requests first, a
        batch from one level (see engine/priority.py). An urgent worker (`upto`: the levels it
        takes, 1..upto) stays at the event loop's CPU priority."""
        if not upto:
            lower_priority(self.nice)
        call = self._loop.call_soon_threadsafe
        while True:
            first = levels.take(upto)
            if first is None:
                return
            jobs = [first]
            policy = self.batching
            if policy is not None and first.fn is None:
                self._gather_level(levels, first, jobs, policy)
            runs = self._execute(jobs)
            try:
                call(self._done_levels, jobs, runs)
            except RuntimeError:  # loop closed during shutdown
                return

    def _gather_level(
        self, levels: Levels[_Job], first: _Job, jobs: list[_Job], policy: BatchPolicy
    ) -> None:
        """Add to `jobs` the queued requests of `first`'s level that can share its run, in
        order; the others keep their places (waiting, unless the policy has a delay)."""
        names = self._input_names
        if first.key is None:
            first.key = merge_key(names, first.inputs, first.outputs) or False
            first.rows = rows_of(names, first.inputs) if first.key else 0
        key, limit = first.key, policy.max_rows
        level = first.level
        if levels.policy(level).max_rows:
            limit = min(limit, levels.policy(level).max_rows)
        rows = first.rows
        if not key or rows >= limit:
            return

        def accept(job: _Job) -> bool | None:
            nonlocal rows
            if job.fn is not None:
                return False
            if job.key is None:
                job.key = merge_key(names, job.inputs, job.outputs) or False
                job.rows = rows_of(names, job.inputs) if job.key else 0
            if job.key != key:
                return False
            if rows + job.rows > limit:
                return None
            jobs.append(job)
            rows += job.rows
            return True

        levels.take_more(level, accept)
        if policy.max_delay_s:
            until = time.perf_counter() + policy.max_delay_s
            while rows < policy.target and levels.wait_more(level, until):
                levels.take_more(level, accept)
        if policy.preferred and len(jobs) > 1:
            cut = preferred_cut([j.rows for j in jobs], policy.preferred)
            if cut < len(jobs):
                levels.put_back(level, jobs[cut:])
                del jobs[cut:]

    # -- worker threads --------------------------------------------------------------------
    def _work(self) -> None:
        lower_priority(self.nice)
        call = self._loop.call_soon_threadsafe
        get = self._queue.get
        #: Jobs this worker took from the queue but could not merge into its current batch;
        #: they come first next time, in order.
        carry: deque[_Job] = deque()
        stopping = False
        while True:
            if carry:
                first = carry.popleft()
            else:
                got = None if stopping else get()
                if got is None:
                    return
                first = got
            policy = self.batching
            jobs = [first]
            if policy is not None and first.fn is None:
                stopping = self._gather(first, jobs, carry, policy) or stopping
            runs = self._execute(jobs)
            try:
                call(self._done, jobs, runs)
            except RuntimeError:  # loop closed during shutdown
                return

    def _gather(
        self, first: _Job, jobs: list[_Job], carry: deque[_Job], policy: BatchPolicy
    ) -> bool:
        """Add to `jobs` what can share `first`'s run: carried jobs, then the queue's (without
        waiting, unless the policy has a delay). Returns True if the stop signal was taken."""
        names = self._input_names
        if first.key is None:
            first.key = merge_key(names, first.inputs, first.outputs) or False
            first.rows = rows_of(names, first.inputs) if first.key else 0
        key, rows, limit = first.key, first.rows, policy.max_rows
        if not key or rows >= limit:
            return False
        kept: deque[_Job] = deque()
        while carry:
            held = carry.popleft()
            if held.key == key and rows + held.rows <= limit:
                jobs.append(held)
                rows += held.rows
            else:
                kept.append(held)
        carry.extend(kept)
        stopping = False
        get, get_nowait = self._queue.get, self._queue.get_nowait
        wait_until = time.perf_counter() + policy.max_delay_s if policy.max_delay_s else 0.0
        while rows < limit:
            job: _Job | None
            try:
                job = get_nowait()
            except queue.Empty:
                if not wait_until or rows >= policy.target:
                    break
                remaining = wait_until - time.perf_counter()
                if remaining <= 0:
                    break
                try:
                    job = get(timeout=remaining)
                except queue.Empty:
                    break
            if job is None:
                stopping = True
                break
            if job.fn is None:
                job.key = merge_key(names, job.inputs, job.outputs) or False
                job.rows = rows_of(names, job.inputs) if job.key else 0
            if job.fn is not None or job.key != key:
                carry.append(job)
            elif rows + job.rows > limit:
                carry.append(job)
                break
            else:
                jobs.append(job)
                rows += job.rows
        if policy.preferred and len(jobs) > 1:
            cut = preferred_cut([j.rows for j in jobs], policy.preferred)
            carry.extendleft(reversed(jobs[cut:]))
            del jobs[cut:]
        return stopping

    def _admit(self, job: _Job, now: float) -> bool:
        """Whether a queued job should still run; if not, its error is set."""
        if job.cancelled or now > job.deadline:
            job.error = DeadlineExceeded(
                f"model {self.label}: the deadline passed while the request was queued"
            )
            return False
        floor = self.floor_s(now)
        if job.fn is None and now + floor > job.deadline:
            job.error = DeadlineExceeded(
                f"model {self.label}: dropped before running: {(job.deadline - now) * 1e3:.3g} "
                f"ms were left of the request's timeout, the model's measured run time is "
                f"{floor * 1e3:.3g} ms"
            )
            return False
        return True

    def _execute(self, jobs: list[_Job]) -> list[_Run]:
        """Run the jobs (merged when more than one); set each one's result or error."""
        now = time.perf_counter()
        live = []
        for job in jobs:
            job.started = job.finished = now
            if self._admit(job, now):
                live.append(job)
        if len(live) > 1:
            runs = self._run_merged(live)
            if runs is not None:
                return runs
            # a failed batch: each member on its own, so one bad input fails only itself
            runs = []
            for job in live:
                now = time.perf_counter()
                job.started = job.finished = now
                if self._admit(job, now):
                    runs.append(self._run_one(job))
            return runs
        return [self._run_one(job) for job in live]

    def _run_one(self, job: _Job) -> _Run:
        lock = self._running_lock
        with lock:
            self._running += 1
        job.started = start = time.perf_counter()
        job.ran = True
        try:
            if job.fn is not None:
                job.result = job.fn(self.backend, job.is_cancelled)
            else:
                job.result = self.backend.run(job.inputs, job.outputs)
        except ApplianceError as exc:
            job.error = exc
        except Exception as exc:
            log.exception("model %s failed", self.label)
            job.error = InferenceFailed(f"model {self.label} failed: {failure(self.backend, exc)}")
        finally:
            with lock:
                self._running -= 1
        job.finished = end = time.perf_counter()
        # generation jobs do not teach the inline path or the run-time estimate
        return (end - start, -1 if job.fn is not None else job.nbytes, 1)

    def _run_merged(self, jobs: list[_Job]) -> list[_Run] | None:
        """One runtime call for all the jobs; None when that failed and nothing was set."""
        names, first = self._input_names, jobs[0]
        lock = self._running_lock
        inputs = merge(names, [j.inputs for j in jobs])
        with lock:
            self._running += len(jobs)
        start = time.perf_counter()
        try:
            outputs = self.backend.run(inputs, first.outputs)
        except Exception as exc:
            log.info(
                "model %s: a batch of %d requests failed (%s); running them one by one",
                self.label,
                len(jobs),
                exc.message if isinstance(exc, ApplianceError) else repr(exc),
            )
            return None
        finally:
            with lock:
                self._running -= len(jobs)
        end = time.perf_counter()
        parts = split(outputs, [j.rows for j in jobs])
        if parts is None:
            self.batching = None
            log.warning(
                "model %s: its outputs have no batch dimension (%s for %d rows): batching is "
                "off for it",
                self.label,
                ", ".join(f"{n} {list(a.shape)}" for n, a in outputs.items()),
                sum(j.rows for j in jobs),
            )
            return None
        for job, part in zip(jobs, parts, strict=True):
            job.started, job.finished, job.ran, job.batch = start, end, True, len(jobs)
            job.result = part
        return [(end - start, sum(j.nbytes for j in jobs), len(jobs))]

    async def stop(self) -> None:
        """Finish what is queued, then stop the threads."""
        if self._levels is not None:
            self._levels.close()
        else:
            for _ in self._threads:
                self._queue.put(None)
        await asyncio.to_thread(self._join)

    def _join(self) -> None:
        for t in self._threads:
            t.join()
