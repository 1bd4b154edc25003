"""The simulator's own CPU per request: aiohttp's client (what `hub simulate` used before) vs
the raw protocol client of hub/simworker.py, side by side, paced like the simulator.

    flock /work/bench.lock python build/hub_sim_client_cost.py --rates 600 3333 --seconds 8

Both clients poll a fake hub (a bare uvloop protocol in a forked process answering each request
with the 304 a hub sends for an unchanged assignment), so only the client's cost is measured:
the on-CPU time of the client process from /proc/self/schedstat (nanoseconds, not ticks) per
request, medians of --rounds alternating rounds. A low rate costs more per request: each answer
then wakes an idle event loop on its own, and a wake-up alone costs 50-150 µs of CPU on a VM.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from appliance.hub import simworker

TOKEN = "abcdefabcdefabcdefabcdefabcdefab"
ANSWER = (
    b'HTTP/1.1 304 Not Modified\r\nETag: "0123456789abcdef0123456789abcdef"\r\n'
    b"Cache-Control: no-cache\r\nContent-Length: 0\r\nDate: Mon, 07 Dec 2026 14:00:00 GMT\r\n"
    b"Server: Python/3.11 aiohttp\r\n\r\n"
)


class _FakeHub(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.transport.write(ANSWER)


def _serve(port: int) -> None:
    async def run() -> None:
        loop = asyncio.get_running_loop()
        await loop.create_server(_FakeHub, "127.0.0.1", port, backlog=1024)
        await asyncio.sleep(3600)

    uvloop.run(run())


def _on_cpu_ns() -> int:
    return int(Path("/proc/self/schedstat").read_text().split()[0])


async def _paced(kind: str, port: int, rate: float, seconds: float) -> float:
    """µs of CPU per request at `rate` requests/s, launched on the simulator's schedule."""
    loop = asyncio.get_running_loop()
    session: aiohttp.ClientSession | None = None
    one: Callable[[], Awaitable[None]]
    if kind == "aiohttp":
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=256, limit_per_host=0, local_addr=("127.0.0.1", 0), ttl_dns_cache=None
            ),
            timeout=aiohttp.ClientTimeout(total=10),
            skip_auto_headers=("User-Agent",),
        )
        url = f"http://127.0.0.1:{port}/api/v1/device/assignments"
        headers = {"Authorization": f"Bearer {TOKEN}", "If-None-Match": '"0123"'}

        async def one_aiohttp() -> None:
            assert session is not None
            async with session.get(url, headers=headers) as r:
                await r.read()
                assert r.status == 304 and r.headers.get("ETag")

        one = one_aiohttp
    else:
        pool = simworker._Pool(loop, "127.0.0.1", port, "127.0.0.1", 256)
        worker = simworker.Worker({"timeout_s": 10, "tmp": "/tmp"})
        request = (
            b"GET /api/v1/device/assignments HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b'Authorization: Bearer %s\r\nIf-None-Match: "0123"\r\n\r\n' % TOKEN.encode()
        )

        async def one_raw() -> None:
            status, etag, _ = await worker._exchange(pool, request)
            assert status == 304 and etag

        one = one_raw
    n = int(rate * seconds)
    tasks: set[asyncio.Task[None]] = set()
    before = _on_cpu_ns()
    start = time.monotonic()
    k = 0
    while k < n:
        now = time.monotonic()
        while k < n and start + k / rate <= now:
            task = loop.create_task(one())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            k += 1
        await asyncio.sleep(min(0.005, max(0.001, start + k / rate - time.monotonic())))
    await asyncio.gather(*tasks)
    used = _on_cpu_ns() - before
    if session is not None:
        await session.close()
    return used / n / 1e3


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rates", type=float, nargs="+", default=[600.0, 3333.0])
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    port = _free_port()
    pid = os.fork()
    if pid == 0:
        _serve(port)
        os._exit(0)
    time.sleep(0.5)
    print(f"load average {os.getloadavg()[0]:.2f}")
    kinds = {
        "aiohttp client, asyncio loop (before)": ("aiohttp", asyncio.run),
        "raw protocol, asyncio loop": ("raw", asyncio.run),
        "raw protocol, uvloop (now)": ("raw", uvloop.run),
    }
    try:
        for rate in args.rates:
            got: dict[str, list[float]] = {k: [] for k in kinds}
            for _ in range(args.rounds):
                for label, (kind, runner) in kinds.items():
                    got[label].append(runner(_paced(kind, port, rate, args.seconds)))
            base = statistics.median(got["aiohttp client, asyncio loop (before)"])
            for label, values in got.items():
                med = statistics.median(values)
                print(
                    f"{rate:>6.0f} req/s  {label:<38} {med:7.1f} µs CPU per request "
                    f"({base / med:4.1f}x less than before)"
                )
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    print(f"load average {os.getloadavg()[0]:.2f}")
    return 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


if __name__ == "__main__":
    sys.exit(main())
