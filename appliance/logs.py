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
        exc = self.formatException(record.exc_info) if record.exc_info else None
        return self.line(
            record.created,
            record.levelname,
            record.name,
            record.getMessage(),
            # Records may carry the ids themselves (the access log does); else the current
            # request's.
            getattr(record, "request_id", None),
            getattr(record, "trace_id", None),
            getattr(record, "fields", None),
            exc,
        )

    def line(
        self,
        created: float,
        level: str,
        logger: str,
        msg: str,
        rid: str | None = None,
        tid: str | None = None,
        fields: dict[str, Any] | None = None,
        exc: str | None = None,
    ) -> str:
        """The line of a record with these values (`format`, and `direct` lines)."""
        out: dict[str, Any] = {
            "ts": self._timestamp(created),
            "level": level.lower(),
            "logger": logger,
            "msg": msg,
        }
        rid = rid or request_id.get()
        if rid is not None:
            out["request_id"] = rid
        tid = tid or trace_id.get()
        if tid is not None:
            out["trace_id"] = tid
        if fields:
            out.update(fields)
        if exc is not None:
            out["exc"] = exc
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
        self._add(record.name, line)  # (logging holds this handler's lock in emit)

    def emit_line(
        self,
        name: str,
        level: str,
        msg: str,
        rid: str | None,
        tid: str | None,
        fields: dict[str, Any] | None,
    ) -> None:
        """A line of logger `name` (see `direct`): formatted by this handler's JsonFormatter,
        stamped now as a LogRecord would be, then handled as `emit` handles a record's."""
        formatter = self.formatter
        assert isinstance(formatter, JsonFormatter)
        line = formatter.line(time.time(), level, name, msg, rid, tid, fields)
        with self.lock:  # type: ignore[union-attr]  # (created by Handler.__init__)
            self._add(name, line + self.terminator)

    def _add(self, name: str, line: str) -> None:
        lines = self._lines
        lines.append(line)
        if name in self.buffered and len(lines) < self.MAX_LINES:
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


def direct(logger: logging.Logger, level: int) -> RoundBuffer | None:
    """The handler `logger`'s lines at `level` go to, when that is all of it: one RoundBuffer
    with this module's JsonFormatter, no filter, nothing else in the logger's chain (what
    `setup_logging` sets up). A line can then be given to it formatted (`JsonFormatter.line`,
    `RoundBuffer.emit_line`): the same text without a LogRecord and logging's dispatch, a
    third of the access log's cost. None otherwise (a test's caplog, a handler of the
    operator's), and the line goes through logging. The caller checked isEnabledFor(level)."""
    if logger.filters or logger.disabled:
        return None
    found: logging.Handler | None = None
    node: logging.Logger | None = logger
    while node is not None:
        for handler in node.handlers:
            if found is not None:
                return None
            found = handler
        if not node.propagate:
            break
        node = node.parent
    if (
        type(found) is not RoundBuffer
        or found.filters
        or found.level > level
        or type(found.formatter) is not JsonFormatter
    ):
        return None
    return found


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
