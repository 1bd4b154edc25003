"""The crashing backend plugin (tests/support/plugins) on this process's path and its children's."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.isolation.wire import Channel, Segment
from appliance.registry import Registry

PLUGINS = Path(__file__).resolve().parents[1] / "support" / "plugins"


def plugin_path() -> str:
    """PYTHONPATH for a process that should find the plugin as an installed package."""
    return os.pathsep.join(p for p in (str(PLUGINS), os.environ.get("PYTHONPATH", "")) if p)


@pytest.fixture
def plugin(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The plugin importable here (store.add inspects the file) and in worker processes."""
    monkeypatch.syspath_prepend(str(PLUGINS))
    monkeypatch.setenv("PYTHONPATH", plugin_path())
    yield


def add_crashy(store: Registry, tmp_path: Path, name: str, content: bytes = b"fine") -> None:
    f = tmp_path / f"{name}.bin"
    f.write_bytes(content)
    store.add(name, f, backend="crashy")


@pytest.fixture
def pair() -> Iterator[tuple[Channel, Channel]]:
    """Two connected ends of a channel: the server's (it makes the segment) and the worker's."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server, worker = Channel.create(ours), Channel(theirs, Segment.empty())
    yield server, worker
    server.close()
    worker.close()
