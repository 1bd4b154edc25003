"""The floor under an isolated model's round trip: a bare AF_UNIX SOCK_SEQPACKET ping-pong
between two Python processes (no shared memory, no headers, no model).

    PYTHONPATH=. .venv/bin/python tests/bench/ipc_floor.py [--requests 20000] [--rounds 5]
        [--spin-us 200] [--gap-us 100]

Reports the median round trip (wall) and the caller's CPU per round trip, beside which the
added wall time of `inprocess_path.py --isolation both` is read: what isolation adds beyond
this floor is Python work on either side and cold caches.

`--spin-us N`: the same again with both sides polling (non-blocking receives, yielding the
CPU at each turn) for up to N µs before they block, as an isolated model's loop channel does
(appliance/isolation/spin.py, without its self-tuning): the floor with neither side asleep.
`--gap-us G`: the caller is busy G µs before each call (as the server is between requests),
so the echoing side waits that long; G is not counted in the figures.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time


def _receive(sock: socket.socket, spin_s: float) -> bytes:
    if spin_s > 0:
        until = time.perf_counter() + spin_s
        while True:
            try:
                return sock.recv(64, socket.MSG_DONTWAIT)
            except BlockingIOError:
                os.sched_yield()
                if time.perf_counter() >= until:
                    break
    return sock.recv(64)


def _busy(seconds: float) -> None:
    until = time.perf_counter() + seconds
    while time.perf_counter() < until:
        pass


def _echo(sock: socket.socket, spin_s: float) -> None:
    while True:
        data = _receive(sock, spin_s)
        if not data:
            return
        sock.send(data)


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(
    requests: int, rounds: int, spin_us: float = 0.0, gap_us: float = 0.0
) -> tuple[float, float, float]:
    """(wall, caller CPU, echoing side's CPU) per round trip in microseconds, medians of the
    rounds (the echoing side's from /proc, in clock ticks: only long rounds tell)."""
    spin_s, gap_s = spin_us / 1e6, gap_us / 1e6
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:  # the child: echo until the parent closes its end
        ours.close()
        _echo(theirs, spin_s)
        os._exit(0)
    theirs.close()
    message = b"x" * 32
    walls, cpus, echoes = [], [], []
    try:
        for _ in range(rounds + 1):  # the first round warms up
            busy = 0.0
            t0, c0, e0 = time.perf_counter(), time.thread_time(), _cpu_s(pid)
            for _ in range(requests):
                if gap_s:
                    b0 = time.perf_counter()
                    _busy(gap_s)
                    busy += time.perf_counter() - b0
                ours.send(message)
                _receive(ours, spin_s)
            walls.append((time.perf_counter() - t0 - busy) / requests * 1e6)
            cpus.append((time.thread_time() - c0 - busy) / requests * 1e6)
            echoes.append((_cpu_s(pid) - e0) / requests * 1e6)
    finally:
        ours.close()
        os.waitpid(pid, 0)
    return statistics.median(walls[1:]), statistics.median(cpus[1:]), statistics.median(echoes[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--spin-us", type=float, default=0.0, help="also with both sides polling")
    ap.add_argument("--gap-us", type=float, default=0.0, help="caller busy before each call")
    args = ap.parse_args()
    for spin in [0.0, args.spin_us] if args.spin_us else [0.0]:
        wall, cpu, echo = measure(args.requests, args.rounds, spin, args.gap_us)
        how = f"polling {spin:g} µs" if spin else "blocking"
        print(
            f"SEQPACKET ping-pong between two Python processes, {how}, gap {args.gap_us:g} µs: "
            f"{wall:.1f} µs per round trip, caller CPU {cpu:.1f} µs, echo CPU {echo:.1f} µs"
        )


if __name__ == "__main__":
    main()
