"""An open-loop HTTP/1.1 flood that costs its machine little per request.

The priority benchmark floods the server from the same small machine, so every cycle the
flood's client spends is one the server under test does not get (a flood from the network
costs it none). So the client is a bare asyncio protocol per keep-alive connection with the
request's bytes encoded once; an answer costs a head search and a status read.

Requests fall due on a fixed schedule (open loop) and each goes out on an idle connection. A
connection carries one request at a time, like the many independent clients of a real flood
(pipelining would queue every fast refusal behind the slow answer before it). When every
connection is busy, a due request waits in the client's backlog; each request is timed from
the moment it was due to its answer's last byte, so neither a server nor a client that falls
behind can hide it, and the figures say how many requests had to wait for a connection.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field

#: One answer: (status, nanoseconds from when the request was due, whether it had Retry-After).
Answer = tuple[int, int, bool]

#: How often the sender wakes to write what fell due since (seconds).
TICK_S = 0.001
_LENGTH = b"\r\ncontent-length:"
_RETRY = b"\r\nretry-after:"


@dataclass
class _Shared:
    """What the connections of one flood share (the event loop's thread only)."""

    request: bytes
    answers: list[Answer] = field(default_factory=list)
    idle: deque[_Conn] = field(default_factory=deque)
    #: Due times (perf_counter ns) of requests that found no idle connection.
    backlog: deque[int] = field(default_factory=deque)
    backlogged: int = 0
    max_backlog: int = 0
    busy: int = 0
    drained: asyncio.Event = field(default_factory=asyncio.Event)
    errors: list[str] = field(default_factory=list)

    def send(self, due_ns: int) -> None:
        if self.idle:
            self.idle.popleft().send(due_ns)
            return
        self.backlog.append(due_ns)
        self.backlogged += 1
        self.max_backlog = max(self.max_backlog, len(self.backlog))


class _Conn(asyncio.Protocol):
    def __init__(self, shared: _Shared) -> None:
        self.shared = shared
        self.transport: asyncio.Transport | None = None
        self.due = 0
        self._buf = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.shared.idle.append(self)

    def send(self, due_ns: int) -> None:
        assert self.transport is not None
        self.due = due_ns
        self.shared.busy += 1
        self.transport.write(self.shared.request)

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(buf[:end]).lower()
        i = head.find(_LENGTH)
        length = 0
        if i >= 0:
            j = head.find(b"\r\n", i + 2)
            length = int(head[i + len(_LENGTH) : j if j >= 0 else len(head)])
        if len(buf) < end + 4 + length:
            return
        shared = self.shared
        shared.answers.append((int(head[9:12]), time.perf_counter_ns() - self.due, _RETRY in head))
        shared.busy -= 1
        del buf[: end + 4 + length]
        if shared.backlog:
            self.send(shared.backlog.popleft())
        else:
            shared.idle.append(self)
            if not shared.busy:
                shared.drained.set()

    def connection_lost(self, exc: Exception | None) -> None:
        shared = self.shared
        if self in shared.idle:
            shared.idle.remove(self)
        elif self.transport is not None:  # a request was on its way
            shared.busy -= 1
            shared.errors.append(repr(exc or ConnectionError("the server closed a connection")))
            if not shared.busy:
                shared.drained.set()
        self.transport = None


async def flood(
    address: tuple[str, int],
    request: bytes,
    rate: float,
    start: float,
    stop_at: float,
    connections: int,
    timeout_s: float,
) -> tuple[list[Answer], list[str], dict[str, float]]:
    """Send `request` at `rate` per second from `start` to `stop_at` (time.monotonic) over up
    to `connections` at once; then wait up to `timeout_s` for the last answers. Returns the
    answers, errors, and {"sent", "backlogged", "max_backlog", "cpu_s"}: cpu_s is this
    process's CPU time from the first request due to the last answer (what the client took
    from a machine it shares with the server)."""
    loop = asyncio.get_running_loop()
    shared = _Shared(request)
    conns = [
        (await loop.create_connection(lambda: _Conn(shared), *address))[1]
        for _ in range(connections)
    ]
    mono, clock = time.monotonic, time.perf_counter_ns
    offset = clock() - int(mono() * 1e9)  # due times in perf_counter ns
    first_ns, interval_ns = int(start * 1e9) + offset, 1e9 / rate
    sent = 0
    cpu_from = time.process_time()
    while (now := mono()) < stop_at:
        if now < start:
            await asyncio.sleep(start - now)
            cpu_from = time.process_time()
            continue
        due_count = int((now - start) * rate) + 1
        while sent < due_count:
            shared.send(first_ns + int(sent * interval_ns))
            sent += 1
        await asyncio.sleep(TICK_S)
    deadline = mono() + timeout_s
    while (shared.busy or shared.backlog) and mono() < deadline:
        shared.drained.clear()
        try:
            await asyncio.wait_for(shared.drained.wait(), max(0.0, deadline - mono()))
        except TimeoutError:
            break
    cpu_s = time.process_time() - cpu_from
    errors = shared.errors
    if shared.busy or shared.backlog:
        errors.append(
            f"{shared.busy + len(shared.backlog)} requests unanswered after {timeout_s:g} s"
        )
    for conn in conns:
        if conn.transport is not None:
            conn.transport.close()
    stats: dict[str, float] = {
        "sent": sent,
        "backlogged": shared.backlogged,
        "max_backlog": shared.max_backlog,
        "cpu_s": round(cpu_s, 3),
    }
    return shared.answers, errors, stats
