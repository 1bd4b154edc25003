"""The simulator's device engine: one process's share of `appliance hub simulate`'s devices.

Run by the coordinator (hub/simulate.py) as `python -m appliance.hub.simworker SPEC` per
`--workers`: it reads its devices, sources and schedule from the JSON file SPEC, answers
`ready` on stdout, waits for the start time (CLOCK_MONOTONIC, shared by every process on the
machine) on stdin, runs its devices, writes its counts and latency samples next to SPEC and
answers `done`.

Why not aiohttp's client: at 100,000 devices the load generator, not the hub, was the limit
(one aiohttp event loop at 0.64 cores for 200 req/s). Here each keep-alive connection is a bare
asyncio protocol: requests are pre-encoded bytes (a device's Authorization and If-None-Match
lines kept as bytes, telemetry events encoded once when they are made), and an answer is parsed
only as far as the figures need: the status line, ETag, Content-Length and Connection. The
answers are still checked: a poll is a 304 or a 200 whose body is JSON, a telemetry answer is
JSON with the stored count, a download's length and sha256 match the signed targets entry.
HTTP/1.1 only, no chunked bodies (the hub and nginx send Content-Length): anything else is
counted as an error, never guessed at.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import os
import sys
import time
from array import array
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import orjson

MODEL_NAME = "sim-model"
MAX_BATCH = 500
_mono = time.monotonic


class ProtocolError(Exception):
    """An answer this client does not take (no Content-Length, a bad status line)."""


class _Conn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection: one request at a time, its answer parsed sparsely."""

    def __init__(self, pool: _Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes, bytes, bool]] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.closed = False
        self.uses = 0
        self.need = -1
        self.body_at = 0
        self.status = 0
        self.etag = b""
        self.keep = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, data: bytes, timeout_s: float) -> asyncio.Future[tuple[int, bytes, bytes, bool]]:
        loop = self.pool.loop
        fut: asyncio.Future[tuple[int, bytes, bytes, bool]] = loop.create_future()
        self.waiter = fut
        self.uses += 1
        self.timer = loop.call_later(timeout_s, self._timed_out)
        assert self.transport is not None
        self.transport.write(data)
        return fut

    def _finish(self, exc: BaseException | None, result: Any = None) -> None:
        fut, self.waiter = self.waiter, None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.buf.clear()
        self.need = -1
        if fut is not None and not fut.done():
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(result)

    def _timed_out(self) -> None:
        self.timer = None
        self._finish(TimeoutError("no answer in time"))
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if self.waiter is None:  # bytes nobody asked for: the connection is unusable
            self._fail(ProtocolError("unsolicited bytes"))
            return
        if self.need < 0:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end])
            low = head.lower()
            if not low.startswith(b"http/1.1 ") or b"\r\ntransfer-encoding:" in low:
                self._fail(ProtocolError(f"unexpected answer head {head[:40]!r}"))
                return
            try:
                self.status = int(head[9:12])
                length = _header(head, low, b"\r\ncontent-length:")
                self.need = end + 4 + (int(length) if length else 0)
            except ValueError:
                self._fail(ProtocolError(f"bad status line or length {head[:60]!r}"))
                return
            self.etag = _header(head, low, b"\r\netag:")
            self.keep = b"\r\nconnection: close" not in low
            self.body_at = end + 4
        if len(buf) < self.need:
            return
        if len(buf) > self.need:
            self._fail(ProtocolError("bytes after the answer"))
            return
        self._finish(None, (self.status, self.etag, bytes(buf[self.body_at :]), self.keep))

    def _fail(self, exc: BaseException) -> None:
        self._finish(exc)
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._finish(ConnectionResetError("connection closed before the answer"))
        self.pool.lost()


def _header(head: bytes, low: bytes, name: bytes) -> bytes:
    i = low.find(name)
    if i < 0:
        return b""
    j = head.find(b"\r\n", i + 2)
    return head[i + len(name) : j if j >= 0 else len(head)].strip()


class _Pool:
    """Keep-alive connections from one source address to one server, at most `limit`."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, host: str, port: int, source: str, limit: int
    ) -> None:
        self.loop = loop
        self.host, self.port, self.source, self.limit = host, port, source, limit
        self.idle: list[_Conn] = []
        self.count = 0
        self.waiters: collections.deque[asyncio.Future[_Conn | None]] = collections.deque()

    async def acquire(self) -> _Conn:
        while True:
            while self.idle:
                conn = self.idle.pop()
                if not conn.closed:
                    return conn
            if self.count < self.limit:
                self.count += 1
                try:
                    _, conn = await self.loop.create_connection(
                        lambda: _Conn(self), self.host, self.port, local_addr=(self.source, 0)
                    )
                except BaseException:
                    self.count -= 1
                    self._wake(None)
                    raise
                return conn
            fut: asyncio.Future[_Conn | None] = self.loop.create_future()
            self.waiters.append(fut)
            got = await fut
            if got is not None and not got.closed:
                return got

    def _wake(self, conn: _Conn | None) -> bool:
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(conn)
                return True
        return False

    def release(self, conn: _Conn, reusable: bool) -> None:
        if reusable and not conn.closed:
            if not self._wake(conn):
                self.idle.append(conn)
        elif conn.transport is not None and not conn.closed:
            conn.transport.close()  # connection_lost frees its place

    def lost(self) -> None:
        self.count -= 1
        self._wake(None)

    def close(self) -> None:
        for conn in self.idle:
            if conn.transport is not None:
                conn.transport.close()
        self.idle.clear()


class _Dev:
    __slots__ = ("active", "auth", "busy", "index", "inm", "mirror", "pending", "pool", "seq")

    def __init__(self, index: int, pool: _Pool, mirror: _Pool, auth: bytes) -> None:
        self.index = index  # in the whole fleet
        self.pool = pool
        self.mirror = mirror
        self.auth = auth
        self.inm = b""
        self.seq = 0
        self.pending: list[bytes] = []
        self.active = ""
        self.busy = False


class Worker:
    """One process's devices, their schedule and counters."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.timeout_s = float(spec["timeout_s"])
        self.polls_at, self.polls_lat = array("d"), array("d")
        self.ups_at, self.ups_lat = array("d"), array("d")
        self.reached, self.late = array("d"), array("d")
        self.status = {"200": 0, "304": 0}
        self.errors: dict[str, int] = {}
        self.events_sent = self.events_acked = self.events_duplicate = 0
        self.downloads = self.verified = self.full_tuf_verified = 0
        self.requests = 0
        self._signed: dict[str, asyncio.Future[tuple[str, int, str] | None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._second = 0
        self._now = b""
        self.tmp = Path(spec["tmp"])

    def _error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1

    def _time(self) -> bytes:
        sec = int(time.time())
        if sec != self._second:
            self._second = sec
            self._now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(sec)).encode()
        return self._now

    async def _exchange(self, pool: _Pool, data: bytes) -> tuple[int, bytes, bytes]:
        """One request on a pooled connection; a kept-alive connection the server closed
        meanwhile is retried once on a new one (the hub drops duplicate telemetry by seq).
        The timeout counts from the call, the wait for a free connection included: a device
        that gave up sends nothing, so an overloaded hub is not fed requests nobody awaits."""
        deadline = _mono() + self.timeout_s
        for attempt in (0, 1):
            conn = await pool.acquire()
            left = deadline - _mono()
            if left <= 0:
                pool.release(conn, True)
                raise TimeoutError("no free connection in time")
            reused = conn.uses > 0
            try:
                status, etag, body, keep = await conn.send(data, left)
            except ConnectionResetError:
                pool.release(conn, False)
                if reused and attempt == 0:
                    continue
                raise
            except BaseException:
                pool.release(conn, False)
                raise
            pool.release(conn, keep)
            self.requests += 1
            return status, etag, body
        raise AssertionError("unreachable")

    # one device's turn: poll, maybe download, upload telemetry
    async def _turn(self, dev: _Dev) -> None:
        try:
            await self._poll(dev)
            n = self.spec["telemetry_per_poll"]
            if n:
                now = self._time()
                for _ in range(n):
                    dev.seq += 1
                    dev.pending.append(
                        b'{"seq":%d,"time":"%s","kind":"sim","data":{"n":%d}}'
                        % (dev.seq, now, dev.seq)
                    )
                self.events_sent += n
            if dev.pending:
                await self._upload(dev)
        finally:
            dev.busy = False

    async def _poll(self, dev: _Dev) -> None:
        t0 = _mono()
        try:
            status, etag, body = await self._exchange(
                dev.pool, self.poll_head + dev.auth + dev.inm + b"\r\n"
            )
        except (OSError, TimeoutError, ProtocolError) as exc:
            self._error(f"poll: {type(exc).__name__}")
            return
        t1 = _mono()
        self.polls_at.append(t1)
        self.polls_lat.append(t1 - t0)
        if status == 304:
            self.status["304"] += 1
            return
        if status != 200:
            self._error(f"poll: HTTP {status}")
            return
        try:
            doc = orjson.loads(body)
            models = doc["models"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            self._error("poll: a 200 without the assignments document")
            return
        self.status["200"] += 1
        dev.inm = b"If-None-Match: " + etag + b"\r\n" if etag else b""
        for m in models:
            if m.get("name") == MODEL_NAME and m.get("version") != dev.active:
                await self._download(dev, str(m["version"]), str(m["target"]))

    async def _download(self, dev: _Dev, version: str, target: str) -> None:
        """Fetch the target from the mirror and verify it against the signed targets entry
        (or, for the fleet's first `full_tuf` devices, run the device's own TUF client)."""
        if dev.index < self.spec["full_tuf"]:
            ok = await asyncio.to_thread(self._full_tuf, dev, target)
            if not ok:
                return
            self.full_tuf_verified += 1
        else:
            signed = await self._signed_entry(target)
            if signed is None:
                return
            path, length, sha256 = signed
            try:
                status, _, data = await self._exchange(
                    dev.mirror, b"GET %s HTTP/1.1\r\n%s\r\n" % (path.encode(), self.mirror_head)
                )
            except (OSError, TimeoutError, ProtocolError) as exc:
                self._error(f"download: {type(exc).__name__}")
                return
            self.downloads += 1
            if status != 200:
                self._error(f"download: HTTP {status}")
                return
            if len(data) != length or hashlib.sha256(data).hexdigest() != sha256:
                self._error("verify: length or sha256 differs from the signed entry")
                return
        self.verified += 1
        dev.active = version
        self.reached.append(_mono())
        dev.seq += 1
        self.events_sent += 1
        dev.pending.append(
            b'{"seq":%d,"time":"%s","kind":"activated","data":{"model":"%s","version":"%s"}}'
            % (dev.seq, self._time(), MODEL_NAME.encode(), version.encode())
        )

    def _tuf(self, name: str, index: int) -> Any:
        from ..sync.tuf_client import TufClient

        spec = self.spec
        work = self.tmp / name
        mirror = spec.get("mirror")
        return TufClient(
            spec["urls"][0],
            spec["tokens"][0] if name == "verifier" else spec["tokens"][index],
            spec["ids"][0] if name == "verifier" else spec["ids"][index],
            Path(spec["root_file"]),
            work / "metadata",
            work / "downloads",
            self.timeout_s,
            1 << 30,
            [mirror] if mirror else (),
        )

    def _prove(self, client: Any, target: str) -> Any:
        """The target's signed entry; a mirror a moment behind the hub (its export runs every
        second) is asked again, up to the request timeout."""
        from ..sync.tuf_client import SyncError

        deadline = _mono() + self.timeout_s
        while True:
            try:
                info = client.refresh([target]).get_targetinfo(target)
            except SyncError as exc:
                self._error(f"tuf: {exc.reason[:80]}")
                return None
            if info is not None or _mono() > deadline:
                if info is None:
                    self._error("tuf: the assigned target is not in the signed metadata")
                return info
            time.sleep(0.2)

    def _full_tuf(self, dev: _Dev, target: str) -> bool:
        from ..sync.tuf_client import SyncError

        local = (dev.index - self.spec["index"]) // self.spec["workers"]
        client = self._tuf(f"device-{dev.index}", local)
        info = self._prove(client, target)
        if info is None:
            return False
        try:
            client.download(info, lambda _have, _total: None)
        except SyncError as exc:
            self._error(f"full-tuf: {type(exc).__name__}: {exc.reason[:80]}")
            return False
        self.downloads += 1
        return True

    def _signed_entry(self, target: str) -> asyncio.Future[tuple[str, int, str] | None]:
        """(mirror path, length, sha256) of a target, proved once per process by the device's
        TUF client over the mirror; the devices of this process share it."""
        fut = self._signed.get(target)
        if fut is None:
            fut = asyncio.ensure_future(asyncio.to_thread(self._entry, target))
            self._signed[target] = fut
            fut.add_done_callback(
                lambda f: self._signed.pop(target, None) if f.result() is None else None
            )
        return fut

    def _entry(self, target: str) -> tuple[str, int, str] | None:
        info = self._prove(self._tuf("verifier", 0), target)
        if info is None:
            return None
        sha256 = info.hashes["sha256"]
        name, version, base = target.split("/")
        path = f"/{quote(name)}/{quote(version)}/{sha256}.{quote(base)}"
        prefix = "/targets" if self.spec.get("mirror") else "/tuf/targets"
        return prefix + path, int(info.length), str(sha256)

    async def _upload(self, dev: _Dev) -> None:
        batch = dev.pending[:MAX_BATCH]
        body = b'{"events":[' + b",".join(batch) + b"]}"
        t0 = _mono()
        try:
            status, _, answer = await self._exchange(
                dev.pool,
                b"%s%sContent-Length: %d\r\n\r\n%s" % (self.tel_head, dev.auth, len(body), body),
            )
        except (OSError, TimeoutError, ProtocolError) as exc:
            self._error(f"telemetry: {type(exc).__name__}")
            return  # kept in `pending`: sent again next turn, as the device's outbox does
        t1 = _mono()
        if status != 200:
            self._error(f"telemetry: HTTP {status}")
            return
        try:
            doc = orjson.loads(answer)
            stored, duplicates = int(doc["stored"]), int(doc.get("duplicates", 0))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            self._error("telemetry: a 200 without the stored count")
            return
        self.ups_at.append(t1)
        self.ups_lat.append(t1 - t0)
        self.events_acked += stored
        self.events_duplicate += duplicates
        del dev.pending[: len(batch)]

    # the schedule
    def _devices(self, loop: asyncio.AbstractEventLoop) -> tuple[list[_Dev], list[_Pool]]:
        spec = self.spec
        urls, sources = spec["urls"], spec["sources"]
        mirror = spec.get("mirror")
        per_pool = max(1, spec["connections"] // (len(sources) * len(urls)))
        pools: dict[tuple[str, str], _Pool] = {}
        for url in [*urls, *([mirror] if mirror else [])]:
            parts = urlsplit(url)
            for src in sources:
                pools[url, src] = _Pool(
                    loop, parts.hostname or "127.0.0.1", parts.port or 80, src, per_pool
                )
        host = urlsplit(urls[0]).netloc.encode()
        self.poll_head = b"GET /api/v1/device/assignments HTTP/1.1\r\nHost: %s\r\n" % host
        self.tel_head = (
            b"POST /api/v1/device/telemetry HTTP/1.1\r\nHost: %s\r\n"
            b"Content-Type: application/json\r\n" % host
        )
        mirror_host = urlsplit(mirror or urls[0]).netloc.encode()
        devs = []
        for local, (index, token) in enumerate(zip(spec["indices"], spec["tokens"], strict=True)):
            src = sources[local % len(sources)]
            url = urls[index % len(urls)]
            auth = b"Authorization: Bearer %s\r\n" % token.encode()
            pool = pools[url, src]
            devs.append(_Dev(index, pool, pools[mirror, src] if mirror else pool, auth))
        # the hub's own /tuf needs the token; an untrusted mirror gets none
        self.mirror_head = b"Host: %s\r\n" % mirror_host
        if not mirror:
            self.mirror_head += b"Authorization: Bearer %s\r\n" % spec["tokens"][0].encode()
        return devs, list(pools.values())

    async def run(self, start: float) -> None:
        spec = self.spec
        loop = asyncio.get_running_loop()
        devs, pools = self._devices(loop)
        total, workers, me = spec["devices_total"], spec["workers"], spec["index"]
        step = spec["poll_interval_s"] / total
        end = start + spec["duration_s"]
        n = len(devs)
        launched = skipped = 0
        try:
            while n:
                now = _mono()
                if now >= end:
                    break
                while True:
                    cycle, local = divmod(launched, n)
                    due = start + (cycle * total + me + local * workers) * step
                    if due > now or due >= end:
                        break
                    dev = devs[local]
                    launched += 1
                    if dev.busy:  # its last turn is still running: a device polls one at a time
                        skipped += 1
                        continue
                    dev.busy = True
                    self.late.append(now - due)
                    task = loop.create_task(self._turn(dev))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                cycle, local = divmod(launched, n)
                nxt = start + (cycle * total + me + local * workers) * step
                # at least 1 ms: uvloop's timers count whole milliseconds (a shorter sleep
                # would spin), so a turn starts at most about 1 ms late (counted in `late`)
                await asyncio.sleep(min(0.005, max(0.001, nxt - _mono())))
            self.finished_cpu = _own_cpu()
            if self._tasks:  # a turn is a poll, a download and an upload, each bounded
                await asyncio.wait(set(self._tasks), timeout=3 * self.timeout_s + 10)
            # anything still pending is sent now (a device's outbox empties eventually); a
            # device whose turn still runs keeps its outbox (counted as unsent)
            retries = [d for d in devs if d.pending and not d.busy]
            for _ in range(5):
                if not retries:
                    break
                await asyncio.gather(*(self._upload(d) for d in retries))
                retries = [d for d in devs if d.pending and not d.busy]
        finally:
            for pool in pools:
                pool.close()
        self.launched, self.skipped = launched, skipped
        self.unsent = sum(len(d.pending) for d in devs)

    def write(self, out: Path) -> None:
        """Counts as JSON, samples as raw float64 files beside it (no pickle)."""
        for name in ("polls_at", "polls_lat", "ups_at", "ups_lat", "reached", "late"):
            with (out.parent / f"{out.name}.{name}.f64").open("wb") as f:
                getattr(self, name).tofile(f)
        counts = {
            "pid": os.getpid(),
            "devices": len(self.spec["indices"]),
            "status": self.status,
            "errors": self.errors,
            "events_sent": self.events_sent,
            "events_acked": self.events_acked,
            "duplicates": self.events_duplicate,
            "downloads": self.downloads,
            "verified": self.verified,
            "full_tuf_verified": self.full_tuf_verified,
            "launched": self.launched,
            "skipped": self.skipped,
            "unsent": self.unsent,
            "requests": self.requests,
            "cpu_s": round(_own_cpu(), 3),
            "cpu_user_s": round(os.times().user, 3),
            "cpu_s_schedule": round(self.finished_cpu, 3),
        }
        out.write_bytes(orjson.dumps(counts))


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system


def read_samples(out: Path, name: str) -> array[float]:
    samples = array("d")
    samples.frombytes((out.parent / f"{out.name}.{name}.f64").read_bytes())
    return samples


async def _main(spec_path: Path) -> int:
    spec = orjson.loads(spec_path.read_bytes())
    worker = Worker(spec)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    line = await reader.readline()
    if not line.strip():
        return 1  # the coordinator went away
    await worker.run(float(line))
    worker.write(Path(spec["out"]))
    sys.stdout.write("done\n")
    sys.stdout.flush()
    return 0


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m appliance.hub.simworker SPEC.json", file=sys.stderr)
        return 2
    try:
        import uvloop
    except ImportError:  # a plain asyncio loop works too, at a higher CPU per request
        return asyncio.run(_main(Path(argv[0])))
    return uvloop.run(_main(Path(argv[0])))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
