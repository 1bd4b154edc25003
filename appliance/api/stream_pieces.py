"""The pieces of one streamed response on their way from the generating thread to the client.

On a small CPU, llama.cpp's threads take every core: each wake-up of the event loop per token
(the hand-off, the chunk's encoding, aiohttp's write) takes a core from the generation. So once
the response's head is out and nothing waits in the loop's queue or the transport's buffer,
the loop lets the generating thread write each piece's event to the socket itself (`go_direct`):
one `write` on a thread that is running anyway, no wake-up of the loop at all. A write the
socket does not take whole (a slow client) returns the stream to the loop, the unsent rest
first, so the loop's flow control takes over; the loop hands the socket back once its buffer is
empty again. Plain TCP with chunked encoding only (TLS state and other framings belong to the
loop).

The thread writes to a duplicate of the socket's descriptor that this object closes itself: a
connection the loop closes meanwhile can never hand its number to another client's socket
under the thread's write.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from typing import Any

#: How long the generating thread waits, after its first piece, for the loop to have written
#: it (with the response's head): when llama.cpp takes every core, the loop (then the client)
#: gets that core at once instead of when the scheduler preempts the generation. Bounded:
#: a loop busy elsewhere costs the generation this much at most, once per stream.
FIRST_PIECE_WAIT_S = 0.002


class Pieces:
    """Called on the loop (`pieces(text)`), or from the generating thread (`from_worker`,
    which the engine calls instead of hopping to the loop itself)."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, encode: Callable[[str], bytes], gone: threading.Event
    ) -> None:
        self._loop = loop
        self._encode = encode  # a piece's events (b"" for none)
        self._gone = gone
        self._lock = threading.Lock()
        self._queued: list[str | bytes] = []  # text pieces, or the framed rest of a direct write
        self._woken = False  # a wake-up of the loop is on its way
        self._waiting: list[asyncio.Future[None]] = []
        self._fd = -1  # our duplicate of the socket's descriptor (-1: none yet, or closed)
        self._direct = False  # the thread writes (only while _fd >= 0)
        self._closed = False
        self._first = threading.Event()  # set once the first piece has been written
        self._started = False
        self.direct_writes = 0  # pieces the thread wrote itself (tests, benchmarks)
        self.handed_back = 0  # times a full socket handed the stream back to the loop

    # -- the generating thread -----------------------------------------------------------------
    def from_worker(self, text: str) -> None:
        with self._lock:
            if self._direct:
                if self._write(text):
                    return
            elif self._closed:
                return
            else:
                self._queued.append(text)
            first, self._started = not self._started, True
            wake, self._woken = not self._woken, True
        if wake:
            self._loop.call_soon_threadsafe(self.wake)
        if first:
            self._first.wait(FIRST_PIECE_WAIT_S)

    def _write(self, text: str) -> bool:
        """Write one piece's event (lock held); False: what the socket did not take is queued
        for the loop, which takes over."""
        event = self._encode(text)
        if not event:
            return True  # a piece with no event of its own (a parser holding text back)
        data = b"%x\r\n%b\r\n" % (len(event), event)
        try:
            sent = os.write(self._fd, data)
        except BlockingIOError:
            sent = 0
        except OSError:  # the client went away: the generation stops at its next token
            self._direct = False
            self._closed = True
            self._gone.set()
            return True
        if sent == len(data):
            self.direct_writes += 1
            return True
        self._direct = False  # a full socket: the loop (and its flow control) takes over
        self.handed_back += 1
        self._queued.append(data[sent:])
        return False

    # -- the loop --------------------------------------------------------------------------------
    def __call__(self, text: str) -> None:
        """A piece handed over on the loop's thread."""
        with self._lock:
            self._queued.append(text)
        self.wake()

    def wake(self) -> None:
        if self._waiting:
            future = self._waiting.pop()
            if not future.done():
                future.set_result(None)

    async def take(self, done: Callable[[], bool]) -> list[str | bytes] | None:
        """What is queued now (waiting for something if nothing is), or None once `done()`
        and nothing is left."""
        while True:
            with self._lock:
                if self._queued:
                    out, self._queued, self._woken = self._queued, [], False
                    return out
                self._woken = False
            if done():
                return None
            future = self._loop.create_future()
            self._waiting.append(future)
            await future

    def written(self) -> None:
        """The loop has written what it took (the first piece with the response's head)."""
        self._first.set()

    def go_direct(self, transport: Any) -> None:
        """Let the thread write from now on, if the loop holds nothing back and the socket is
        a plain TCP one with an empty buffer."""
        if self._direct or self._closed or transport is None:
            return
        try:
            if transport.is_closing() or transport.get_write_buffer_size():
                return
            if transport.get_extra_info("sslcontext") is not None:
                return
            sock = transport.get_extra_info("socket")
            fileno = -1 if sock is None else sock.fileno()
        except (AttributeError, AssertionError, OSError):  # a transport without a socket
            return
        if fileno < 0:
            return
        with self._lock:
            if self._queued or self._closed:
                return
            if self._fd < 0:
                try:
                    self._fd = os.dup(fileno)
                except OSError:
                    return
            self._direct = True

    def close(self) -> None:
        """No more writes from the thread (the stream ended or was abandoned)."""
        with self._lock:
            self._closed, self._direct = True, False
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
        self._first.set()


__all__ = ["FIRST_PIECE_WAIT_S", "Pieces"]
