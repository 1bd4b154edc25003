"""Per-model worker threads with a bounded queue, so inference does not hold the event loop.

The hand-off is a `queue.SimpleQueue` into N threads and `call_soon_threadsafe` back; it is
leaner than `run_in_executor` (no concurrent.futures chaining). Admission is counted on the loop
thread only, so the bound is exact without locks: more than max_concurrency + max_queue requests
are refused at once.

Even so, the two thread wake-ups of a hand-off cost tens of microseconds on a small CPU, more
than a tiny model takes to run. A model whose *measured* runs stay under `inline_max_us` on
average, for inputs no larger than those measured, runs directly on the loop thread when nothing
else of it is queued or running. The loop is then held about that long (less than parsing a
large JSON body takes); anything slower, larger or unmeasured goes to the workers, and one run
far over the budget sends the model back to them at once.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from ..backends.base import Backend
from ..errors import ApplianceError, DeadlineExceeded, InferenceFailed, Overloaded
from ..metrics import ModelStats

log = logging.getLogger("appliance.engine")

Arrays = dict[str, np.ndarray[Any, Any]]
T = TypeVar("T")

#: Runs measured on workers before a model may run inline.
_LEARN_RUNS = 16
#: One run this many times over the budget sends the model back to the workers at once.
_OUTLIER = 4.0


@dataclass(frozen=True)
class Timing:
    queue_s: float
    compute_s: float
    inline: bool = False


class _Job:
    __slots__ = (
        "cancelled",
        "deadline",
        "enqueued",
        "error",
        "finished",
        "fn",
        "future",
        "inputs",
        "nbytes",
        "outputs",
        "result",
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

    def is_cancelled(self) -> bool:
        return self.cancelled or (self.stop is not None and self.stop())


class ModelRunner:
    def __init__(
        self,
        backend: Backend,
        label: str,
        concurrency: int,
        max_queue: int,
        stats: ModelStats,
        inline_max_us: float = 0.0,
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
        # Inline fast path (loop thread only): the budget, the runs measured so far, a decayed
        # estimate of the compute time, and the largest input measured within the budget.
        self._inline_budget = inline_max_us / 1e6
        self._measured = 0
        self._estimate = float("inf")
        self._fast_nbytes = -1
        self._threads = [
            threading.Thread(target=self._work, name=f"infer-{label}-{i}", daemon=True)
            for i in range(self.concurrency)
        ]
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

    def _learn(self, seconds: float, nbytes: int) -> None:
        self._measured += 1
        est = self._estimate
        self._estimate = seconds if est == float("inf") else est + 0.2 * (seconds - est)
        if seconds <= self._inline_budget:
            self._fast_nbytes = max(self._fast_nbytes, nbytes)
        elif seconds > _OUTLIER * self._inline_budget:
            # Far slower than the budget, not a scheduling hiccup (those only move the
            # estimate): measure on the workers again before trusting the loop with this model.
            self._measured = 0
            self._fast_nbytes = min(self._fast_nbytes, nbytes - 1)

    async def run(
        self, inputs: Arrays, outputs: list[str] | None, timeout_s: float
    ) -> tuple[Arrays, Timing]:
        nbytes = sum(a.nbytes for a in inputs.values())
        if (
            self._pending == 0
            and self._measured >= _LEARN_RUNS
            and self._estimate <= self._inline_budget
            and nbytes <= self._fast_nbytes
        ):
            return self._run_inline(inputs, outputs, nbytes)
        job = self._submit(inputs, outputs, timeout_s, nbytes, None)
        result: Arrays = await job.future
        return result, Timing(job.started - job.enqueued, job.finished - job.started)

    async def call(
        self,
        fn: Callable[[Backend, Callable[[], bool]], T],
        timeout_s: float,
        stop: Callable[[], bool] | None = None,
    ) -> T:
        """Run `fn(backend, cancelled)` on a worker, under the same queue bound and deadline.

        `cancelled()` turns true once the deadline passed or `stop()` does (a client that went
        away): long work such as a generation polls it and ends early."""
        job = self._submit({}, None, timeout_s, 0, fn)
        if stop is not None:
            job.stop = stop
        result: T = await job.future
        return result

    def _submit(
        self,
        inputs: Arrays,
        outputs: list[str] | None,
        timeout_s: float,
        nbytes: int,
        fn: Callable[[Backend, Callable[[], bool]], Any] | None,
    ) -> _Job:
        if self._pending >= self._limit:
            raise Overloaded(
                f"model {self.label} is at capacity ({self.concurrency} running, "
                f"{self.max_queue} queued); retry later"
            )
        loop = self._loop
        future: asyncio.Future[Any] = loop.create_future()
        job = _Job(inputs, outputs, future, time.perf_counter() + timeout_s, nbytes)
        job.fn = fn
        job.timer = loop.call_later(timeout_s, self._expire, job, timeout_s)
        self._pending += 1
        self._queue.put(job)
        return job

    def _run_inline(
        self, inputs: Arrays, outputs: list[str] | None, nbytes: int
    ) -> tuple[Arrays, Timing]:
        stats = self._stats
        stats.inline += 1
        stats.queue.observe(0.0)
        start = time.perf_counter()
        try:
            result = self.backend.run(inputs, outputs)
        except ApplianceError:
            raise
        except Exception as exc:
            log.exception("model %s failed", self.label)
            raise InferenceFailed(f"model {self.label} failed: {exc}") from None
        finally:
            elapsed = time.perf_counter() - start
            stats.compute.observe(elapsed)
            self._learn(elapsed, nbytes)
        return result, Timing(0.0, elapsed, inline=True)

    def _expire(self, job: _Job, timeout_s: float) -> None:
        job.cancelled = True
        if not job.future.done():
            where = "while running" if job.started else "in the queue"
            job.future.set_exception(
                DeadlineExceeded(f"model {self.label}: timed out after {timeout_s:g} s {where}")
            )

    def _done(self, job: _Job, ran: bool) -> None:
        self._pending -= 1
        self._stats.queue.observe(job.started - job.enqueued)
        if ran:
            compute = job.finished - job.started
            self._stats.compute.observe(compute)
            if job.fn is None:
                self._learn(compute, job.nbytes)
        if job.timer is not None:
            job.timer.cancel()
        fut = job.future
        if fut.done():
            return
        if job.error is not None:
            fut.set_exception(job.error)
        else:
            fut.set_result(job.result)

    def _work(self) -> None:
        backend, call, lock = self.backend, self._loop.call_soon_threadsafe, self._running_lock
        while (job := self._queue.get()) is not None:
            job.started = start = time.perf_counter()
            ran = not (job.cancelled or start > job.deadline)
            if not ran:
                job.error = DeadlineExceeded(
                    f"model {self.label}: the deadline passed while the request was queued"
                )
            else:
                with lock:
                    self._running += 1
                try:
                    if job.fn is not None:
                        job.result = job.fn(backend, job.is_cancelled)
                    else:
                        job.result = backend.run(job.inputs, job.outputs)
                except ApplianceError as exc:
                    job.error = exc
                except Exception as exc:
                    log.exception("model %s failed", self.label)
                    job.error = InferenceFailed(f"model {self.label} failed: {exc}")
                finally:
                    with lock:
                        self._running -= 1
            job.finished = time.perf_counter()
            try:
                call(self._done, job, ran)
            except RuntimeError:  # loop closed during shutdown
                return

    async def stop(self) -> None:
        """Finish what is queued, then stop the threads."""
        for _ in self._threads:
            self._queue.put(None)
        await asyncio.to_thread(self._join)

    def _join(self) -> None:
        for t in self._threads:
            t.join()
