"""Log lines written once per round of the event loop (logs.RoundBuffer): the same lines, in the
same order, fewer writes; nothing lost on a clean stop."""

from __future__ import annotations

import asyncio
import io
import logging
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from appliance.logs import JsonFormatter, RoundBuffer
from appliance.registry import Registry
from tests.conftest import start_server_process, stop_server_process


class Stream(io.StringIO):
    """A text stream that keeps each write apart (how many writes the lines took)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, s: str) -> int:
        self.writes.append(s)
        return super().write(s)


@pytest.fixture
def logged() -> Iterator[tuple[logging.Logger, Stream, RoundBuffer]]:
    stream = Stream()
    handler = RoundBuffer(stream, ("test.logs.round",))
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("test.logs.round")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    yield logger, stream, handler
    logger.handlers.clear()
    logger.propagate = True


def _messages(stream: Stream) -> list[str]:
    return [orjson.loads(line)["msg"] for line in stream.getvalue().splitlines()]


async def test_lines_of_one_round_are_written_together_after_it(logged) -> None:
    logger, stream, _ = logged
    for i in range(5):
        logger.info("line %d", i)
    assert stream.writes == []  # the round is not over
    await asyncio.sleep(0)
    assert len(stream.writes) == 1
    assert _messages(stream) == [f"line {i}" for i in range(5)]
    logger.info("next")
    await asyncio.sleep(0)
    assert len(stream.writes) == 2 and _messages(stream)[-1] == "next"


async def test_another_loggers_line_or_one_off_the_loop_writes_at_once_in_order(
    logged,
) -> None:
    logger, stream, handler = logged
    other = logging.getLogger("test.logs.other")
    other.handlers[:] = [handler]
    other.propagate = False
    other.setLevel(logging.INFO)
    logger.info("a")
    other.info("b")
    assert _messages(stream) == ["a", "b"] and len(stream.writes) == 1
    logger.info("c")
    t = threading.Thread(target=logger.info, args=("d",))  # a worker thread: no loop there
    t.start()
    t.join()
    assert _messages(stream) == ["a", "b", "c", "d"]
    await asyncio.sleep(0)  # the queued flush finds nothing more
    assert len(stream.writes) == 2
    other.handlers.clear()
    other.propagate = True


async def test_a_full_buffer_is_written_without_waiting_for_the_round(logged) -> None:
    logger, stream, _ = logged
    for i in range(RoundBuffer.MAX_LINES):
        logger.info("%d", i)
    assert len(stream.writes) == 1 and len(_messages(stream)) == RoundBuffer.MAX_LINES


async def test_closing_writes_what_waits(logged) -> None:
    """What logging's shutdown at exit does (flush, close): a loop that stops before its next
    round loses no line."""
    logger, stream, handler = logged
    logger.info("pending")
    assert stream.writes == []
    handler.close()
    assert _messages(stream) == ["pending"]


def test_without_a_loop_every_line_is_written_at_once(logged) -> None:
    logger, stream, handler = logged
    logger.info("one")
    assert _messages(stream) == ["one"]
    handler.close()


def test_a_clean_stop_loses_no_access_line(tmp_path: Path, samples: Path) -> None:
    """A real server, SIGTERM right after its answers: every request's line is written, in
    the order they were answered."""
    registry = Registry(tmp_path)
    registry.add("sample", samples / "sample.onnx")
    server = start_server_process(["--models", str(tmp_path)])
    ids = [f"round-{i}" for i in range(20)]
    try:
        for rid in ids:
            req = urllib.request.Request(
                f"http://{server.url}/v2/health/live", headers={"X-Request-Id": rid}
            )
            with urllib.request.urlopen(req, timeout=10) as r:
                assert r.status == 200
    finally:
        assert stop_server_process(server) == 0
    logged_ids = []
    for line in server.lines:
        if line.startswith("{"):
            doc = orjson.loads(line)
            if doc.get("logger") == "appliance.access":
                logged_ids.append(doc.get("request_id"))
    assert [x for x in logged_ids if x in ids] == ids


@pytest.fixture
def root_round_buffer() -> Iterator[tuple[Stream, RoundBuffer]]:
    """The root logger as setup_logging leaves it, on a stream of the test's."""
    stream = Stream()
    handler = RoundBuffer(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    root.setLevel(logging.INFO)
    yield stream, handler
    root.handlers[:], root.level = saved


def _only(handler: logging.Handler) -> None:
    """The root's one handler (pytest adds its own to the root as each test phase starts)."""
    logging.getLogger().handlers[:] = [handler]


def test_an_access_line_written_directly_is_the_line_logging_writes(
    root_round_buffer: tuple[Stream, RoundBuffer],
) -> None:
    from appliance.logs import direct
    from appliance.request import Request, log_access

    stream, handler = root_round_buffer
    _only(handler)
    access = logging.getLogger("appliance.access")
    req = Request("http", "POST", "/v2/models/m/infer", "/v2/models/{name}/infer", "req-1",
                  "4bf92f3577b34da6a3ce929d0e0e4736", "127.0.0.1", 0.0, status=200,
                  token_name="ops")  # fmt: skip
    assert direct(access, logging.INFO) is handler
    log_access(req, 0.0123)  # directly
    handler.addFilter(lambda record: True)  # anything that may see a record: through logging
    assert direct(access, logging.INFO) is None
    log_access(req, 0.0123)
    req.trace_id = None
    handler.removeFilter(handler.filters[0])
    log_access(req, 0.0123)  # directly again, without a trace id
    first, second, third = (orjson.loads(line) for line in stream.getvalue().splitlines())
    for line in (first, second, third):
        assert line.pop("ts").endswith("Z")
    assert list(first.items()) == list(second.items())  # the same keys, in the same order
    assert first == {
        "level": "info", "logger": "appliance.access", "msg": "POST /v2/models/m/infer 200",
        "request_id": "req-1", "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736", "status": 200,
        "duration_ms": 12.3, "remote": "127.0.0.1", "token_name": "ops",
    }  # fmt: skip
    assert "trace_id" not in third


def test_direct_lines_only_where_the_handler_is_all_there_is(
    root_round_buffer: tuple[Stream, RoundBuffer],
) -> None:
    from appliance.logs import direct

    _, handler = root_round_buffer
    _only(handler)
    access = logging.getLogger("appliance.access")
    assert direct(access, logging.INFO) is handler
    other = logging.StreamHandler(io.StringIO())
    access.addHandler(other)  # (a test's caplog, an operator's handler)
    try:
        assert direct(access, logging.INFO) is None
    finally:
        access.removeHandler(other)
    handler.setLevel(logging.WARNING)
    assert direct(access, logging.INFO) is None
    handler.setLevel(logging.NOTSET)
    handler.setFormatter(logging.Formatter())
    assert direct(access, logging.INFO) is None
