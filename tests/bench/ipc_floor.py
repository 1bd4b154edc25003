"""The floor under an isolated model's round trip: a bare AF_UNIX SOCK_SEQPACKET ping-pong
between two Python processes (no shared memory, no headers, no model).

    PYTHONPATH=. .venv/bin/python tests/bench/ipc_floor.py [--requests 20000] [--rounds 5]

Reports the median round trip (wall) and the caller's CPU per round trip, beside which the
added wall time of `inprocess_path.py --isolation both` is read: what isolation adds beyond
this floor is Python work on either side and cold caches.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time


def _echo(sock: socket.socket) -> None:
    while True:
        data = sock.recv(64)
        if not data:
            return
        sock.send(data)


def measure(requests: int, rounds: int) -> tuple[float, float]:
    """(wall, caller CPU) per round trip in microseconds, medians of the rounds."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:  # the child: echo until the parent closes its end
        ours.close()
        _echo(theirs)
        os._exit(0)
    theirs.close()
    message = b"x" * 32
    walls, cpus = [], []
    try:
        for _ in range(rounds + 1):  # the first round warms up
            t0, c0 = time.perf_counter(), time.thread_time()
            for _ in range(requests):
                ours.send(message)
                ours.recv(64)
            walls.append((time.perf_counter() - t0) / requests * 1e6)
            cpus.append((time.thread_time() - c0) / requests * 1e6)
    finally:
        ours.close()
        os.waitpid(pid, 0)
    return statistics.median(walls[1:]), statistics.median(cpus[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    wall, cpu = measure(args.requests, args.rounds)
    print(f"SEQPACKET ping-pong between two Python processes: {wall:.1f} µs per round trip, "
          f"caller CPU {cpu:.1f} µs")  # fmt: skip


if __name__ == "__main__":
    main()
