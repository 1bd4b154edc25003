"""sd_notify without libsystemd: readiness after the models load, watchdog pings from the serving
loop, STOPPING=1 on shutdown, and nothing at all outside systemd. A real AF_UNIX datagram socket
plays systemd's part."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance import backends, systemd
from appliance.engine import ModelSource
from appliance.manifest import Manifest
from appliance.registry import Registry
from appliance.server import sources_from_store
from tests.conftest import start_server_process, stop_server_process
from tests.support.gated import SIGNATURE, GatedBackend

TIMEOUT = 30.0  # generous: only ever reached when something is broken


class Listener:
    """systemd's end of $NOTIFY_SOCKET: collects every datagram, one list of lines each."""

    def __init__(self, sock: socket.socket, env_value: str) -> None:
        self.sock = sock
        self.env_value = env_value
        self.messages: list[list[str]] = []

    def lines(self) -> list[str]:
        return [line for message in self.messages for line in message]

    def count(self, line: str) -> int:
        return sum(message.count(line) for message in self.messages)

    def drain(self) -> int:
        """Read whatever is queued right now, without waiting; returns how many datagrams."""
        n = 0
        while True:
            try:
                data = self.sock.recv(4096, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return n
            self.messages.append(data.decode().split("\n"))
            n += 1

    def wait_sync(self, line: str, count: int = 1, timeout: float = TIMEOUT) -> None:
        """Block (a test thread, not a loop) until `line` was received `count` times."""
        deadline = time.monotonic() + timeout
        while self.count(line) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"never got {line!r} x{count}; got {self.messages}")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.messages.append(data.decode().split("\n"))

    async def wait(self, line: str, count: int = 1, timeout: float = TIMEOUT) -> None:
        """Await (the test's loop keeps running) until `line` was received `count` times."""
        deadline = time.monotonic() + timeout
        while self.count(line) < count:
            self.drain()
            if self.count(line) >= count:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"never got {line!r} x{count}; got {self.messages}")
            await asyncio.sleep(0.01)


def _short_dir(tmp_path: Path) -> Iterator[Path]:
    # AF_UNIX paths are limited to 107 bytes; pytest's tmp_path can be longer.
    if len(str(tmp_path / "notify.sock")) < 100:
        yield tmp_path
        return
    with tempfile.TemporaryDirectory(prefix="sdn-") as d:
        yield Path(d)


@pytest.fixture
def path_listener(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Listener]:
    """A datagram socket bound to a file, named by NOTIFY_SOCKET; no watchdog by default."""
    for d in _short_dir(tmp_path):
        path = d / "notify.sock"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        monkeypatch.delenv("WATCHDOG_USEC", raising=False)
        monkeypatch.delenv("WATCHDOG_PID", raising=False)
        try:
            yield Listener(sock, str(path))
        finally:
            sock.close()


@pytest.fixture
def abstract_listener(monkeypatch: pytest.MonkeyPatch) -> Iterator[Listener]:
    """The same in Linux's abstract namespace: NOTIFY_SOCKET=@name, no file."""
    name = f"appliance-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    try:
        yield Listener(sock, "@" + name)
    finally:
        sock.close()


class LoadGatedBackend(GatedBackend):
    """Loading blocks (in the engine's loader thread) until the test opens `load_gate`."""

    name = "load_gated"
    load_gate = threading.Event()

    def __init__(self, manifest: Any, path: Path, context: Any) -> None:
        if not type(self).load_gate.wait(TIMEOUT):
            raise RuntimeError("load gate never opened")
        super().__init__(manifest, path, context)


@pytest.fixture
def load_gated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[list[ModelSource]]:
    monkeypatch.setitem(backends._BACKENDS, "load_gated", "tests.test_systemd:LoadGatedBackend")
    LoadGatedBackend.load_gate = threading.Event()
    f = tmp_path / "gated.bin"
    f.write_bytes(b"")
    manifest = Manifest("gated", "1", "load_gated", f.name, "", 0, SIGNATURE, "", "test")
    yield [ModelSource(manifest, f, verify=False)]
    LoadGatedBackend.load_gate.set()


# -- the notifier on its own ------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_notify_sends_one_datagram_per_call(kind: str, request: pytest.FixtureRequest) -> None:
    listener: Listener = request.getfixturevalue(f"{kind}_listener")
    assert systemd.notify("READY=1", "STATUS=hello") is True
    notifier = systemd.Notifier.from_env()
    assert notifier.enabled
    assert notifier.notify("WATCHDOG=1")
    notifier.close()
    listener.wait_sync("WATCHDOG=1")
    assert listener.messages == [["READY=1", "STATUS=hello"], ["WATCHDOG=1"]]


def test_without_notify_socket_nothing_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not systemd.Notifier.from_env().enabled
    assert systemd.notify("READY=1") is False
    assert not systemd.Notifier("").enabled


def test_a_failed_send_is_logged_once_and_never_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = systemd.Notifier(str(tmp_path / "nobody-listens.sock"))
    with caplog.at_level(logging.WARNING, logger="appliance.systemd"):
        assert notifier.notify("READY=1") is False
        assert notifier.notify("WATCHDOG=1") is False
    notifier.close()
    warnings = [r for r in caplog.records if r.name == "appliance.systemd"]
    assert len(warnings) == 1
    assert "nobody-listens.sock" in warnings[0].getMessage()


def test_unsupported_notify_socket_is_disabled_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="appliance.systemd"):
        notifier = systemd.Notifier("vsock:2:1234")
    assert not notifier.enabled
    assert notifier.notify("READY=1") is False
    assert "vsock:2:1234" in caplog.text


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "100000"}, 0.05),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "100000", "WATCHDOG_PID": "4242"}, 0.05),
        ({"WATCHDOG_USEC": "100000", "WATCHDOG_PID": "4243"}, None),  # watches another process
        ({"WATCHDOG_USEC": "100000", "WATCHDOG_PID": "x"}, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec(
    env: dict[str, str], expected: float | None
) -> None:
    assert systemd.watchdog_interval(env, pid=4242) == expected


def test_watchdog_pid_defaults_to_this_process() -> None:
    env = {"WATCHDOG_USEC": "100000", "WATCHDOG_PID": str(os.getpid())}
    assert systemd.watchdog_interval(env) == 0.05


def test_address_formatting() -> None:
    assert systemd.format_address("127.0.0.1", 8080) == "127.0.0.1:8080"
    assert systemd.format_address("::1", 9000) == "[::1]:9000"


# -- the running server -----------------------------------------------------------------------
async def test_ready_only_after_every_model_loaded(
    serve: Any, store: Registry, load_gated: list[ModelSource], path_listener: Listener
) -> None:
    sources = sources_from_store(store.root) + load_gated
    client = await serve(sources=sources, wait=False)
    await path_listener.wait("STATUS=loading 5 model(s)")
    # The last model cannot finish loading: no READY=1 can have been sent, and readiness agrees.
    r = await client.get("/v2/health/ready")
    assert r.status == 503
    path_listener.drain()
    assert "READY=1" not in path_listener.lines()
    assert (await client.get("/v2/health/live")).status == 200  # startup was not held up

    LoadGatedBackend.load_gate.set()
    await path_listener.wait("READY=1")
    ready = next(m for m in path_listener.messages if "READY=1" in m)
    assert any(re.fullmatch(r"STATUS=serving 5 model\(s\) on 127\.0\.0\.1:\d+", s) for s in ready)
    r = await client.get("/v2/health/ready")
    assert r.status == 200
    assert path_listener.count("READY=1") == 1


async def test_failed_models_are_counted_in_the_status(
    serve: Any, store: Registry, tmp_path: Path, path_listener: Listener
) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    manifest = Manifest("broken", "1", "onnx", broken.name, "", 0, SIGNATURE, "", "test")
    sources = [*sources_from_store(store.root), ModelSource(manifest, broken, verify=False)]
    await serve(sources=sources)
    await path_listener.wait("READY=1")  # the server is up; /v2/health/ready reports the failure
    assert any(
        re.fullmatch(r"STATUS=serving 4 model\(s\) on .*\(1 failed to load\)", line)
        for line in path_listener.lines()
    )


async def test_watchdog_pings_come_from_the_serving_loop(
    serve: Any, path_listener: Listener, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "100000")  # a ping every 50 ms
    client = await serve()
    await path_listener.wait("READY=1")
    await path_listener.wait("WATCHDOG=1", count=2)

    # Block the loop that serves requests (as a runaway synchronous call would): every datagram
    # sent so far is already queued on the socket (AF_UNIX delivery is synchronous), and no ping
    # can be sent until the loop runs again, however many intervals pass.
    path_listener.drain()
    time.sleep(0.3)
    assert path_listener.drain() == 0
    before = path_listener.count("WATCHDOG=1")
    await path_listener.wait("WATCHDOG=1", count=before + 2)  # they resume with the loop
    assert (await client.get("/v2/health/live")).status == 200


async def test_no_pings_for_a_watchdog_meant_for_another_process(
    serve: Any, path_listener: Listener, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "100000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    await serve()
    await path_listener.wait("READY=1")
    # With a watchdog the first ping precedes everything else (its task starts first).
    assert "WATCHDOG=1" not in path_listener.lines()


async def test_stopping_on_shutdown_and_tasks_cancelled(
    serve: Any, abstract_listener: Listener, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "100000")
    client = await serve()
    app = client.server.app
    await abstract_listener.wait("READY=1")
    await client.close()  # runs on_shutdown and the cleanup contexts
    abstract_listener.drain()
    assert abstract_listener.count("STOPPING=1") == 1  # once, though both hooks ask for it
    service = app[systemd._SERVICE]
    assert service.tasks and all(t.done() for t in service.tasks)
    lines = abstract_listener.lines()
    assert lines.index("READY=1") < lines.index("STOPPING=1")


async def test_stopping_while_models_load_sends_no_ready(
    serve: Any, load_gated: list[ModelSource], path_listener: Listener
) -> None:
    client = await serve(sources=load_gated, wait=False)
    await path_listener.wait("STATUS=loading 1 model(s)")
    await client.close()  # cancels the loader; its thread stays parked on the gate
    LoadGatedBackend.load_gate.set()
    path_listener.drain()
    assert path_listener.count("STOPPING=1") == 1
    lines = path_listener.lines()
    assert "READY=1" not in lines[: lines.index("STOPPING=1")]


async def test_nothing_happens_without_notify_socket(
    serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "100000")
    client = await serve()
    assert systemd._SERVICE not in client.server.app
    assert (await client.get("/v2/health/ready")).status == 200


# -- the real command -------------------------------------------------------------------------
def test_appliance_serve_notifies_systemd(store: Registry, path_listener: Listener) -> None:
    # Read the socket while the server starts, as systemd does: the kernel queues only a few
    # datagrams (net.unix.max_dgram_qlen, 10) and the watchdog pings while the models load.
    ready = threading.Thread(target=path_listener.wait_sync, args=("READY=1",), daemon=True)
    ready.start()
    server = start_server_process(
        ["--models", str(store.root)],
        env={"NOTIFY_SOCKET": path_listener.env_value, "WATCHDOG_USEC": "200000"},
    )
    try:
        ready.join()
        path_listener.wait_sync("READY=1")
        assert f"STATUS=serving 4 model(s) on 127.0.0.1:{server.port}" in path_listener.lines()
        path_listener.wait_sync("WATCHDOG=1", count=2)
    finally:
        code = stop_server_process(server)
    path_listener.wait_sync("STOPPING=1")
    assert code == 0
    lines = path_listener.lines()
    assert lines.index("READY=1") < lines.index("STOPPING=1")
