"""The server's handle on one worker process: start it, load the model in it, talk, stop it."""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .. import plugins
from ..config import ModelConfig
from ..errors import ModelError
from ..manifest import Manifest
from .spin import Spin
from .wire import CALL, REPLY, Channel, Closed, ProtocolError

log = logging.getLogger("appliance.isolation")

#: Environment a worker must not inherit: it is not the service systemd watches.
_SYSTEMD_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
#: Packet that hands the worker the rest of its channels, after the load: the total count,
#: then how many came with this packet (the kernel passes at most 253 descriptors at once).
_CHANNELS = b"F"
_COUNTS = struct.Struct("<HH")
_FDS_PER_PACKET = 64


def self_command() -> list[str]:
    """How to run this program again: the frozen binary itself, or `python -m appliance`."""
    if getattr(sys, "frozen", False):
        return [sys.executable]
    return [sys.executable, "-m", "appliance"]


def describe_exit(returncode: int | None) -> str:
    """How a worker ended, for errors and the model's reason: 'died from signal 11 (SIGSEGV)'."""
    if returncode is None:
        return "stopped answering"
    if returncode < 0:
        number = -returncode
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = "unknown signal"
        if number == signal.SIGKILL:
            name += ": killed, e.g. by the kernel's out-of-memory killer"
        return f"died from signal {number} ({name})"
    return f"exited with status {returncode}"


def load_call(
    manifest: Manifest, path: Path, config: ModelConfig, cache_dir: Path
) -> dict[str, Any]:
    """The first call a worker gets: what to load, with which settings."""
    return {
        "call": "load",
        "manifest": manifest.to_json(),
        "path": str(path),
        "config": asdict(config),
        "cache_dir": str(cache_dir),
        "nice": _own_nice(),
        "log_level": logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower(),
        "plugin_dirs": plugins.active_dirs(),
    }


def _own_nice() -> int:
    """The calling thread's CPU priority: the engine loads at the workers' priority, and the
    worker process takes the same."""
    try:
        return os.getpriority(os.PRIO_PROCESS, 0)
    except (AttributeError, OSError):
        return 0


class ChannelPool:
    """The channels free for a call, the one used last first.

    At one request at a time every call then takes the same channel, which the same worker
    thread serves: its stack, its segment and their pages stay in the CPU's caches. A FIFO
    would hand each call the channel used longest ago, and a different, cold, worker thread
    (measured: about twice the wall time per call). Taking and giving back are a deque's pop
    and append (atomic); only a caller that finds it empty waits on the condition."""

    def __init__(self) -> None:
        self._free: deque[Channel] = deque()
        self._cond = threading.Condition(threading.Lock())
        self._waiting = 0

    def put(self, channel: Channel) -> None:
        self._free.append(channel)
        if self._waiting:
            with self._cond:
                self._cond.notify()

    def get_nowait(self) -> Channel:
        try:
            return self._free.pop()
        except IndexError:
            raise queue.Empty from None

    def get(self, timeout: float) -> Channel:
        """A channel, waiting up to `timeout` seconds for one (queue.Empty if none came)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._waiting += 1  # before looking: a put after the look then notifies
            try:
                while True:
                    try:
                        return self._free.pop()
                    except IndexError:
                        pass
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise queue.Empty
                    self._cond.wait(remaining)
            finally:
                self._waiting -= 1


class WorkerProcess:
    """One worker process and the server's ends of its channels.

    Channels wait in a pool: a caller takes one for a call and puts it back. When the process
    is gone, every call on it fails at once (the peer's end is closed)."""

    def __init__(self, label: str, proc: subprocess.Popen[bytes], first: Channel) -> None:
        self.label = label
        self.proc = proc
        self.channels = [first]
        self.pool = ChannelPool()
        #: The loop channel, when the load asked for one: kept for calls made on the server's
        #: event loop thread (the scheduler's inline runs), whose worker thread keeps the
        #: server's CPU priority (see worker.main).
        self.loop_pool = ChannelPool()
        #: How many channels `pool` holds when none is in use.
        self.pooled = 1
        self.started = time.monotonic()
        #: Set once the process has exited and `returncode` says how.
        self.exited = threading.Event()
        self.returncode: int | None = None
        #: Set by whoever first notices the process is gone (or kills it).
        self.dead = False
        #: Why the server killed it, if it did (a hang, nonsense on a channel).
        self.killed_for: str | None = None
        #: `release` runs once: the supervisor's thread and `stop` may both get there, and a
        #: second close of a file descriptor number could close one reused meanwhile.
        self._released = False
        self._release_lock = threading.Lock()

    @classmethod
    def spawn(cls, label: str) -> WorkerProcess:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = {k: v for k, v in os.environ.items() if k not in _SYSTEMD_VARS}
        try:
            proc = subprocess.Popen(
                [*self_command(), "_worker", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                env=env,
            )
        except OSError as exc:
            ours.close()
            raise ModelError(f"model {label}: cannot start a worker process: {exc}") from None
        finally:
            theirs.close()
        return cls(label, proc, Channel.create(ours))

    def load(
        self, doc: dict[str, Any], channels: Callable[[dict[str, Any]], int], timeout_s: float
    ) -> dict[str, Any]:
        """Load the model in the worker; then give it `channels(report)` channels for the pool,
        and the loop channel if `doc` asks for one (`loop_channel`: it comes last).
        Returns the worker's report; ModelError (naming the signal, if it crashed) on failure."""
        first = self.channels[0]
        try:
            first.set_timeout(timeout_s)
            first.send(CALL, doc, {}, 0)
            packet = first.receive()
            if packet[:1] != REPLY:
                raise ProtocolError(f"an unexpected packet {packet[:1]!r}")
            answer, _ = first.header(packet)
        except (Closed, OSError) as exc:
            timed_out = isinstance(exc, TimeoutError)
            if timed_out:
                self.kill()
            rc = self.returncode = self.wait(5.0)
            why = (
                f"loading took over {timeout_s:g} s: the worker was killed"
                if timed_out
                else f"the worker process {describe_exit(rc)} while loading the model"
            )
            raise ModelError(f"model {self.label}: {why}") from None
        except ProtocolError as exc:
            self.kill()
            raise ModelError(f"model {self.label}: the worker answered nonsense: {exc}") from None
        error = answer.get("error")
        if error is not None:
            self.returncode = self.wait(5.0)
            message = error.get("message") if isinstance(error, dict) else None
            raise ModelError(str(message or error)[:2000])
        report = answer.get("report")
        if not isinstance(report, dict):
            self.kill()
            raise ModelError(f"model {self.label}: the worker sent no report of the model")
        self.pooled = channels(report)
        loop = doc.get("loop_channel") is True
        self._more_channels(self.pooled - 1 + loop)
        first.set_timeout(None)
        for channel in self.channels[: self.pooled]:
            self.pool.put(channel)
        if loop:
            self.channels[-1].spin = Spin(float(doc.get("spin_us", 0)) / 1e6)
            self.loop_pool.put(self.channels[-1])
        return report

    def _more_channels(self, count: int) -> None:
        pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(count)]
        try:
            fds = [theirs.fileno() for _, theirs in pairs]
            for i in range(0, max(count, 1), _FDS_PER_PACKET):
                part = fds[i : i + _FDS_PER_PACKET]
                packet = _CHANNELS + _COUNTS.pack(count, len(part))
                if part:
                    socket.send_fds(self.channels[0].sock, [packet], part)
                else:
                    self.channels[0].sock.send(packet)
        finally:
            for _, theirs in pairs:
                theirs.close()
        self.channels.extend(Channel.create(ours) for ours, _ in pairs)

    def wait(self, timeout_s: float | None = None) -> int | None:
        """The exit status, once the process has exited (None if it did not in time)."""
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def kill(self, why: str | None = None) -> None:
        self.dead = True
        if why is not None and self.killed_for is None:
            self.killed_for = why
        with contextlib.suppress(OSError):
            self.proc.kill()

    def how_it_ended(self) -> str:
        """'died from signal 11 (SIGSEGV)', or why the server killed it."""
        if self.killed_for is not None:
            return f"{self.killed_for}: it was killed"
        return describe_exit(self.returncode)

    def stop(self, grace_s: float) -> None:
        """Close the channels (the worker exits when its first one closes); kill it if it has
        not exited within `grace_s`."""
        self.dead = True
        for channel in self.channels:
            channel.sock.close()
        if self.wait(grace_s) is None:
            self.kill()
            self.wait()
        self.release()

    def release(self) -> None:
        with self._release_lock:
            if self._released:
                return
            self._released = True
        for channel in self.channels:
            channel.close()


def receive_channels(sock: socket.socket) -> list[socket.socket]:
    """The worker's side of `_more_channels`."""
    out: list[socket.socket] = []
    while True:
        data, fds, _, _ = socket.recv_fds(sock, 16, _FDS_PER_PACKET)
        out.extend(socket.socket(fileno=fd) for fd in fds)
        if data[:1] != _CHANNELS or len(data) != 1 + _COUNTS.size:
            raise ProtocolError("expected the channels after the load")
        total, here = _COUNTS.unpack(data[1:])
        if here != len(fds):
            raise ProtocolError("a channel packet without its descriptors")
        if len(out) >= total:
            return out
