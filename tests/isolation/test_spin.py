"""Polling before a blocking receive (isolation/spin.py): how long it polls, and that answers,
crashes and hangs come through the same whether a wait polled or blocked."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from appliance.backends.base import LoadContext
from appliance.config import ModelConfig, ProcessConfig
from appliance.errors import WorkerDied
from appliance.isolation.proxy import IsolatedBackend, start
from appliance.isolation.spin import Spin
from appliance.isolation.wire import REPLY, Channel, Closed
from appliance.registry import Registry
from tests.support.plugins.appliance_crashy import HANG, SEGFAULT


def test_it_polls_only_while_waits_stay_short_and_never_past_the_cap() -> None:
    spin = Spin(200e-6)
    assert spin.window() == 0.0  # nothing seen yet
    for _ in range(20):
        spin.observe(50e-6)
    assert 100e-6 <= spin.window() <= 200e-6
    for _ in range(20):
        spin.observe(30e-6)
    assert spin.window() < 100e-6  # it follows the waits down
    spin.observe(10.0)  # an idle time: polling stops at once ...
    assert spin.window() == 0.0
    for _ in range(4):  # ... and comes back after a few close calls (the idle time was clipped)
        spin.observe(30e-6)
    assert 0 < spin.window() <= 200e-6
    never = Spin(0.0)
    never.observe(0.0)
    assert never.window() == 0.0


def test_a_wanted_cpu_stops_polling_for_more_waits_each_time() -> None:
    spin = Spin(200e-6)
    for _ in range(20):
        spin.observe(50e-6)
    skipped = []
    for _ in range(3):
        spin.wanted()
        n = 0
        while spin.window() == 0.0:
            n += 1
        skipped.append(n)
    assert skipped == [1, 2, 4]
    spin.caught()
    spin.wanted()
    assert [spin.window() for _ in range(5)].count(0.0) == 4  # halved after a clean poll


def _polling(channel: Channel, cap_s: float) -> Spin:
    spin = channel.spin = Spin(cap_s)
    for _ in range(20):
        spin.observe(cap_s / 10)
    return spin


def test_a_polled_receive_gets_what_a_blocking_one_would(pair: tuple[Channel, Channel]) -> None:
    a, b = pair
    spin = _polling(b, 0.05)  # long enough that the sender below is caught while polling
    a.send(REPLY, {"n": 1}, {"x": np.arange(3, dtype=np.float32)}, 0)
    packet = b.receive_polling(time.perf_counter())  # already there
    doc, arrays, _ = b.message(packet, copy=True)
    assert doc == {"n": 1} and arrays["x"].tolist() == [0.0, 1.0, 2.0]  # the segment came too

    def later() -> None:
        time.sleep(0.002)
        a.send(REPLY, {"n": 2}, {}, 0)

    thread = threading.Thread(target=later)
    thread.start()
    packet = b.receive_polling(time.perf_counter())
    thread.join()
    assert b.header(packet)[0] == {"n": 2}
    assert sum(spin.counts) == 2  # both waits polled (caught, or gave the CPU up, or ran out)

    b.spin = None  # the blocking path, same answer
    a.send(REPLY, {"n": 3}, {}, 0)
    assert b.header(b.receive_polling(time.perf_counter()))[0] == {"n": 3}


def test_a_peer_closing_while_polled_ends_the_wait(pair: tuple[Channel, Channel]) -> None:
    a, b = pair
    _polling(b, 0.05)
    timer = threading.Timer(0.002, a.sock.shutdown, (socket.SHUT_RDWR,))
    timer.start()
    with pytest.raises(Closed):
        b.receive_polling(time.perf_counter())
    timer.join()


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _isolated(tmp_path: Path, spin_us: float, timeout_s: float = 30.0) -> IsolatedBackend:
    f = tmp_path / "crashy.bin"
    f.write_bytes(b"fine")
    mv = Registry(tmp_path / "models").add("crashy", f, backend="crashy")
    config = ModelConfig(timeout_s=timeout_s, process=ProcessConfig(spin_us=spin_us))
    return start(mv.manifest, mv.file, LoadContext(config, tmp_path / "cache"), None)


async def _inline(backend: IsolatedBackend, value: float, times: int = 1) -> list[float]:
    """Calls made on the event loop thread, back to back (as the scheduler's inline runs)."""
    out: list[float] = []
    for i in range(times):
        x = np.array([value + (i % 3)], np.float32) if value != SEGFAULT else np.array([value])
        out += backend.run({"x": x.astype(np.float32)}, None)["y"].tolist()
        await asyncio.sleep(0)
    return out


@pytest.mark.parametrize("spin_us", [0.0, 5000.0])
def test_calls_on_the_loop_answer_alike_polled_or_not_and_an_idle_worker_does_not_spin(
    plugin: None, tmp_path: Path, spin_us: float
) -> None:
    backend = _isolated(tmp_path, spin_us)
    try:
        got = asyncio.run(_inline(backend, 1.0, 300))
        assert got == [2.0 * (1 + i % 3) for i in range(300)]
        worker = backend.supervisor._worker
        assert worker is not None
        spin = worker.channels[-1].spin
        assert spin is not None
        assert (sum(spin.counts) > 0) == (spin_us > 0)  # the server's side polled, or never
        # idle: the worker's thread polls at most one window after the last call, then sleeps
        # (a worker polling on would use about a second of CPU here)
        before = _cpu_s(worker.proc.pid)
        time.sleep(1.0)
        assert _cpu_s(worker.proc.pid) - before < 0.1
    finally:
        backend.unload()


def test_a_crash_or_a_hang_while_the_server_polls_still_names_what_happened(
    plugin: None, tmp_path: Path
) -> None:
    backend = _isolated(tmp_path, 5000.0)
    try:
        asyncio.run(_inline(backend, 1.0, 100))  # waits now poll
        with pytest.raises(WorkerDied, match=r"signal 11 \(SIGSEGV\)"):
            asyncio.run(_inline(backend, SEGFAULT))
        deadline = time.monotonic() + 30
        while backend.supervisor._worker is None or backend.supervisor._worker.dead:
            assert time.monotonic() < deadline, "the worker did not come back"
            time.sleep(0.05)
        assert asyncio.run(_inline(backend, 1.0, 100))[:3] == [2.0, 4.0, 6.0]
        with pytest.raises(WorkerDied, match="did not answer within 1 s"):
            asyncio.run(_inline(backend, HANG))
    finally:
        backend.unload()
