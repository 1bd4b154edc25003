"""`appliance hub simulate` against a real spawned hub: its counts are exact."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.errors import InvalidInput
from appliance.hub.service import HubConfig, init_hub
from appliance.hub.simulate import (
    SimConfig,
    device_ids,
    parse_sources,
    run_spawned,
    seed_devices,
    split,
)
from appliance.hub.storage import SQLiteStore


@pytest.mark.parametrize(("store", "workers"), [("sqlite", 1), ("sqlite", 3), ("postgresql", 2)])
def test_fifty_devices_poll_upload_and_take_a_rollout(
    store: str, workers: int, request: pytest.FixtureRequest
) -> None:
    database = None
    if store == "postgresql":
        database = request.getfixturevalue("postgres_server").new_database()
    n = 50
    config = SimConfig(
        devices=n,
        poll_interval_s=1.0,
        duration_s=5.0,
        urls=("http://127.0.0.1",),
        admin_token="",
        telemetry_per_poll=2,
        sources=parse_sources("127.0.0.1-127.0.0.3"),
        rollout_at_s=1.5,
        full_tuf=2,
        workers=workers,
    )
    result = run_spawned(config, replicas=2 if database else 1, database=database)
    assert result["errors"] == {}
    status = result["status"]
    polls = sum(p["polls"] for p in result["phases"].values())
    turns = result["turns"]  # a turn still running when its next is due is skipped, counted
    assert status["200"] + status["304"] == polls == turns["launched"] - turns["skipped_busy"]
    # every device's first poll and its poll after the rollout get a body; the others a 304
    assert status["200"] == 2 * n
    assert status["304"] == polls - 2 * n > 0
    t = result["telemetry"]
    # two events per poll plus one "activated" per device, each stored exactly once
    assert t["events_sent"] == 2 * polls + n
    assert t["events_acked"] == t["stored_in_hub"] == t["events_sent"]
    assert t["duplicates"] == 0 and t["unsent_at_end"] == 0 and t["nothing_lost"]
    r = result["rollout"]
    # every device took the file from the nginx mirror (2 of them through the whole TUF path)
    assert r["mirror"].startswith("http://127.0.0.1:") and r["mirror"] not in result["config"]
    assert r["devices_reached"] == r["verified"] == r["downloads"] == n
    assert r["full_tuf_verified"] == 2 and r["all_s"] is not None
    assert result["hub_cpu"]["seconds_total"] > 0
    # the devices dealt among the workers, each one's CPU reported apart from the hub's
    sim = result["simulator"]["workers"]
    assert sorted(w["devices"] for w in sim) == sorted(
        len(range(i, n, workers)) for i in range(workers)
    )
    assert (
        sum(w["requests"] for w in sim)
        == polls + sum(p["uploads"] for p in result["phases"].values()) + n - 2
    )
    assert all(w["cpu_s"] > 0 for w in sim)
    assert {w["pid"] for w in sim}.isdisjoint(result["hub_cpu"]["pids"])


def test_split_deals_devices_and_sources() -> None:
    sources = ("127.0.0.1", "127.0.0.2", "127.0.0.3")
    assert split(5, 2, sources) == [
        ([0, 2, 4], ["127.0.0.1", "127.0.0.3"]),
        ([1, 3], ["127.0.0.2"]),
    ]
    # fewer sources than workers: every worker sends from all of them
    assert split(4, 2, sources[:1]) == [([0, 2], ["127.0.0.1"]), ([1, 3], ["127.0.0.1"])]


def test_seeding_writes_what_enroll_writes(tmp_path: Path) -> None:
    from appliance.hub.service import Hub, require_device

    config = HubConfig(data_dir=tmp_path / "hub")
    init_hub(config, tmp_path / "root-key")
    store = SQLiteStore(config.db_path)
    ids = device_ids("seed", 20)
    tokens = seed_devices(store, ids)
    hub = Hub(config, store)
    try:
        assert [d.device_id for d in store.devices()] == ids
        assert require_device(hub, tokens[7], ids[7]).device_id == ids[7]
    finally:
        hub.close()


def test_loopback_only_and_bounded() -> None:
    assert parse_sources("127.0.0.1-127.0.0.3,127.0.1.1") == (
        "127.0.0.1",
        "127.0.0.2",
        "127.0.0.3",
        "127.0.1.1",
    )
    with pytest.raises(InvalidInput, match="loopback"):
        parse_sources("10.0.0.1")
    base = {"poll_interval_s": 1.0, "duration_s": 5.0, "admin_token": ""}
    with pytest.raises(InvalidInput, match="not on loopback"):
        SimConfig(devices=1, urls=("http://192.0.2.1:8700",), **base).check()  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="--devices"):
        SimConfig(devices=0, urls=("http://127.0.0.1",), **base).check()  # type: ignore[arg-type]
