"""`appliance bench`: what the appliance adds on top of the runtime, measured in one run.

The same model and settings are timed twice, side by side: the raw runtime call in-process (the
floor no server can beat) and the HTTP round trip through a real `appliance serve` subprocess
(what a client sees). Their difference is the cost of the serving path. A throughput run at some
concurrency and the server's memory complete the picture.

For a GGUF chat model the work is a streamed chat completion instead: time to first token and
decode tokens/s of llama-cpp-python's own `create_chat_completion(stream=True)`, against the same
greedy request streamed from /v1/chat/completions (server-sent events timed as they arrive).

The HTTP client is a minimal blocking socket client with pre-encoded requests, so that the
client's own cost stays out of the figures as far as possible; the server keeps its default
settings (access log included), so the figures are those of a real deployment.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ApplianceError, ConfigError, ModelError

if TYPE_CHECKING:
    import numpy as np

    from .backends.base import Backend
    from .config import Config, GgufConfig
    from .device import Placement
    from .engine import ModelSource
    from .tensors import TensorSpec

    Array = np.ndarray[Any, Any]

#: How long the server may take to bind its port (it logs the port once listening).
PORT_TIMEOUT_S = 30.0
#: How long the model may take to load; generous because a TensorRT engine build takes minutes.
READY_TIMEOUT_S = 600.0
#: How long a stopping server may take beyond its own shutdown timeout before it is killed.
STOP_GRACE_S = 5.0
_SEED = 0
#: Idle time before each paced raw call: about one HTTP round trip on a small CPU.
PACED_GAP_S = 0.0003


class BenchError(ApplianceError):
    """The benchmark could not be run or the server misbehaved during it."""


# -- figures ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Latency:
    """Percentiles of one measurement, in microseconds."""

    p50_us: float
    p99_us: float
    mean_us: float
    count: int

    @classmethod
    def of(cls, samples_ns: Sequence[int]) -> Latency:
        import numpy as np

        if not samples_ns:
            raise BenchError("no latency samples were taken")
        us = np.asarray(samples_ns, dtype=np.float64) / 1000.0
        p50, p99 = np.percentile(us, [50, 99])
        return cls(float(p50), float(p99), float(us.mean()), len(us))


def _rss_and_peak(pid: int) -> tuple[float | None, float | None]:
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


def _cpu_seconds(pid: int) -> float | None:
    """User plus system CPU time of a process, all its threads, from /proc (10 ms ticks)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


# -- inputs -----------------------------------------------------------------------------------
def make_inputs(specs: Sequence[TensorSpec], batch: int, seed: int = _SEED) -> dict[str, Array]:
    """Deterministic random data that fits the signature (every -1 dimension becomes `batch`).

    BYTES tensors are object arrays of `str`, which is what onnxruntime takes for strings.
    """
    import numpy as np

    from .tensors import DATATYPES, FLOAT_TYPES, INT_TYPES

    rng = np.random.default_rng(seed)
    out: dict[str, Array] = {}
    for spec in specs:
        shape = tuple(batch if d < 0 else d for d in spec.shape)
        dtype = DATATYPES.get(spec.datatype)
        if dtype is None:
            raise ModelError(f"input {spec.name!r} has datatype {spec.datatype}, unknown to bench")
        array: Array
        if spec.datatype in FLOAT_TYPES:
            array = rng.standard_normal(shape).astype(dtype)
        elif spec.datatype in INT_TYPES:
            array = rng.integers(0, 10, size=shape).astype(dtype)
        elif spec.datatype == "BOOL":
            array = rng.random(shape) < 0.5
        else:  # BYTES
            letters = "abcdefghijklmnopqrstuvwxyz"
            flat = [
                "".join(letters[int(i)] for i in rng.integers(0, 26, size=int(rng.integers(1, 9))))
                for _ in range(math.prod(shape))
            ]
            array = np.empty(len(flat), dtype=object)
            array[:] = flat
            array = array.reshape(shape)
        out[spec.name] = array
    return out


def _utf8(item: Any) -> bytes:
    return item if isinstance(item, bytes) else str(item).encode("utf-8")


def infer_request(
    inputs: Any, datatypes: Any, binary: bool, token: str
) -> tuple[bytes, dict[str, str]]:
    """The KServe v2 infer body the load generators send, and its headers."""
    body, header_length = encode_infer_body(inputs, datatypes, binary)
    headers = {"Content-Type": "application/octet-stream" if binary else "application/json"}
    if header_length is not None:
        headers["Inference-Header-Content-Length"] = str(header_length)
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return body, headers


def encode_infer_body(
    inputs: dict[str, Array], datatypes: dict[str, str], binary: bool
) -> tuple[bytes, int | None]:
    """A KServe v2 infer body; with `binary`, the binary tensor data extension both ways.

    Returns the body and, for binary, the JSON header length (Inference-Header-Content-Length).
    """
    import numpy as np
    import orjson

    entries: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, array in inputs.items():
        datatype = datatypes[name]
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary:
            if datatype == "BYTES":
                blob = b"".join(
                    struct.pack("<I", len(b)) + b for b in map(_utf8, array.reshape(-1))
                )
            else:
                blob = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif datatype == "BYTES":
            entry["data"] = [
                item.decode("utf-8") if isinstance(item, bytes) else str(item)
                for item in array.reshape(-1)
            ]
        else:
            entry["data"] = array.reshape(-1)
        entries.append(entry)
    head: dict[str, Any] = {"inputs": entries}
    if binary:
        head["parameters"] = {"binary_data_output": True}
    header = orjson.dumps(head, option=orjson.OPT_SERIALIZE_NUMPY)
    if not binary:
        return header, None
    return b"".join([header, *blobs]), len(header)


def decode_infer_body(body: bytes, header_length: int | None) -> dict[str, Array]:
    """The outputs of a KServe v2 infer response, JSON or binary, as numpy arrays."""
    import numpy as np
    import orjson

    from .tensors import DATATYPES

    header = body if header_length is None else body[:header_length]
    binary = memoryview(body)[len(header) :]
    try:
        obj = orjson.loads(header)
        outputs = obj["outputs"]
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        raise BenchError(f"the server's infer response is not KServe v2 JSON: {exc}") from None
    out: dict[str, Array] = {}
    offset = 0
    for item in outputs:
        name, datatype, shape = item["name"], item["datatype"], tuple(item["shape"])
        n = math.prod(shape)
        size = (item.get("parameters") or {}).get("binary_data_size")
        array: Array
        if size is not None:
            chunk = binary[offset : offset + size]
            offset += size
            if datatype == "BYTES":
                values, pos = [], 0
                for _ in range(n):
                    (length,) = struct.unpack_from("<I", chunk, pos)
                    values.append(bytes(chunk[pos + 4 : pos + 4 + length]).decode("utf-8"))
                    pos += 4 + length
                array = np.empty(n, dtype=object)
                array[:] = values
            else:
                array = np.frombuffer(chunk, dtype=DATATYPES[datatype].newbyteorder("<"))
        elif datatype == "BYTES":
            array = np.empty(n, dtype=object)
            array[:] = list(item["data"])
        else:
            array = np.asarray(item["data"], dtype=DATATYPES[datatype])
        out[name] = array.reshape(shape)
    return out


def check_outputs(expected: dict[str, Array], got: dict[str, Array]) -> None:
    """The server must answer what the runtime answers for the same input, else the figures
    would compare different work."""
    import numpy as np

    from .tensors import datatype_of

    if list(got) != list(expected):
        raise BenchError(
            f"the server returned outputs {list(got)} but the runtime gives {list(expected)}"
        )
    for name, want in expected.items():
        have = got[name]
        what = f"output {name!r}"
        if have.shape != want.shape:
            raise BenchError(
                f"{what}: the server returned shape {list(have.shape)}, the runtime "
                f"{list(want.shape)}"
            )
        kind = datatype_of(want)
        if kind == "BYTES":
            same = [_text(x) for x in have.reshape(-1)] == [_text(x) for x in want.reshape(-1)]
        elif want.dtype.kind == "f":
            rtol = 1e-3 if want.dtype == np.float16 else 1e-5
            same = bool(np.allclose(have, want, rtol=rtol, atol=1e-6, equal_nan=True))
        else:
            same = bool(np.array_equal(have, want))
        if not same:
            raise BenchError(
                f"{what}: the server's values differ from the runtime's for the same input "
                f"(server {_preview(have)}, runtime {_preview(want)})"
            )


def _text(item: Any) -> str:
    return item.decode("utf-8", "replace") if isinstance(item, bytes) else str(item)


def _preview(array: Array) -> str:
    flat = array.reshape(-1)[:6].tolist()
    return f"{flat}{'...' if array.size > 6 else ''}"


# -- a minimal HTTP/1.1 client ----------------------------------------------------------------
class HttpConnection:
    """One keep-alive connection with blocking sockets: send pre-encoded bytes, read one response.

    No HTTP library: the point is to keep the client's own cost out of the latency figures.
    """

    def __init__(self, host: str, port: int, timeout_s: float) -> None:
        self.address = (host, port)
        self.timeout_s = timeout_s
        try:
            self.sock = socket.create_connection(self.address, timeout=timeout_s)
        except OSError as exc:
            raise BenchError(f"cannot connect to the server at {host}:{port}: {exc}") from None
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._pending = b""

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def _recv(self) -> bytes:
        try:
            chunk = self.sock.recv(262144)
        except TimeoutError:
            raise BenchError(f"the server did not answer within {self.timeout_s:g} s") from None
        except OSError as exc:
            raise BenchError(f"connection to the server failed: {exc}") from None
        if not chunk:
            raise BenchError("the server closed the connection")
        return chunk

    def exchange(self, request: bytes) -> tuple[int, bytes, bytes]:
        """Send one request; return the status, the raw header block and the body."""
        try:
            self.sock.sendall(request)
        except OSError as exc:
            raise BenchError(f"cannot send to the server: {exc}") from None
        buf = self._pending
        while (end := buf.find(b"\r\n\r\n")) < 0:
            buf += self._recv()
        head = buf[:end]
        try:
            status = int(head[9:12])
        except ValueError:
            raise BenchError(f"malformed HTTP response: {head[:80]!r}") from None
        length = _content_length(head)
        need = end + 4 + length
        if len(buf) < need:
            parts, have = [buf], len(buf)
            while have < need:
                chunk = self._recv()
                parts.append(chunk)
                have += len(chunk)
            buf = b"".join(parts)
        self._pending = buf[need:]
        return status, head, buf[end + 4 : need]


def _content_length(head: bytes) -> int:
    lower = head.lower()
    i = lower.find(b"\r\ncontent-length:")
    if i < 0:
        if b"\r\ntransfer-encoding:" in lower:
            raise BenchError("the server sent a chunked response, which bench does not read")
        return 0
    start = i + len(b"\r\ncontent-length:")
    stop = lower.find(b"\r\n", start)
    return int(lower[start : stop if stop >= 0 else len(lower)])


def _header(head: bytes, name: bytes) -> bytes | None:
    needle = b"\r\n" + name.lower() + b":"
    lower = head.lower()
    i = lower.find(needle)
    if i < 0:
        return None
    start = i + len(needle)
    stop = lower.find(b"\r\n", start)
    return head[start : stop if stop >= 0 else len(head)].strip()


def build_request(
    method: str,
    path: str,
    host: str,
    port: int,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> bytes:
    """The full request bytes, encoded once and sent as is on every iteration."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _error_text(body: bytes) -> str:
    import orjson

    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body[:300].decode("utf-8", "replace")
    if isinstance(obj, dict) and isinstance(obj.get("error"), str):
        return str(obj["error"])
    return body[:300].decode("utf-8", "replace")


# -- the server under test --------------------------------------------------------------------
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


class _StderrDrain(threading.Thread):
    """Reads the server's stderr for the `"port": N` line, then keeps draining it (the access
    log writes a line per request) so the pipe never fills and blocks the server."""

    def __init__(self, fd: int) -> None:
        super().__init__(name="bench-server-stderr", daemon=True)
        self.fd = fd
        self.port: int | None = None
        self.done = threading.Event()  # the port was seen, or stderr closed
        self.eof = False
        self._tail = bytearray()
        self._lines = b""

    def run(self) -> None:
        import orjson

        while True:
            try:
                chunk = os.read(self.fd, 1 << 16)
            except OSError:
                break
            if not chunk:
                break
            self._tail += chunk
            if len(self._tail) > 16384:
                del self._tail[:-16384]
            if self.port is None:
                self._lines += chunk
                *lines, self._lines = self._lines.split(b"\n")
                for line in lines:
                    if b'"port"' not in line:
                        continue
                    with contextlib.suppress(orjson.JSONDecodeError):
                        port = _port_of(orjson.loads(line))
                        if port is not None:
                            self.port = port
                            self._lines = b""
                            self.done.set()
                            break
        self.eof = True
        self.done.set()

    def tail(self, lines: int = 6) -> str:
        """The last lines the server wrote, for error messages."""
        text = bytes(self._tail).decode("utf-8", "replace").strip().splitlines()
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
        self.drain: _StderrDrain | None = None
        #: 0: read the bound port from the server's log; else the port it was told to use.
        self.port = port

    def start(self) -> int:
        try:
            self.proc = subprocess.Popen(
                self.command,
                env={**os.environ, **self.env} if self.env else None,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
        except OSError as exc:
            raise BenchError(f"cannot start the server ({self.command[0]}): {exc}") from None
        assert self.proc.stderr is not None
        self.drain = _StderrDrain(self.proc.stderr.fileno())
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
        if code is None and self.drain.eof:
            # stderr closed: the process is ending, give it a moment to be reaped
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = self.proc.wait(2.0)
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
            text = _error_text(body)
            if ": failed" in text:  # "not ready: NAME: failed (reason)"
                raise ModelError(f"the server could not load the model: {text}")
            if self.proc.poll() is not None:
                raise BenchError(self._why("exited"))
            if time.monotonic() > deadline:
                raise BenchError(self._why(f"was not ready ({text})", READY_TIMEOUT_S))
            time.sleep(0.02)
        status, _, body = conn.exchange(model_ready)
        if status != 200:
            raise ModelError(f"the server does not serve the model: {_error_text(body)}")

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
            self.drain.join(2.0)
        if proc.stderr is not None:
            proc.stderr.close()


# -- measurements -----------------------------------------------------------------------------
@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """The bench process's own garbage collections are not the server's latency."""
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def time_calls(call: Callable[[], object], warmup: int, requests: int) -> list[int]:
    """Nanoseconds per call, after `warmup` untimed calls."""
    clock = time.perf_counter_ns
    for _ in range(warmup):
        call()
    samples: list[int] = []
    append = samples.append
    with _no_gc():
        for _ in range(requests):
            t0 = clock()
            call()
            append(clock() - t0)
    return samples


def time_paced(call: Callable[[], object], gap_s: float, requests: int) -> list[int]:
    """Nanoseconds per call with an idle gap before each, as a server sees its requests.

    Back to back, a runtime call runs with hot caches; in a server, the time between requests
    (the client's turn, the network stack) cools them. This is the floor a server can reach."""
    clock, sleep = time.perf_counter_ns, time.sleep
    samples: list[int] = []
    append = samples.append
    with _no_gc():
        for _ in range(requests):
            sleep(gap_s)
            t0 = clock()
            call()
            append(clock() - t0)
    return samples


def time_http(conn: HttpConnection, request: bytes, warmup: int, requests: int) -> list[int]:
    """Sequential round trips on one keep-alive connection; every answer must be 200."""
    exchange = conn.exchange
    failure: list[tuple[int, bytes]] = []

    def one() -> None:
        status, _, body = exchange(request)
        if status != 200 and not failure:
            failure.append((status, body))

    samples = time_calls(one, warmup, requests)
    if failure:
        status, body = failure[0]
        raise BenchError(f"the server answered {status}: {_error_text(body)}")
    return samples


def time_concurrent(
    address: tuple[str, int],
    request: bytes,
    concurrency: int,
    warmup: int,
    requests: int,
    timeout_s: float,
) -> tuple[list[int], float]:
    """`requests` round trips over `concurrency` keep-alive connections, one thread each.

    Returns the per-request latencies and the wall time in seconds from the common start to the
    last answer.
    """
    lock = threading.Lock()
    remaining = [requests]
    results: list[list[int]] = [[] for _ in range(concurrency)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(concurrency + 1)
    clock = time.perf_counter_ns

    def take() -> bool:
        with lock:
            if remaining[0] <= 0:
                return False
            remaining[0] -= 1
            return True

    def worker(index: int) -> None:
        conn: HttpConnection | None = None
        try:
            conn = HttpConnection(*address, timeout_s)
            for _ in range(warmup):
                conn.exchange(request)
            barrier.wait()
            samples = results[index]
            while take():
                t0 = clock()
                status, _, body = conn.exchange(request)
                samples.append(clock() - t0)
                if status != 200:
                    raise BenchError(f"the server answered {status}: {_error_text(body)}")
        except threading.BrokenBarrierError:
            pass
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()
            with lock:
                remaining[0] = 0
        finally:
            if conn is not None:
                conn.close()

    threads = [
        threading.Thread(target=worker, args=(i,), name=f"bench-client-{i}", daemon=True)
        for i in range(concurrency)
    ]
    with _no_gc():
        for t in threads:
            t.start()
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait()
        start = clock()
        for t in threads:
            t.join()
        wall_s = (clock() - start) / 1e9
    if errors:
        first = errors[0]
        if isinstance(first, ApplianceError):
            raise first
        raise BenchError(f"a client thread failed: {first!r}") from first
    return [s for r in results for s in r], wall_s


# -- the model --------------------------------------------------------------------------------
@dataclass
class Target:
    """What is benchmarked: the file the server is given and the name it serves it under."""

    name: str
    file: Path
    source: ModelSource


def resolve_model(spec: str, config: Config) -> Target:
    """A model file, or else the active version of a model in the store."""
    from .engine import ModelSource
    from .errors import NotFound
    from .registry import Registry
    from .server import source_from_file

    path = Path(spec)
    if path.is_file():
        src = source_from_file(path)
        return Target(src.manifest.name, path, src)
    store = Path(config.store.path)
    registry = Registry(store)
    known = spec in registry.names()
    try:
        mv = registry.active(spec)
    except (NotFound, ModelError) as exc:
        if not known:
            raise ModelError(
                f"{spec}: no such model file, and no model of that name in the store at {store}"
            ) from None
        raise ModelError(f"{spec}: {exc.message}") from None
    return Target(mv.manifest.name, mv.file, ModelSource(mv.manifest, mv.file))


def load_backend(target: Target, config: Config) -> Backend:
    """The model loaded exactly as the server loads it: same backend, same effective settings."""
    from .backends import get_backend
    from .backends.base import LoadContext

    cls = get_backend(target.source.manifest.backend)
    context = LoadContext(config.model_config(target.name), Path(config.store.path) / ".cache")
    return cls(target.source.manifest, target.file, context)


def raw_call(backend: Backend, inputs: dict[str, Array]) -> tuple[Callable[[], Any], list[str]]:
    """The bare runtime call (ONNX `session.run`, LiteRT's interpreter), and the names of the
    outputs it returns."""
    session = getattr(backend, "session", None)
    if backend.name == "onnx" and session is not None:
        run = session.run
        names = [o.name for o in session.get_outputs()]
        return (lambda: run(None, inputs)), names
    bare = getattr(backend, "bare_call", None)
    if backend.name == "tflite" and bare is not None:
        call: tuple[Callable[[], Any], list[str]] = bare(inputs)
        return call
    names = [t.name for t in backend.signature.outputs]
    return (lambda: list(backend.run(inputs, None).values())), names


@dataclass
class RawRun:
    """The raw runtime's figures, and the input and outputs the server must reproduce."""

    inputs: dict[str, Array]
    datatypes: dict[str, str]
    expected: dict[str, Array]
    latency: Latency
    paced: Latency
    placement: Placement


def measure_raw(
    target: Target, config: Config, batch: int, warmup: int, requests: int, quiet: bool = True
) -> RawRun:
    """Time the bare runtime call; the model is unloaded on return, so the bench process holds
    no runtime threads or memory while the server is measured."""
    import numpy as np

    backend = load_backend(target, config)
    try:
        specs = backend.signature.inputs
        inputs = make_inputs(specs, batch)
        call, out_names = raw_call(backend, inputs)
        expected = {
            n: (a if isinstance(a, np.ndarray) else np.asarray(a))
            for n, a in zip(out_names, call(), strict=True)
        }
        _say(quiet, f"timing the raw runtime call ({warmup} + {requests}) ...")
        latency = Latency.of(time_calls(call, warmup, requests))
        _say(quiet, f"timing it again with a {PACED_GAP_S * 1e6:.0f} µs idle gap before each call")
        paced = Latency.of(time_paced(call, PACED_GAP_S, requests))
        datatypes = {s.name: s.datatype for s in specs}
        return RawRun(inputs, datatypes, expected, latency, paced, backend.placement)
    finally:
        backend.unload()


# -- language models: streamed chat completions ----------------------------------------------
#: The chat request of the LLM bench: one user message, greedy decoding.
LLM_MESSAGES: list[dict[str, str]] = [
    {"role": "user", "content": "Beautiful is better than ugly."},
]
#: Untimed streamed completions on each side before the timed ones (first-call costs: the
#: prompt's first evaluation, buffers, page faults on the mapped weights).
LLM_WARMUP_RUNS = 1


@dataclass(frozen=True)
class StreamRun:
    """One streamed completion: when its text arrived, and the text."""

    ttft_ns: int  # request (or call) -> first piece of content
    decode_ns: int  # first piece -> last piece
    tokens: int  # pieces of content (llama-cpp-python streams one per token)
    text: str
    finish: str | None

    @property
    def tokens_per_s(self) -> float:
        """Decode speed: the tokens after the first over the time from the first to the last;
        NaN when they all came at once (a short generation read in one go)."""
        if self.tokens < 2 or self.decode_ns <= 0:
            return math.nan
        return (self.tokens - 1) * 1e9 / self.decode_ns


_ONE_READ = (
    "in every run all tokens reached the client in one read (the generation was too short to "
    "time its pace): use a larger --max-tokens or a bigger model"
)


def gguf_chat_config(target: Target, config: Config) -> GgufConfig | None:
    """The effective GGUF settings when the target is a GGUF chat model, else None."""
    if target.source.manifest.backend != "gguf":
        return None
    from .backends.gguf import model_mode
    from .backends.gguf_file import read_gguf

    cfg = config.model_config(target.name).gguf
    return cfg if model_mode(read_gguf(target.file), cfg.mode) == "chat" else None


def open_llama(target: Target, config: Config, cfg: GgufConfig) -> tuple[Any, Placement]:
    """`llama_cpp.Llama` with the server's own arguments and chat template, in-process (after
    the same header check and child-process probe the server does)."""
    from .backends.gguf import (
        WHY_NO_GPU,
        _llama,
        _template_handler,
        llama_kwargs,
        probe_once,
    )
    from .backends.gguf_file import read_gguf
    from .device import settle, want_accelerator

    llama_cpp = _llama()
    model_cfg = config.model_config(target.name)
    manifest = target.source.manifest
    what = f"model {manifest.name!r}"
    info = read_gguf(target.file)
    probe_once(target.file, manifest.sha256, Path(config.store.path) / ".cache", False)
    gpu = bool(llama_cpp.llama_supports_gpu_offload())
    use_gpu = want_accelerator(model_cfg.device, gpu, WHY_NO_GPU, what)
    kwargs = llama_kwargs(target.file, cfg, info, use_gpu)
    try:
        llm = llama_cpp.Llama(**kwargs)
    except Exception as exc:
        raise ModelError(f"{what}: llama.cpp cannot load {target.file.name}: {exc}") from None
    if cfg.chat_template:
        llm.chat_handler = _template_handler(llm, cfg.chat_template)
    detail = f"llama.cpp, {kwargs['n_gpu_layers']} GPU layers, {kwargs['n_threads']} threads"
    return llm, settle(model_cfg.device, use_gpu, detail, WHY_NO_GPU, what)


def raw_stream(llm: Any, max_tokens: int, seed: int) -> StreamRun:
    """One streamed chat completion straight from llama-cpp-python."""
    clock = time.perf_counter_ns
    pieces: list[str] = []
    first = last = 0
    finish: str | None = None
    t0 = clock()
    stream = llm.create_chat_completion(
        messages=LLM_MESSAGES, stream=True, max_tokens=max_tokens, temperature=0.0, seed=seed
    )
    try:
        for chunk in stream:
            choice = chunk["choices"][0]
            text = (choice.get("delta") or {}).get("content")
            if text:
                last = clock()
                if not pieces:
                    first = last
                pieces.append(text)
            if choice.get("finish_reason"):
                finish = choice["finish_reason"]
    finally:
        stream.close()
    if not pieces:
        raise BenchError("the model generated no text for the bench prompt")
    return StreamRun(first - t0, last - first, len(pieces), "".join(pieces), finish)


def chat_request_body(model: str, max_tokens: int, seed: int) -> bytes:
    import orjson

    return orjson.dumps(
        {
            "model": model,
            "messages": LLM_MESSAGES,
            "stream": True,
            "max_tokens": max_tokens,
            "temperature": 0,
            "seed": seed,
        }
    )


class _SseReader:
    """The body of a streamed response, chunked or not, as server-sent events."""

    def __init__(self, chunked: bool, length: int | None) -> None:
        self.chunked = chunked
        self.left = length  # unchunked: bytes of body still to come (None: until close)
        self.raw = b""  # received, not yet de-chunked
        self.text = b""  # de-chunked, not yet split into events
        self.done = False  # the body is complete
        self.rest = b""  # bytes after the body (the next response on the connection)

    def feed(self, data: bytes) -> list[bytes]:
        """Take received bytes; return the `data:` payloads of the events now complete."""
        if self.done:
            self.rest += data
            return []
        if not self.chunked:
            if self.left is not None:
                self.rest, data = data[self.left :], data[: self.left]
                self.left -= len(data)
                self.done = self.left <= 0
            self.text += data
        else:
            buf = self.raw + data
            pos = 0
            while not self.done:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    break
                try:
                    size = int(buf[pos:eol].split(b";", 1)[0], 16)
                except ValueError:
                    raise BenchError(f"malformed chunk size {buf[pos:eol][:40]!r}") from None
                if size == 0:  # the last chunk, then trailers up to an empty line
                    end = buf.find(b"\r\n\r\n", eol)
                    if end < 0:
                        break
                    self.done, self.rest, pos = True, buf[end + 4 :], len(buf)
                    break
                if len(buf) < eol + 2 + size + 2:
                    break
                self.text += buf[eol + 2 : eol + 2 + size]
                pos = eol + 2 + size + 2
            self.raw = buf[pos:] if not self.done else b""
        events: list[bytes] = []
        while (end := self.text.find(b"\n\n")) >= 0:
            event, self.text = self.text[:end], self.text[end + 2 :]
            lines = [line[5:].lstrip(b" ") for line in event.split(b"\n") if line[:5] == b"data:"]
            if lines:
                events.append(b"\n".join(lines))
        return events


def http_stream(conn: HttpConnection, request: bytes) -> StreamRun:
    """One streamed chat completion through the server; every event is timed as it arrives.

    While the stream runs the client only reads and timestamps what arrives (the client shares
    the CPUs with the server); the events are parsed once the body looks complete."""
    import orjson

    clock = time.perf_counter_ns
    recv = conn._recv
    t0 = clock()
    try:
        conn.sock.sendall(request)
    except OSError as exc:
        raise BenchError(f"cannot send to the server: {exc}") from None
    buf, now = conn._pending, clock()
    while (end := buf.find(b"\r\n\r\n")) < 0:
        buf += recv()
        now = clock()
    head = buf[:end]
    try:
        status = int(head[9:12])
    except ValueError:
        raise BenchError(f"malformed HTTP response: {head[:80]!r}") from None
    if status != 200:
        conn._pending = buf
        _, _, body = conn.exchange(b"")  # the (plain) error body
        raise BenchError(f"the server answered {status}: {_error_text(body)}")
    chunked = b"chunked" in (_header(head, b"Transfer-Encoding") or b"").lower()
    length = _header(head, b"Content-Length")
    if not chunked and length is None:
        raise BenchError("the server's stream has neither chunked encoding nor a length")
    reader = _SseReader(chunked, None if chunked else int(length or 0))
    received = [(now, buf[end + 4 :])]
    tail, size = received[0][1][-4:], len(received[0][1])
    pieces: list[str] = []
    first = last = 0
    finish: str | None = None
    seen_done = False
    while True:
        # the cheap part, while the server streams: read until the body may be complete
        if chunked:
            while tail != b"\r\n\r\n":  # the last chunk (and trailers) end so
                data = recv()
                received.append((clock(), data))
                tail = (tail + data)[-4:]
        else:
            while size < reader.left:  # type: ignore[operator]
                data = recv()
                received.append((clock(), data))
                size += len(data)
        for arrived, data in received:
            for payload in reader.feed(data):
                if payload == b"[DONE]":
                    seen_done = True
                    continue
                try:
                    obj = orjson.loads(payload)
                    if "error" in obj:
                        raise BenchError(f"the server's stream failed: {obj['error']}")
                    choice = obj["choices"][0]
                except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
                    raise BenchError(f"unexpected event in the stream: {payload[:200]!r}") from None
                text = (choice.get("delta") or {}).get("content")
                if text:
                    last = arrived
                    if not pieces:
                        first = arrived
                    pieces.append(text)
                if choice.get("finish_reason"):
                    finish = choice["finish_reason"]
        received = []
        if reader.done:
            break
        tail = b""  # that ended a chunk's payload, not the body: read on
    conn._pending = reader.rest
    if not seen_done:
        raise BenchError("the server's stream ended without `data: [DONE]`")
    if not pieces:
        raise BenchError("the server streamed no text for the bench prompt")
    return StreamRun(first - t0, last - first, len(pieces), "".join(pieces), finish)


def _median(values: Sequence[float]) -> float:
    """The median of the finite values; NaN when there are none."""
    import statistics

    finite = [v for v in values if math.isfinite(v)]
    return float(statistics.median(finite)) if finite else math.nan


def run_llm_bench(
    args: argparse.Namespace, config: Config, target: Target, cfg: GgufConfig
) -> dict[str, Any]:
    """Streamed chat completions: raw llama-cpp-python, then through a real server."""
    quiet = bool(args.json)
    runs, max_tokens = args.runs, args.max_tokens
    model_cfg = config.model_config(target.name)

    # 1. Raw llama-cpp-python, in-process; closed before the server starts.
    _say(quiet, f"loading {target.file} in-process ...")
    llm, placement = open_llama(target, config, cfg)
    try:
        _say(quiet, f"timing raw streamed chat completions ({LLM_WARMUP_RUNS} + {runs}) ...")
        for _ in range(LLM_WARMUP_RUNS):
            raw_stream(llm, max_tokens, _SEED)
        with _no_gc():
            raw = [raw_stream(llm, max_tokens, _SEED) for _ in range(runs)]
    finally:
        llm.close()
        del llm
    gc.collect()

    token = config.token()
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    timeout_s = model_cfg.timeout_s + 30.0
    body = chat_request_body(target.name, max_tokens, _SEED)

    # 2. The same request through the server.
    server = _server_for(args, config, target, token)
    conn: HttpConnection | None = None
    try:
        conn, address, idle_rss = _open_server(server, target.name, timeout_s, quiet)
        request = build_request("POST", "/v1/chat/completions", *address, body, headers)
        _say(quiet, f"timing streamed chat completions over HTTP ({LLM_WARMUP_RUNS} + {runs}) ...")
        for _ in range(LLM_WARMUP_RUNS):
            http_stream(conn, request)
        with _no_gc():
            http = [http_stream(conn, request) for _ in range(runs)]
        server.alive_or_raise()
        after_rss, peak_rss = _rss_and_peak(server.pid)
    finally:
        if conn is not None:
            conn.close()
        server.stop(config.server.shutdown_timeout_s + STOP_GRACE_S)

    # 3. Same work on both sides, or the figures compare nothing.
    for i, (a, b) in enumerate(zip(raw, http, strict=True)):
        if b.text != a.text:
            raise BenchError(
                f"run {i + 1}: the server generated {b.text[:80]!r}, llama-cpp-python "
                f"{a.text[:80]!r} for the same greedy request"
            )
        if b.tokens != a.tokens:
            raise BenchError(
                f"run {i + 1}: the server streamed {b.tokens} tokens, llama-cpp-python {a.tokens}"
            )

    def r(x: float | None, digits: int = 2) -> float | None:
        return None if x is None or not math.isfinite(x) else round(x, digits)

    raw_ttft = [x.ttft_ns / 1e6 for x in raw]
    http_ttft = [x.ttft_ns / 1e6 for x in http]
    raw_tps = [x.tokens_per_s for x in raw]
    http_tps = [x.tokens_per_s for x in http]
    raw_ttft_ms, http_ttft_ms = _median(raw_ttft), _median(http_ttft)
    raw_tokens_per_s, http_tokens_per_s = _median(raw_tps), _median(http_tps)
    return {
        "kind": "llm",
        "model": target.name,
        "model_file": str(target.file),
        "backend": target.source.manifest.backend,
        "device": placement.device,
        "runtime_detail": placement.detail,
        "cpu_count": os.cpu_count(),
        "runs": runs,
        "warmup_runs": LLM_WARMUP_RUNS,
        "max_tokens": max_tokens,
        "seed": _SEED,
        "messages": LLM_MESSAGES,
        "tokens": raw[0].tokens,
        "finish_reason": raw[0].finish,
        "request_bytes": len(body),
        "raw_ttft_ms": r(raw_ttft_ms, 3),
        "http_ttft_ms": r(http_ttft_ms, 3),
        "added_ttft_ms": r(http_ttft_ms - raw_ttft_ms, 3),
        "raw_tokens_per_s": r(raw_tokens_per_s),
        "http_tokens_per_s": r(http_tokens_per_s),
        "tokens_per_s_ratio": r(http_tokens_per_s / raw_tokens_per_s, 4),
        "tokens_per_s_note": None if math.isfinite(http_tokens_per_s) else _ONE_READ,
        "raw_ttft_ms_runs": [r(x, 3) for x in raw_ttft],
        "http_ttft_ms_runs": [r(x, 3) for x in http_ttft],
        "raw_tokens_per_s_runs": [r(x) for x in raw_tps],
        "http_tokens_per_s_runs": [r(x) for x in http_tps],
        "server_idle_rss_mib": r(idle_rss, 1),
        "server_after_rss_mib": r(after_rss, 1),
        "server_peak_rss_mib": r(peak_rss, 1),
    }


def format_llm_table(f: dict[str, Any]) -> str:
    """The LLM figures for a person: raw llama-cpp-python and HTTP streaming side by side."""

    def num(x: Any, fmt: str = ",.2f") -> str:
        return "n/a" if x is None else format(x, fmt)

    added, ratio = f["added_ttft_ms"], f["tokens_per_s_ratio"]
    lines = [
        f"model    {f['model']} ({f['model_file']}), {f['backend']} on {f['device']} "
        f"({f['runtime_detail']})",
        f"request  streamed chat completion, max_tokens {f['max_tokens']}, temperature 0, "
        f"seed {f['seed']}: {f['tokens']} tokens (finish: {f['finish_reason']})",
        f"machine  {f['cpu_count']} CPUs; medians of {f['runs']} runs after "
        f"{f['warmup_runs']} warm-up",
        "",
        f"{'':<26}{'raw llama.cpp':>15}{'HTTP stream':>15}{'HTTP vs raw':>15}",
        f"{'time to first token (ms)':<26}{num(f['raw_ttft_ms'], ',.3f'):>15}"
        f"{num(f['http_ttft_ms'], ',.3f'):>15}"
        f"{'n/a' if added is None else format(added, '+,.3f'):>15}",
        f"{'decode (tokens/s)':<26}{num(f['raw_tokens_per_s']):>15}"
        f"{num(f['http_tokens_per_s']):>15}{'n/a' if ratio is None else f'{ratio:.4f} x':>15}",
    ]
    if f.get("tokens_per_s_note"):
        lines.append(f"note     HTTP decode speed n/a: {f['tokens_per_s_note']}")
    lines += [
        "",
        f"server RSS: idle {num(f['server_idle_rss_mib'], ',.1f')} MiB, after the run "
        f"{num(f['server_after_rss_mib'], ',.1f')} MiB "
        f"(peak {num(f['server_peak_rss_mib'], ',.1f')} MiB)",
    ]
    return "\n".join(lines) + "\n"


# -- the command ------------------------------------------------------------------------------
def _check_args(args: argparse.Namespace) -> None:
    for key, least in (("requests", 1), ("warmup", 0), ("concurrency", 1), ("batch", 1),
                       ("runs", 1), ("max_tokens", 1)):  # fmt: skip
        value = getattr(args, key, least)
        if value < least:
            flag = key.replace("_", "-")
            raise ConfigError(f"--{flag} = {value}: must be at least {least}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _serve_command(args: argparse.Namespace, target: Target, port: int) -> list[str]:
    cmd = [sys.executable, "-m", "appliance", "serve", "--model", str(target.file)]
    cmd += ["--name", target.name, "--host", "127.0.0.1", "--port", str(port)]
    for flag, key in (("--config", "config"), ("--models", "models"), ("--device", "device")):
        value = getattr(args, key, None)
        if value is not None:
            cmd += [flag, str(value)]
    if getattr(args, "mqtt", None):
        cmd += ["--mqtt", args.mqtt, "--device-id", _mqtt_device()]
    return cmd


def _mqtt_device() -> str:
    return f"bench-{os.getpid()}"


def _server_for(
    args: argparse.Namespace, config: Config, target: Target, token: str
) -> ServerProcess:
    """The `appliance serve` subprocess both benchmarks time (not started yet).

    The server announces the port it bound in an info line; at a quieter log level (which also
    silences the access log) a free port is picked here instead, racing other programs."""
    port_hint = 0 if config.server.log_level in ("debug", "info") else _free_port()
    return ServerProcess(_serve_command(args, target, port_hint), token, port_hint)


def _open_server(
    server: ServerProcess, model: str, timeout_s: float, quiet: bool
) -> tuple[HttpConnection, tuple[str, int], float | None]:
    """Start the server, wait until `model` is ready; (connection, address, idle RSS MiB)."""
    _say(quiet, "starting the server ...")
    address = ("127.0.0.1", server.start())
    conn = HttpConnection(*address, timeout_s)
    try:
        server.wait_ready(conn, model)
    except BaseException:
        conn.close()
        raise
    idle_rss, _ = _rss_and_peak(server.pid)
    return conn, address, idle_rss


def _say(quiet: bool, text: str) -> None:
    if not quiet:
        print(text, file=sys.stderr, flush=True)


def run_bench(args: argparse.Namespace) -> int:
    """Raw runtime vs HTTP round trip, throughput and server memory for one model."""

    from .cli import _config
    from .tensors import datatype_of

    _check_args(args)
    quiet = bool(args.json)
    config = _config(args)
    target = resolve_model(args.model, config)
    gguf_chat = gguf_chat_config(target, config)
    if gguf_chat is not None:
        _emit(run_llm_bench(args, config, target, gguf_chat), args.json, format_llm_table)
        return 0
    model_cfg = config.model_config(target.name)

    # 1. The raw runtime, in-process; released before the server starts.
    _say(quiet, f"loading {target.file} in-process ...")
    raw_run = measure_raw(target, config, args.batch, args.warmup, args.requests, quiet)
    inputs, datatypes, expected = raw_run.inputs, raw_run.datatypes, raw_run.expected
    raw, paced, placement = raw_run.latency, raw_run.paced, raw_run.placement
    gc.collect()

    token = config.token()
    body, headers = infer_request(inputs, datatypes, args.binary, token)
    timeout_s = model_cfg.timeout_s + 30.0

    # 2.-4. The real server.
    server = _server_for(args, config, target, token)
    conn: HttpConnection | None = None
    try:
        conn, address, idle_rss = _open_server(server, target.name, timeout_s, quiet)

        request = build_request("POST", f"/v2/models/{target.name}/infer", *address, body, headers)
        status, head, reply = conn.exchange(request)
        if status != 200:
            raise BenchError(f"the server answered {status}: {_error_text(reply)}")
        raw_length = _header(head, b"Inference-Header-Content-Length")
        check_outputs(expected, decode_infer_body(reply, int(raw_length) if raw_length else None))
        if args.binary and raw_length is None:
            raise BenchError("the server did not answer in binary although asked to")

        _say(quiet, f"timing HTTP round trips ({args.warmup} + {args.requests}) ...")
        time_http(conn, request, args.warmup, 0)
        cpu_before = _cpu_seconds(server.pid)
        http = Latency.of(time_http(conn, request, 0, args.requests))
        cpu_after = _cpu_seconds(server.pid)
        cpu_us = None
        if cpu_before is not None and cpu_after is not None:
            cpu_us = (cpu_after - cpu_before) * 1e6 / args.requests
        # The same server and connection without a model: HTTP and the middleware alone.
        live = build_request("GET", "/v2/health/live", *address, b"", {})
        floor = Latency.of(time_http(conn, live, args.warmup, args.requests))
        conn.close()
        conn = None
        mqtt: Latency | None = None
        if getattr(args, "mqtt", None):
            from .bench_mqtt import time_mqtt

            _say(quiet, f"timing MQTT round trips through {args.mqtt} ...")
            json_body, _ = encode_infer_body(inputs, datatypes, False)
            mqtt = Latency.of(
                time_mqtt(
                    args.mqtt,
                    _mqtt_device(),
                    target.name,
                    json_body,
                    args.warmup,
                    args.requests,
                    timeout_s,
                )
            )

        concurrency = min(args.concurrency, args.requests)
        _say(quiet, f"timing throughput at concurrency {concurrency} ...")
        samples, wall_s = time_concurrent(
            address,
            request,
            concurrency,
            math.ceil(args.warmup / concurrency),
            args.requests,
            timeout_s,
        )
        loaded = Latency.of(samples)
        server.alive_or_raise()
        after_rss, peak_rss = _rss_and_peak(server.pid)
    finally:
        if conn is not None:
            conn.close()
        server.stop(config.server.shutdown_timeout_s + STOP_GRACE_S)

    def r(x: float | None, digits: int = 2) -> float | None:
        return None if x is None else round(x, digits)

    figures: dict[str, Any] = {
        "model": target.name,
        "model_file": str(target.file),
        "backend": target.source.manifest.backend,
        "device": placement.device,
        "runtime_detail": placement.detail,
        "inputs": [
            {"name": n, "datatype": datatype_of(a), "shape": list(a.shape)}
            for n, a in inputs.items()
        ],
        "encoding": "binary" if args.binary else "json",
        "request_bytes": len(body),
        "response_bytes": len(reply),
        "cpu_count": os.cpu_count(),
        "requests": args.requests,
        "warmup": args.warmup,
        "raw_p50_us": r(raw.p50_us),
        "raw_p99_us": r(raw.p99_us),
        "raw_mean_us": r(raw.mean_us),
        "raw_paced_p50_us": r(paced.p50_us),
        "raw_paced_p99_us": r(paced.p99_us),
        "raw_paced_mean_us": r(paced.mean_us),
        "http_floor_p50_us": r(floor.p50_us),
        "http_floor_p99_us": r(floor.p99_us),
        "http_floor_mean_us": r(floor.mean_us),
        "mqtt_p50_us": r(mqtt.p50_us) if mqtt else None,
        "mqtt_p99_us": r(mqtt.p99_us) if mqtt else None,
        "mqtt_mean_us": r(mqtt.mean_us) if mqtt else None,
        "http_p50_us": r(http.p50_us),
        "http_p99_us": r(http.p99_us),
        "http_mean_us": r(http.mean_us),
        "overhead_p50_us": r(http.p50_us - raw.p50_us),
        "overhead_p99_us": r(http.p99_us - raw.p99_us),
        "overhead_mean_us": r(http.mean_us - raw.mean_us),
        "overhead_vs_paced_p50_us": r(http.p50_us - paced.p50_us),
        "overhead_vs_paced_p99_us": r(http.p99_us - paced.p99_us),
        "overhead_vs_paced_mean_us": r(http.mean_us - paced.mean_us),
        "server_cpu_us_per_request": r(cpu_us, 1),
        "concurrency": concurrency,
        "throughput_rps": r(len(samples) / wall_s, 1),
        "throughput_p50_us": r(loaded.p50_us),
        "throughput_p99_us": r(loaded.p99_us),
        "throughput_mean_us": r(loaded.mean_us),
        "server_idle_rss_mib": r(idle_rss, 1),
        "server_after_rss_mib": r(after_rss, 1),
        "server_peak_rss_mib": r(peak_rss, 1),
    }
    _emit(figures, args.json, format_table)
    return 0


def _emit(figures: dict[str, Any], as_json: bool, table: Callable[[dict[str, Any]], str]) -> None:
    if as_json:
        import orjson

        sys.stdout.write(orjson.dumps(figures).decode() + "\n")
    else:
        sys.stdout.write(table(figures))
    sys.stdout.flush()


def format_table(f: dict[str, Any]) -> str:
    """The figures for a person: raw, HTTP and their difference in one table."""

    def num(x: Any, fmt: str = ",.1f") -> str:
        return "n/a" if x is None else format(x, fmt)

    shapes = ", ".join(f"{i['name']}:{i['datatype']}{i['shape']}" for i in f["inputs"])
    rows = [
        ("raw runtime call", "raw"),
        ("  with idle gaps", "raw_paced"),
        ("HTTP /v2/health/live", "http_floor"),
        ("HTTP infer round trip", "http"),
        ("added by the appliance", "overhead"),
        ("  vs raw with idle gaps", "overhead_vs_paced"),
    ]
    lines = [
        f"model    {f['model']} ({f['model_file']}), {f['backend']} on {f['device']} "
        f"({f['runtime_detail']})",
        f"inputs   {shapes}",
        f"body     {f['encoding']}: request {f['request_bytes']} B, response "
        f"{f['response_bytes']} B",
        f"machine  {f['cpu_count']} CPUs; {f['requests']} timed requests after "
        f"{f['warmup']} warm-up",
        "",
        f"{'latency (µs)':<26}{'p50':>10}{'p99':>10}{'mean':>10}",
    ]
    if f.get("mqtt_p50_us") is not None:
        rows.append(("MQTT round trip (QoS 1)", "mqtt"))
    for label, key in rows:
        lines.append(
            f"{label:<26}{num(f[key + '_p50_us']):>10}{num(f[key + '_p99_us']):>10}"
            f"{num(f[key + '_mean_us']):>10}"
        )
    lines.append(
        f"{'server CPU per request':<26}{num(f['server_cpu_us_per_request']):>10}"
        "   (user+system, all threads, sequential run)"
    )
    lines += [
        "",
        f"throughput at concurrency {f['concurrency']}: {num(f['throughput_rps'], ',.0f')} req/s "
        f"(p50 {num(f['throughput_p50_us'])} µs, p99 {num(f['throughput_p99_us'])} µs)",
        f"server RSS: idle {num(f['server_idle_rss_mib'])} MiB, after the run "
        f"{num(f['server_after_rss_mib'])} MiB (peak {num(f['server_peak_rss_mib'])} MiB)",
    ]
    return "\n".join(lines) + "\n"
