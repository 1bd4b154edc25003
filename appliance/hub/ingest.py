"""Telemetry uploads written in groups: one transaction (one commit, one fsync) for every upload
that arrived while the previous group was being written.

No upload waits for a timer: when no write is running, an upload starts one at once (alone);
uploads arriving meanwhile queue and go together in the next transaction. The wait is thus at
most one transaction of at most `max_group` uploads, which bounds the latency an upload can
gain (a fixed delay to gather a group, tried before, raised p99 to 470 ms). An upload is
answered only after its transaction committed: nothing answered is ever lost. Checking happens
before an upload queues, so a malformed one is refused alone (service.py `check_telemetry`), and
a group whose transaction fails is retried one upload at a time (`Hub.store_telemetry`).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from .records import Device, Event
from .service import Hub

#: Uploads per transaction at most.
MAX_GROUP = 128


@dataclass
class _Upload:
    device: Device
    events: list[Event]
    answer: asyncio.Future[dict[str, int]]


@dataclass
class TelemetryWriter:
    """Queues checked uploads and writes them in groups, `writers` transactions at a time
    (1 on SQLite, which has one writer anyway; more on PostgreSQL, where devices lock apart)."""

    hub: Hub
    writers: int = 1
    max_group: int = MAX_GROUP
    _queue: list[_Upload] = field(default_factory=list)
    _running: int = 0
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    #: Transactions written and uploads in them, since the start (figures, tests).
    groups: int = 0
    uploads: int = 0

    async def submit(self, device: Device, events: list[Event]) -> dict[str, int]:
        """Store one device's checked events; the answer once they are committed."""
        answer: asyncio.Future[dict[str, int]] = asyncio.get_running_loop().create_future()
        self._queue.append(_Upload(device, events, answer))
        self._start()
        # Shielded: a client that leaves does not cancel the group it is part of.
        return await asyncio.shield(answer)

    def _start(self) -> None:
        while self._queue and self._running < self.writers:
            group = self._queue[: self.max_group]
            del self._queue[: self.max_group]
            self._running += 1
            task = asyncio.ensure_future(self._write(group))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _write(self, group: list[_Upload]) -> None:
        try:
            results = await asyncio.to_thread(
                self.hub.store_telemetry, [(u.device, u.events) for u in group]
            )
            self.groups += 1
            self.uploads += len(group)
            for upload, result in zip(group, results, strict=True):
                if upload.answer.done():
                    continue
                if isinstance(result, BaseException):
                    upload.answer.set_exception(result)
                else:
                    upload.answer.set_result(result)
        except BaseException as exc:  # the thread itself failed (or the task was cancelled)
            for upload in group:
                if upload.answer.done():
                    continue
                if isinstance(exc, asyncio.CancelledError):
                    upload.answer.cancel()
                else:
                    upload.answer.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            self._running -= 1
            self._start()

    async def drain(self) -> None:
        """Wait for every queued and running write (at shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
