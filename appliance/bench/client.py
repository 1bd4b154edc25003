"""A minimal HTTP/1.1 client on blocking sockets: the bench's load generator.

Requests are encoded once (`build_request`) and sent as is on every iteration, and responses
are read with no HTTP library, so that the client's own cost stays out of the latency figures.
"""

from __future__ import annotations

import contextlib
import socket

from .errors import BenchError


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
        #: Bytes received past the last response read (the start of the next one).
        self.pending = b""

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def recv(self) -> bytes:
        """The next bytes from the server, at least one."""
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
        buf = self.pending
        while (end := buf.find(b"\r\n\r\n")) < 0:
            buf += self.recv()
        head = buf[:end]
        try:
            status = int(head[9:12])
        except ValueError:
            raise BenchError(f"malformed HTTP response: {head[:80]!r}") from None
        length = content_length(head)
        need = end + 4 + length
        if len(buf) < need:
            parts, have = [buf], len(buf)
            while have < need:
                chunk = self.recv()
                parts.append(chunk)
                have += len(chunk)
            buf = b"".join(parts)
        self.pending = buf[need:]
        return status, head, buf[end + 4 : need]


def content_length(head: bytes) -> int:
    lower = head.lower()
    i = lower.find(b"\r\ncontent-length:")
    if i < 0:
        if b"\r\ntransfer-encoding:" in lower:
            raise BenchError("the server sent a chunked response, which bench does not read")
        return 0
    start = i + len(b"\r\ncontent-length:")
    stop = lower.find(b"\r\n", start)
    return int(lower[start : stop if stop >= 0 else len(lower)])


def header(head: bytes, name: bytes) -> bytes | None:
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


def error_text(body: bytes) -> str:
    import orjson

    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body[:300].decode("utf-8", "replace")
    if isinstance(obj, dict) and isinstance(obj.get("error"), str):
        return str(obj["error"])
    return body[:300].decode("utf-8", "replace")


def metrics_text(address: tuple[str, int], token: str) -> str:
    """The server's /metrics page (Prometheus text), on a fresh connection: the server closes
    idle keep-alives, and a load generator's connections are busy."""
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    conn = HttpConnection(*address, 30.0)
    try:
        status, _, body = conn.exchange(build_request("GET", "/metrics", *address, b"", auth))
    finally:
        conn.close()
    if status != 200:
        raise BenchError(f"/metrics answered {status}: {error_text(body)}")
    return body.decode()


def free_port() -> int:
    """A port free on 127.0.0.1 now (another program may take it before it is bound again)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port
