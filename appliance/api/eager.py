"""Start a request's coroutine at once, in the caller's frame; a Task only if it must wait.

Why: a front used to make one Task per request. The Task's first step then ran only after the
loop's whole I/O phase of that round (every other connection's data), and the Task machinery
cost more than a tiny model's run. A model the scheduler runs inline (engine/scheduler.py) never
suspends the request's coroutine, so it needs no Task at all: `start` runs the coroutine's first
step right away, and only when it suspends (a queued model, an awaited future) does a real Task
carry on from the point it reached, with a Task's usual semantics from there (cancellation,
`asyncio.current_task()`, a strong reference for the caller to hold).

Python 3.12's `eager_task_factory` does the same, but still makes a Task object for every
coroutine; this runs on 3.11 too and makes none for the ones that finish.

As in a Task, the coroutine runs in a copy of the caller's context: what the request path sets
in contextvars (logs.py, tracing) leaks neither into the caller's context nor into the next
request's. Before its first suspension, `asyncio.current_task()` inside the coroutine is the
caller's (None in a protocol callback); nothing the fronts start needs it there.
"""

from __future__ import annotations

import asyncio
import contextvars
import types
from collections.abc import Coroutine, Generator
from typing import Any

__all__ = ["start"]


def start(
    coro: Coroutine[Any, Any, None],
    loop: asyncio.AbstractEventLoop,
    context: contextvars.Context | None = None,
) -> asyncio.Task[None] | None:
    """Run `coro` until it finishes or first suspends. Finished: None, and no Task was made.
    Suspended: the Task that carries it on (hold it; the loop keeps only a weak reference).
    It runs in a copy of `context` (default: the caller's context): a front passes the one
    it was made in, so a request started from a previous request's Task sees nothing of it.

    An exception it raises before suspending goes to the loop's exception handler, as an
    unretrieved Task exception would; KeyboardInterrupt and SystemExit propagate, as from a
    Task's step."""
    ctx = contextvars.copy_context() if context is None else context.copy()
    try:
        pending = ctx.run(coro.send, None)
    except StopIteration:
        return None
    except asyncio.CancelledError:
        return None  # it cancelled itself: a Task would end cancelled, silently
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:
        loop.call_exception_handler(
            {
                "message": "exception in a coroutine started eagerly",
                "exception": exc,
                "coroutine": coro,
            }
        )
        return None
    return loop.create_task(_CarryOn(coro, pending, ctx))


class _CarryOn(Coroutine[Any, Any, None]):
    """The rest of a coroutine that has already yielded `pending`, for a Task to run: its
    first step returns `pending` (a future with `_asyncio_future_blocking` still set, as the
    coroutine yielded it), so the Task waits on it and wakes the coroutine exactly as if it
    had run it from the start; every later step goes straight to the coroutine, in `ctx`,
    the very context its first step ran in (the request path resets there the contextvars it
    set; Python 3.10's Tasks take no `context`, and a copy would refuse those resets)."""

    __slots__ = ("_coro", "_ctx", "_pending")

    def __init__(
        self, coro: Coroutine[Any, Any, None], pending: Any, ctx: contextvars.Context
    ) -> None:
        self._coro = coro
        self._pending = pending
        self._ctx = ctx

    def send(self, value: Any) -> Any:
        pending = self._pending
        if pending is not _RESUMED:
            self._pending = _RESUMED
            return pending
        return self._ctx.run(self._coro.send, value)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        # thrown in by the Task (a cancellation, a failed future): the coroutine is suspended
        # on `pending`, so it receives it there, as it would have in a Task of its own
        pending, self._pending = self._pending, _RESUMED
        if pending is not _RESUMED and isinstance(typ, asyncio.CancelledError):
            # cancelled before the Task's first step: the Task never saw what it waits on,
            # so cancel that here, as Task.cancel does with the future a Task waits on
            cancel = getattr(pending, "cancel", None)
            if cancel is not None:
                cancel()
        if val is None and tb is None:
            return self._ctx.run(self._coro.throw, typ)
        return self._ctx.run(self._coro.throw, typ, val, tb)  # pragma: no cover

    def close(self) -> None:
        try:
            self._ctx.run(self._coro.close)
        except RuntimeError:  # pragma: no cover - closed while its context is entered
            self._coro.close()

    def __await__(self) -> Generator[Any, Any, None]:
        raise TypeError("only a Task runs this")  # pragma: no cover

    # what asyncio reads to describe a Task (its repr, get_stack): the coroutine's own
    @property
    def __name__(self) -> str:
        return str(getattr(self._coro, "__qualname__", type(self._coro).__name__))

    @property
    def cr_code(self) -> types.CodeType:
        return self._coro.cr_code  # type: ignore[attr-defined,no-any-return]

    @property
    def cr_frame(self) -> types.FrameType | None:
        return self._coro.cr_frame  # type: ignore[attr-defined,no-any-return]

    @property
    def cr_running(self) -> bool:
        return bool(self._coro.cr_running)  # type: ignore[attr-defined]

    @property
    def cr_await(self) -> Any:
        return self._coro.cr_await  # type: ignore[attr-defined]


_RESUMED = object()
