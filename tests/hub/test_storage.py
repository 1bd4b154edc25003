"""SQLiteStore and LocalArtifacts: the embedded implementations of the hub's two interfaces."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.errors import NotFound
from appliance.hub.artifacts import ArtifactStore, LocalArtifacts
from appliance.hub.errors import Conflict
from appliance.hub.storage import Device, Event, HubStore, SQLiteStore


def test_a_failed_transaction_leaves_nothing(tmp_path: Path) -> None:
    store: HubStore = SQLiteStore(tmp_path / "hub.db")
    try:
        with pytest.raises(RuntimeError), store.transaction():
            store.put_metadata("targets", 1, b"{}")
            with store.transaction():  # re-entrant in one thread
                store.put_metadata("targets", 2, b"{}")
            raise RuntimeError("signing failed")
        assert store.latest_metadata("targets") is None
        with pytest.raises(ValueError, match="never pruned"):
            store.prune_metadata("root", 5)
    finally:
        store.close()


def test_two_connections_share_one_database(tmp_path: Path) -> None:
    """The serving hub and a CLI on the same data directory."""
    server, cli = SQLiteStore(tmp_path / "hub.db"), SQLiteStore(tmp_path / "hub.db")
    try:
        cli.add_device(Device("dev1", "g", "h1", "t", None))
        assert server.device_by_token_hash("h1") is not None
        with pytest.raises(Conflict):
            server.add_device(Device("dev1", "g", "h2", "t", None))
        events = [Event("dev1", s, "t", "k", {"s": s}, "r") for s in (3, 1, 2)]
        assert len(server.add_events(events)) == 3
        assert cli.add_events(events[:2]) == []
        assert [e.seq for e in cli.events("dev1", 0, 10)] == [1, 2, 3]
        assert cli.max_seq("dev1") == 3 and cli.count_events() == 3
    finally:
        server.close()
        cli.close()


def test_local_artifacts_are_atomic_ranged_and_confined(tmp_path: Path) -> None:
    store: ArtifactStore = LocalArtifacts(tmp_path / "a")
    src = tmp_path / "src.bin"
    src.write_bytes(bytes(range(256)) * 10)
    key = "m/1/" + "a" * 64 + ".model.onnx"
    store.put_file(key, src)
    assert not src.exists()  # consumed
    assert store.size(key) == 2560
    assert b"".join(store.read(key, 250, 260, chunk=3)) == bytes(range(250, 256)) + bytes(range(4))
    assert not [p for p in (tmp_path / "a").rglob(".upload.*")]
    for bad in ("../x", "m/../../x", "/etc/passwd", "m//x", ".hidden"):
        assert store.size(bad) is None
        with pytest.raises(NotFound):
            store.put_file(bad, src)
    store.delete(key)
    assert store.size(key) is None
