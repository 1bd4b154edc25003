"""The hub's two interfaces: HubStore on SQLite and on a real PostgreSQL, and LocalArtifacts."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from appliance.errors import ConfigError, NotFound
from appliance.hub.artifacts import ArtifactStore, LocalArtifacts
from appliance.hub.errors import Conflict
from appliance.hub.storage import Device, Event, HubStore, open_store
from tests.support.postgres import PostgresServer

OpenStore = Callable[[], HubStore]


@pytest.fixture
def open_hub_store(tmp_path: Path, hub_database: str | None) -> Iterator[OpenStore]:
    """Opens stores (one per replica or CLI) on this test's one database; closes them all."""
    database = hub_database or str(tmp_path / "hub.db")
    opened: list[HubStore] = []

    def make() -> HubStore:
        opened.append(open_store(database, migrate=True))
        return opened[-1]

    yield make
    for store in opened:
        store.close()  # a second close is harmless on both stores


def test_a_failed_transaction_leaves_nothing(open_hub_store: OpenStore) -> None:
    store = open_hub_store()
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


def test_two_connections_share_one_database(open_hub_store: OpenStore) -> None:
    """The serving hub and a CLI on the same data directory (or two replicas)."""
    server, cli = open_hub_store(), open_hub_store()
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


def test_concurrent_replicas_store_each_event_exactly_once(open_hub_store: OpenStore) -> None:
    """Two stores (replicas), four threads each, every batch sent twice and overlapping its
    neighbour (a device retrying through another replica): each device ends with seq 1..N, no
    gap, no duplicate, and each event is reported new exactly once."""
    stores = [open_hub_store(), open_hub_store()]
    for d in range(3):
        stores[0].add_device(Device(f"dev{d}", "g", f"h{d}", "t", None))
    n, batch = 120, 10
    new_counts: dict[str, int] = {f"dev{d}": 0 for d in range(3)}
    lock = threading.Lock()
    received = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")

    def writer(w: int) -> None:
        store = stores[w % 2]
        for start in range(1 + (w % 3) * 3, n + 1, batch // 2):
            for d in range(3):
                events = [
                    Event(f"dev{d}", s, "t", "k", {"s": s}, received)
                    for s in range(start, min(start + batch, n + 1))
                ]
                with store.transaction(f"device/dev{d}"):
                    fresh = store.add_events(events)
                with lock:
                    new_counts[f"dev{d}"] += len(fresh)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for d in range(3):
        seqs = [e.seq for e in stores[1].events(f"dev{d}", 0, 10 * n)]
        assert seqs == list(range(1, n + 1))
        assert new_counts[f"dev{d}"] == n
    assert stores[0].count_events() == 3 * n


@pytest.fixture
def pg_url(postgres_server: PostgresServer) -> str:
    return postgres_server.new_database()


def test_migrations_are_versioned_and_required(pg_url: str) -> None:
    from appliance.hub.migrations import LATEST
    from appliance.hub.pgstore import PostgresStore, migrate

    with pytest.raises(ConfigError, match="hub init"):
        PostgresStore(pg_url)
    assert migrate(pg_url) == list(range(1, LATEST + 1))
    assert migrate(pg_url) == []  # applied once
    PostgresStore(pg_url).close()
    import psycopg

    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO schema_migrations (version, name) VALUES (%s, 'future')", (LATEST + 1,)
        )
    with pytest.raises(ConfigError, match="newer than this hub"):
        migrate(pg_url)
    with pytest.raises(ConfigError, match=f"schema version {LATEST + 1}"):
        PostgresStore(pg_url)


def test_events_are_partitioned_by_day_and_expired_by_retention(pg_url: str) -> None:
    from appliance.hub.pgstore import PostgresStore

    store = PostgresStore(pg_url, apply_migrations=True, retention_days=3)
    try:
        now = dt.datetime.now(dt.timezone.utc)
        today = now.date()
        made = store.event_partitions()
        assert today - dt.timedelta(days=1) in made and today + dt.timedelta(days=3) in made

        def at(days_ago: int) -> str:
            return (now - dt.timedelta(days=days_ago)).isoformat(timespec="seconds")

        # Ten days ago has no partition yet: the insert creates it.
        assert len(store.add_events([Event("d", 1, "t", "k", {}, at(10))])) == 1
        assert today - dt.timedelta(days=10) in store.event_partitions()
        # A retry received on another day (another partition) is still a duplicate.
        assert store.add_events([Event("d", 1, "t", "k", {}, at(0))]) == []
        assert len(store.add_events([Event("d", 2, "t", "k", {}, at(0))])) == 1
        store.maintain(now)
        assert today - dt.timedelta(days=10) not in store.event_partitions()
        assert [e.seq for e in store.events("d", 0, 10)] == [2]
    finally:
        store.close()


def test_one_leader_at_a_time_and_a_takeover_when_it_dies(pg_url: str) -> None:
    from appliance.hub.pgstore import PostgresStore

    a = PostgresStore(pg_url, apply_migrations=True)
    b = PostgresStore(pg_url)
    try:
        assert a.is_leader() and a.is_leader()
        assert not b.is_leader()
        a.close()  # its session ends: the lock is released
        assert b.is_leader()
        c = PostgresStore(pg_url)
        assert not c.is_leader()
        c.close()
    finally:
        b.close()


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
