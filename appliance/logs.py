"""JSON log lines, each carrying the request id (and trace id) of the request being served.

Structured fields travel as `extra={"fields": {...}}` and become top-level keys of the line.

The access log writes a line per request, so formatting is kept cheap: the timestamp text is
cached per second, and logging's caller lookup and process/thread bookkeeping, which no line
prints, are switched off. And lines logged on the event loop's thread are written together,
once per round of the loop (`RoundBuffer`): under a flood, a write per line cost the loop a
sixth of its time.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import sys
import time
from typing import Any, TextIO

import orjson

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
trace_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("trace_id", default=None)


class JsonFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        self._second = -1
        self._stamp = ""

    def _timestamp(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._stamp}.{int((created - second) * 1000):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": self._timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        # Records may carry the ids themselves (the access log does); else the current request's.
        rid = getattr(record, "request_id", None) or request_id.get()
        if rid is not None:
            out["request_id"] = rid
        tid = getattr(record, "trace_id", None) or trace_id.get()
        if tid is not None:
            out["trace_id"] = tid
        fields = getattr(record, "fields", None)
        if fields:
            out.update(fields)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


class RoundBuffer(logging.StreamHandler[TextIO]):
    """A stream handler that writes the lines of the `buffered` loggers (the access log)
    logged on an event loop's thread in one write when the loop's round is over (a callback
    queued behind the round's work), not one write each: the same lines, in the same order, a
    little later.

    Any other line, one logged off the loop (a worker thread, start-up, a command without a
    loop), or one that finds `MAX_LINES` waiting, writes what waits and itself at once.
    `flush` (logging's shutdown at exit, `close`) writes what waits, so a clean stop loses
    nothing."""

    #: Lines held at most before a write.
    MAX_LINES = 256

    def __init__(
        self, stream: TextIO | None = None, buffered: tuple[str, ...] = ("appliance.access",)
    ) -> None:
        super().__init__(stream)
        self.buffered = frozenset(buffered)
        self._lines: list[str] = []
        #: A flush is queued on this loop's next round.
        self._queued: asyncio.AbstractEventLoop | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)
            return
        lines = self._lines  # (logging holds this handler's lock in emit)
        lines.append(line)
        if record.name in self.buffered and len(lines) < self.MAX_LINES:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
            if loop is not None:
                if self._queued is not loop:
                    loop.call_soon(self.flush)
                    self._queued = loop
                return
        self._write()

    def _write(self) -> None:
        lines = self._lines
        if not lines:
            return
        text = "".join(lines)
        lines.clear()
        try:
            self.stream.write(text)
            self.stream.flush()
        except Exception:  # as logging.StreamHandler does: the program goes on
            self.handleError(logging.makeLogRecord({"msg": text.rstrip("\n")}))

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]  # (created by Handler.__init__)
            self._queued = None
            self._write()

    def close(self) -> None:
        self.flush()
        super().close()


def setup_logging(level: str = "info") -> None:
    handler = RoundBuffer(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").disabled = True
    # No line prints the caller, process or thread: skip collecting them (logging's own knobs).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
