"""api/eager.py: a coroutine started in the caller's frame; a Task only once it suspends.

Each case runs on asyncio's own loop and on uvloop (what the server runs on)."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import pytest
import uvloop

from appliance.api import eager

var: contextvars.ContextVar[str] = contextvars.ContextVar("eager_test", default="unset")

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


def run(case: Callable[[], Awaitable[None]], loop_name: str) -> list[asyncio.Task[Any]]:
    """Run `case` on a fresh loop of the kind named; the Tasks made while it ran (a task
    factory that counts)."""
    made: list[asyncio.Task[Any]] = []
    during: list[asyncio.Task[Any]] = []

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        task = asyncio.Task(coro, loop=loop, **kwargs)
        made.append(task)
        return task

    async def main() -> None:
        asyncio.get_running_loop().set_task_factory(factory)
        await case()
        during.extend(made)

    loop = LOOPS[loop_name]()
    try:
        loop.run_until_complete(main())
        # what asyncio.run does at the end (asyncio.Runner is 3.11+): cancel what is left
        loop.run_until_complete(cancel_the_rest())
    finally:
        loop.close()
    return during


async def no_wait() -> int:
    return 2


async def cancel_the_rest() -> None:
    left = asyncio.all_tasks() - {asyncio.current_task()}
    for task in left:
        task.cancel()
    await asyncio.gather(*left, return_exceptions=True)


@pytest.fixture(params=sorted(LOOPS))
def loop_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_a_coroutine_that_never_waits_finishes_without_a_task(loop_name: str) -> None:
    seen: list[Any] = []

    async def request() -> None:
        seen.append(await no_wait())  # awaiting a coroutine that returns suspends nothing
        seen.append(asyncio.current_task())

    async def case() -> None:
        outer = asyncio.current_task()
        assert eager.start(request(), asyncio.get_running_loop()) is None
        assert seen == [2, outer]  # done before start returned, in the caller's frame

    assert run(case, loop_name) == []


def test_a_coroutine_that_waits_goes_on_in_a_task(loop_name: str) -> None:
    seen: list[Any] = []

    async def request(fut: asyncio.Future[int], gate: asyncio.Future[None]) -> None:
        seen.append("started")
        seen.append(await fut)
        seen.append(asyncio.current_task())
        await asyncio.sleep(0)  # a bare yield too
        await gate
        seen.append("done")

    async def case() -> None:
        loop = asyncio.get_running_loop()
        fut, gate = loop.create_future(), loop.create_future()
        task = eager.start(request(fut, gate), loop)
        assert task is not None and seen == ["started"]
        assert "request" in repr(task)
        await asyncio.sleep(0)
        assert not task.done()
        fut.set_result(7)
        await asyncio.sleep(0.01)
        assert seen == ["started", 7, task] and not task.done()
        gate.set_result(None)
        await task
        assert seen[-1] == "done" and task.result() is None

    assert len(run(case, loop_name)) == 1


def test_an_already_done_future_is_still_awaited_through_the_task(loop_name: str) -> None:
    """The future a coroutine yields may be done before the Task's first step (a worker
    finished at once): the Task still resumes it with the result."""

    async def request(fut: asyncio.Future[int], out: list[int]) -> None:
        out.append(await fut)

    async def case() -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()
        out: list[int] = []
        task = eager.start(request(fut, out), loop)
        assert task is not None
        fut.set_result(3)  # before the Task ever ran
        await task
        assert out == [3]

    run(case, loop_name)


def test_exceptions_before_and_after_the_first_wait(loop_name: str) -> None:
    handled: list[dict[str, Any]] = []

    async def fails_at_once() -> None:
        raise ValueError("at once")

    async def fails_later(fut: asyncio.Future[None]) -> None:
        await fut
        raise KeyError("later")

    async def fut_fails(fut: asyncio.Future[None]) -> None:
        await fut

    async def case() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, ctx: handled.append(ctx))
        assert eager.start(fails_at_once(), loop) is None
        assert isinstance(handled[0]["exception"], ValueError)
        fut: asyncio.Future[None] = loop.create_future()
        task = eager.start(fails_later(fut), loop)
        assert task is not None
        fut.set_result(None)
        with pytest.raises(KeyError):
            await task
        fut2: asyncio.Future[None] = loop.create_future()
        task2 = eager.start(fut_fails(fut2), loop)
        assert task2 is not None
        fut2.set_exception(OSError("the future failed"))
        with pytest.raises(OSError, match="the future failed"):
            await task2

    run(case, loop_name)
    assert len(handled) == 1


def test_system_exit_before_the_first_wait_propagates(loop_name: str) -> None:
    async def exits() -> None:
        raise SystemExit(3)

    async def case() -> None:
        with pytest.raises(SystemExit):
            eager.start(exits(), asyncio.get_running_loop())

    run(case, loop_name)


@pytest.mark.parametrize("first_step", [False, True], ids=["before", "after"])
def test_cancelled_while_waiting(loop_name: str, first_step: bool) -> None:
    """Cancelled before or after the Task's first step: the same for the coroutine and for
    the future it waits on (a queued job's, which the scheduler then skips)."""
    seen: list[str] = []

    async def request(fut: asyncio.Future[None]) -> None:
        try:
            await fut
        except asyncio.CancelledError:
            seen.append("cancelled inside")
            raise
        finally:
            seen.append("cleaned up")

    async def case() -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        task = eager.start(request(fut), loop)
        assert task is not None
        if first_step:
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert task.cancelled() and fut.cancelled()
        assert seen == ["cancelled inside", "cleaned up"]

    run(case, loop_name)


def test_a_task_left_waiting_is_closed_when_its_loop_ends(loop_name: str) -> None:
    """What the server's shutdown does to a request still waiting (asyncio.run cancels what is
    left): the coroutine is cancelled where it waits and runs its cleanup."""
    seen: list[str] = []

    async def request(fut: asyncio.Future[None]) -> None:
        try:
            await fut
        finally:
            seen.append("cleaned up")

    async def case() -> None:
        loop = asyncio.get_running_loop()
        assert eager.start(request(loop.create_future()), loop) is not None

    run(case, loop_name)
    assert seen == ["cleaned up"]


def test_contextvars_stay_with_their_request(loop_name: str) -> None:
    seen: list[tuple[str, str]] = []

    async def request(name: str, fut: asyncio.Future[None] | None) -> None:
        seen.append((name, var.get()))
        token = var.set(name)  # as logs.py's ids are, around a request's work
        if fut is not None:
            await fut
        seen.append((name, var.get()))
        var.reset(token)  # in the same context, after the wait too

    def start(coro: Coroutine[Any, Any, None], context: contextvars.Context | None = None) -> Any:
        return eager.start(coro, asyncio.get_running_loop(), context)

    async def case() -> None:
        loop = asyncio.get_running_loop()
        base = contextvars.copy_context()  # what a connection keeps from when it was made
        var.set("caller")
        fut: asyncio.Future[None] = loop.create_future()
        task = start(request("a", fut))
        assert start(request("b", None)) is None
        assert var.get() == "caller"  # nothing leaked back into the caller
        fut.set_result(None)
        await task
        assert var.get() == "caller"
        assert start(request("c", None), base) is None  # from the given context, not ours

    run(case, loop_name)
    assert seen == [
        ("a", "caller"), ("b", "caller"), ("b", "b"), ("a", "a"), ("c", "unset"), ("c", "c"),
    ]  # fmt: skip
