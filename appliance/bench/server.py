"""The server under test: `appliance serve` as a subprocess, and its memory and CPU time."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from ..errors import ModelError
from .client import HttpConnection, build_request, error_text, free_port
from .errors import BenchError
from .report import say

if TYPE_CHECKING:
    from ..config import Config
    from .model import Target
    from .options import BenchOptions

#: How long the server may take to bind its port (it logs the port once listening).
PORT_TIMEOUT_S = 30.0
#: How long the model may take to load; generous because a TensorRT engine build takes minutes.
READY_TIMEOUT_S = 600.0
#: How long a stopping server may take beyond its own shutdown timeout before it is killed.
STOP_GRACE_S = 5.0


def rss_and_peak(pid: int) -> tuple[float | None, float | None]:
    """(VmRSS, VmHWM) of a process in MiB, from /proc; None where /proc is not available."""
    values: dict[str, float] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None, None
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            parts = rest.split()
            if parts and parts[0].isdigit():
                values[key] = int(parts[0]) / 1024.0  # kB -> MiB
    return values.get("VmRSS"), values.get("VmHWM")


def cpu_seconds(pid: int, tid: int | None = None) -> float | None:
    """User plus system CPU time of a process, all its threads (or its thread `tid` alone),
    from /proc (10 ms ticks)."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    try:
        fields = Path(path).read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _port_of(line: Any) -> int | None:
    """The port in the server's "serving ... on http://..." log line (top level, or under
    "fields" should the formatter ever stop flattening them)."""
    if not isinstance(line, dict):
        return None
    for obj in (line, line.get("fields")):
        if isinstance(obj, dict):
            port = obj.get("port")
            if isinstance(port, int) and not isinstance(port, bool) and 0 < port < 65536:
                return port
    return None


class _LogWatch(threading.Thread):
    """Watches the server's log, a file (not a pipe), for the `"port": N` line, then stops.

    A file rather than a pipe the bench drains: under a flood the server writes an access line
    per request, and a drained pipe would wake a thread of the bench (taking the interpreter
    lock from its clients) and make the server's writes dearer, so the bench would partly
    measure its own log plumbing. The file is read again only for `tail` (error messages)."""

    #: How often the file is read again while the port is not in it (seconds).
    POLL_S = 0.02

    def __init__(self, fd: int, proc: subprocess.Popen[bytes]) -> None:
        super().__init__(name="bench-server-log", daemon=True)
        self.fd = fd
        self.proc = proc
        self.port: int | None = None
        self.done = threading.Event()  # the port was seen, or the process ended
        self._halt = threading.Event()

    @property
    def eof(self) -> bool:
        """The server ended (its log is complete)."""
        return self.proc.poll() is not None

    def run(self) -> None:
        import orjson

        offset, pending = 0, b""
        while not self._halt.is_set():
            ended = self.proc.poll() is not None  # before the read: no line can be missed
            try:
                chunk = os.pread(self.fd, 1 << 16, offset)
            except OSError:
                break
            offset += len(chunk)
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if b'"port"' not in line:
                    continue
                with contextlib.suppress(orjson.JSONDecodeError):
                    port = _port_of(orjson.loads(line))
                    if port is not None:
                        self.port = port
                        self.done.set()
                        return
            if ended:
                break
            if not chunk:
                self._halt.wait(self.POLL_S)
        self.done.set()

    def stop(self) -> None:
        self._halt.set()

    def tail(self, lines: int = 6) -> str:
        """The last lines the server wrote, for error messages."""
        try:
            size = os.fstat(self.fd).st_size
            data = os.pread(self.fd, 16384, max(0, size - 16384))
        except OSError:
            return ""
        text = data.decode("utf-8", "replace").strip().splitlines()
        return "\n".join(text[-lines:])


class ServerProcess:
    """`appliance serve --model FILE` as a subprocess on a free port, until `stop`."""

    def __init__(
        self, command: list[str], token: str, port: int = 0, env: dict[str, str] | None = None
    ) -> None:
        self.command = command
        self.token = token
        #: Extra environment variables (settings as APPLIANCE_* variables).
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.drain: _LogWatch | None = None
        #: The server's stderr (its log): an unnamed temporary file, gone once closed.
        self.log: BinaryIO | None = None
        #: 0: read the bound port from the server's log; else the port it was told to use.
        self.port = port

    def start(self) -> int:
        self.log = tempfile.TemporaryFile()  # noqa: SIM115  (closed by stop)
        try:
            self.proc = subprocess.Popen(
                self.command,
                env={**os.environ, **self.env} if self.env else None,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=self.log,
            )
        except OSError as exc:
            self.log.close()
            raise BenchError(f"cannot start the server ({self.command[0]}): {exc}") from None
        self.drain = _LogWatch(self.log.fileno(), self.proc)
        self.drain.start()
        if self.port:
            self._wait_listening()
            return self.port
        if not self.drain.done.wait(PORT_TIMEOUT_S) or self.drain.port is None:
            raise BenchError(self._why("did not report its port", PORT_TIMEOUT_S))
        self.port = self.drain.port
        return self.port

    def _wait_listening(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + PORT_TIMEOUT_S
        while True:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=1.0),
            ):
                return
            if self.proc.poll() is not None:
                raise BenchError(self._why("exited"))
            if time.monotonic() > deadline:
                raise BenchError(self._why(f"did not listen on port {self.port}", PORT_TIMEOUT_S))
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _why(self, what: str, timeout_s: float | None = None) -> str:
        assert self.proc is not None and self.drain is not None
        code = self.proc.poll()
        if code is not None:
            self.drain.join(1.0)
            msg = f"the server exited with status {code} before it was ready"
        elif timeout_s is not None:
            msg = f"the server {what} within {timeout_s:g} s"
        else:
            msg = f"the server {what}"
        tail = self.drain.tail()
        return f"{msg}; its last output:\n{tail}" if tail else msg

    def wait_ready(self, conn: HttpConnection, model: str) -> None:
        """Poll readiness: health first (every model loaded), then this model itself."""
        assert self.proc is not None
        auth = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        health = build_request("GET", "/v2/health/ready", *conn.address)
        model_ready = build_request("GET", f"/v2/models/{model}/ready", *conn.address, b"", auth)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            status, _, body = conn.exchange(health)
            if status == 200:
                break
            text = error_text(body)
            if ": failed" in text:  # "not ready: NAME: failed (reason)"
                raise ModelError(f"the server could not load the model: {text}")
            if self.proc.poll() is not None:
                raise BenchError(self._why("exited"))
            if time.monotonic() > deadline:
                raise BenchError(self._why(f"was not ready ({text})", READY_TIMEOUT_S))
            time.sleep(0.02)
        status, _, body = conn.exchange(model_ready)
        if status != 200:
            raise ModelError(f"the server does not serve the model: {error_text(body)}")

    def alive_or_raise(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise BenchError(self._why("exited"))

    def stop(self, timeout_s: float) -> None:
        """SIGTERM for a graceful shutdown; SIGKILL if it does not end in time."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.drain is not None:
            self.drain.stop()
            self.drain.join(2.0)
        if self.log is not None:
            self.log.close()


def serve_command(options: BenchOptions, target: Target, port: int) -> list[str]:
    """`appliance serve` for the target, with the settings flags the bench was given."""
    cmd = [sys.executable, "-m", "appliance", "serve", "--model", str(target.file)]
    cmd += ["--name", target.name, "--host", "127.0.0.1", "--port", str(port)]
    for flag, value in (
        ("--config", options.config),
        ("--models", options.models),
        ("--device", options.device),
    ):
        if value is not None:
            cmd += [flag, str(value)]
    if options.mqtt:
        cmd += ["--mqtt", options.mqtt, "--device-id", mqtt_device()]
    return cmd


def mqtt_device() -> str:
    """The device id the server is given for MQTT topics (unique to this bench process)."""
    return f"bench-{os.getpid()}"


def server_for(options: BenchOptions, config: Config, target: Target, token: str) -> ServerProcess:
    """The `appliance serve` subprocess both benchmarks time (not started yet).

    The server announces the port it bound in an info line; at a quieter log level (which also
    silences the access log) a free port is picked here instead, racing other programs."""
    port_hint = 0 if config.server.log_level in ("debug", "info") else free_port()
    return ServerProcess(serve_command(options, target, port_hint), token, port_hint)


def open_server(
    server: ServerProcess, model: str, timeout_s: float, quiet: bool
) -> tuple[HttpConnection, tuple[str, int], float | None]:
    """Start the server, wait until `model` is ready; (connection, address, idle RSS MiB)."""
    say(quiet, "starting the server ...")
    address = ("127.0.0.1", server.start())
    conn = HttpConnection(*address, timeout_s)
    try:
        server.wait_ready(conn, model)
    except BaseException:
        conn.close()
        raise
    idle_rss, _ = rss_and_peak(server.pid)
    return conn, address, idle_rss
