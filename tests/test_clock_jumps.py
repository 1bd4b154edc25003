"""The device's wall clock jumping (NTP after a cold boot with no RTC, a manual `date -s`):
durations use the monotonic clocks, so deadlines, the breaker's windows, connection timeouts
and the outbox's order are unaffected. Wall time is for timestamps and for TUF's expiry,
which must follow the real date.

Two kinds of check: the wall clock (time.time and datetime.now, through `time.time`) is moved
by a day in the middle of real requests, and every `time.time()` in appliance/ is one of a
known list of timestamps (a new one meaning a duration would be caught here)."""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import time
from pathlib import Path

import pytest

from appliance.sync import outbox
from appliance.sync.outbox import Outbox
from tests.support.gated import GatedBackend

ROOT = Path(__file__).resolve().parent.parent
REQ = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1, 2]}]}
DAY = 86400.0

#: Every `time.time()` in appliance/ and what it stamps: none of them measures a duration.
WALL_CLOCK_USES = {
    "appliance/api/openai.py": 2,  # `created` of a completion
    "appliance/api/app.py": 1,  # when the server started (/api/status's `started_at`)
    "appliance/api/status.py": 1,  # `time` of /api/status (uptime: monotonic)
    "appliance/engine/engine.py": 1,  # a model's loaded_at (OpenAI's `created`)
    "appliance/httphead.py": 1,  # the Date header (the device's fast path, the hub's front)
    "appliance/logs.py": 1,  # a line's `ts`, given without a LogRecord (its `created`)
    "appliance/hub/polls.py": 1,  # devices' last-seen stamps
    "appliance/hub/simulate.py": 1,  # the version name of the simulation's rollout
    "appliance/hub/simworker.py": 1,  # the `time` of a simulated device's telemetry event
    "appliance/sync/agent.py": 2,  # last_check, last_success (status, a metric)
    "appliance/timeseries.py": 1,  # when each of the last errors happened (the status page)
}


class Wall:
    """time.time with an offset the test moves (what a clock step does to the process)."""

    def __init__(self) -> None:
        self.offset = 0.0
        self._real = time.time

    def __call__(self) -> float:
        return self._real() + self.offset


@pytest.fixture
def wall(monkeypatch: pytest.MonkeyPatch) -> Wall:
    clock = Wall()
    monkeypatch.setattr(time, "time", clock)
    # datetime.now reads the C clock, not time.time: the outbox's stamps follow `clock` too.
    monkeypatch.setattr(outbox, "utc_now", lambda: _iso(clock()))
    return clock


def _iso(t: float) -> str:
    stamp = dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


def test_every_wall_clock_read_in_the_package_is_a_timestamp() -> None:
    found: dict[str, int] = {}
    for path in sorted((ROOT / "appliance").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("appliance/bench/"):  # measuring tools, not the device's logic
            continue
        n = len(re.findall(r"\btime\.time\(\)", path.read_text()))
        if n:
            found[rel] = n
    assert found == WALL_CLOCK_USES, (
        "a new time.time(): if it measures a duration use time.monotonic(); if it is a "
        "timestamp, add it to WALL_CLOCK_USES with what it stamps"
    )


@pytest.mark.parametrize("jump", [DAY, -DAY])
async def test_a_clock_jump_does_not_expire_or_extend_a_deadline(serve, gated, wall, jump):
    client = await serve({"models": {"gated": {"max_concurrency": 1, "timeout_s": 30}}}, gated)
    slow = asyncio.ensure_future(
        client.post("/v2/models/gated/infer", json=REQ, headers={"X-Request-Timeout-Ms": "5000"})
    )
    ok = await asyncio.to_thread(GatedBackend.started.acquire, True, 10)
    assert ok, "run never started"
    # Queued behind it with 300 ms to live; the wall clock then moves by a day.
    short = asyncio.ensure_future(
        client.post("/v2/models/gated/infer", json=REQ, headers={"X-Request-Timeout-Ms": "300"})
    )
    await asyncio.sleep(0.05)
    wall.offset += jump
    started = time.monotonic()
    r = await short
    waited = time.monotonic() - started
    assert r.status == 504 and 0.1 < waited < 2.0  # expired on time, neither at once nor never
    GatedBackend.gate.set()
    r = await slow
    assert r.status == 200  # 5 s to live: a day forward did not expire it
    assert (await client.get("/v2/health/live")).status == 200


def test_the_outbox_keeps_its_order_when_the_clock_goes_back(tmp_path: Path, wall: Wall) -> None:
    """Events leave in the order they were written (their sequence number), whatever their
    wall-clock timestamps say; the hub deduplicates on (device, seq), not on time."""
    box = Outbox(tmp_path / "outbox.db", 1 << 20)
    box.append("a", {"i": 1})
    wall.offset = -DAY
    box.append("a", {"i": 2})
    wall.offset = DAY
    box.append("a", {"i": 3})
    events = box.batch(10)
    assert [e.data["i"] for e in events] == [1, 2, 3]
    assert [e.seq for e in events] == sorted(e.seq for e in events)
    # The timestamps do record the jumps: they are what the clock said, for the record.
    assert events[1].time < events[0].time < events[2].time
    box.close()


async def test_connection_timeouts_ignore_the_wall_clock(serve, wall) -> None:
    """A keep-alive connection is not cut by a forward jump (its idle time is monotonic)."""
    client = await serve({"server": {"keepalive_timeout_s": 5.0}})
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    wall.offset = DAY
    await asyncio.sleep(1.5)  # several sweeps
    writer.write(b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200")
    writer.close()
