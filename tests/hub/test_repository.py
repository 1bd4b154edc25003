"""The served TUF repository, checked by a real tuf.ngclient.Updater over loopback HTTP."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from pathlib import Path

import pytest
from tuf.api.exceptions import ExpiredMetadataError
from tuf.api.metadata import Metadata, Root, Snapshot, Targets, Timestamp

from appliance.hub.repository import Expiry, utcnow
from appliance.hub.service import decode_custom

from .conftest import HubEnv


def _versions(env: HubEnv) -> dict[str, int]:
    out = {}
    for role in ("root", "targets", "snapshot", "timestamp"):
        found = env.hub.store.latest_metadata(role)
        assert found is not None
        out[role] = found[0]
    return out


async def test_updater_verifies_and_downloads_a_published_model(
    env: HubEnv, samples: Path, tmp_path: Path
) -> None:
    token = await env.enroll("dev1")
    status, body = await env.publish(
        "sample",
        "1",
        samples / "sample.onnx",
        acceptance=json.dumps([{"inputs": [], "outputs": []}]),
    )
    assert status == 201, body
    assert body["target"] == "sample/1/model.onnx"

    updater = env.updater(token, tmp_path / "device")
    await asyncio.to_thread(updater.refresh)
    info = await asyncio.to_thread(updater.get_targetinfo, "sample/1/model.onnx")
    assert info is not None
    assert info.length == (samples / "sample.onnx").stat().st_size
    assert isinstance(info.custom["appliance"]["acceptance"], str)  # canonical JSON: no floats
    custom = decode_custom(info.custom)
    assert custom["name"] == "sample" and custom["version"] == "1" and custom["backend"] == "onnx"
    assert [t["name"] for t in custom["manifest"]["inputs"]]  # read from the model itself
    assert custom["acceptance"] == [{"inputs": [], "outputs": [], "rtol": 1e-4, "atol": 1e-5}]
    path = await asyncio.to_thread(updater.download_target, info)
    assert Path(path).read_bytes() == (samples / "sample.onnx").read_bytes()
    # A version TUF does not list is refused by the device: there is no target info for it.
    assert await asyncio.to_thread(updater.get_targetinfo, "sample/2/model.onnx") is None


async def test_names_up_to_the_device_limit_are_published_and_downloaded(
    env: HubEnv, samples: Path, tmp_path: Path
) -> None:
    """The hub takes every name the device serves (appliance/names.py: 128 characters)."""
    token = await env.enroll("dev1")
    model = samples / "sample.onnx"
    for name, version in (("m" * 100, "1"), ("n" * 128, "v" * 128)):
        status, body = await env.publish(name, version, model)
        assert status == 201, body
        updater = env.updater(token, tmp_path / "device")  # one refresh per updater
        await asyncio.to_thread(updater.refresh)
        info = await asyncio.to_thread(updater.get_targetinfo, f"{name}/{version}/model.onnx")
        assert info is not None
        # The sync agent names downloads by their hash: the quoted target path would be too
        # long a file name (272 characters) for ngclient's default.
        out = tmp_path / f"{len(name)}.onnx"
        await asyncio.to_thread(updater.download_target, info, str(out))
        assert out.read_bytes() == model.read_bytes()
    for name, version in (("m" * 129, "1"), ("m", "v" * 129)):
        status, body = await env.publish(name, version, model)
        assert status == 400 and "use 1-128 letters" in body["error"], body
        assert "(it has 129 characters)" in body["error"]


async def test_every_publish_bumps_targets_snapshot_and_timestamp(
    env: HubEnv, samples: Path, tmp_path: Path
) -> None:
    token = await env.enroll("dev1")
    before = _versions(env)
    assert before == {"root": 1, "targets": 1, "snapshot": 1, "timestamp": 1}
    await env.publish("sample", "1", samples / "sample.onnx")
    await env.publish("sample", "2", samples / "fp16.onnx")
    after = _versions(env)
    assert after == {"root": 1, "targets": 3, "snapshot": 3, "timestamp": 3}
    # Consistent snapshots: every version stays readable by its number.
    for v in (1, 2, 3):
        resp = await env.client.get(f"/tuf/metadata/{v}.targets.json", headers=env.bearer(token))
        assert resp.status == 200
        assert Metadata[Targets].from_bytes(await resp.read()).signed.version == v
    updater = env.updater(token, tmp_path / "device")
    await asyncio.to_thread(updater.refresh)
    for name in ("1", "2"):
        assert await asyncio.to_thread(updater.get_targetinfo, f"sample/{name}/model.onnx")


async def test_expired_timestamp_is_refused_by_the_client(
    hub_factory: object, samples: Path, tmp_path: Path
) -> None:
    # A lifetime of minus one hour signs metadata that is already expired: no clock games.
    env: HubEnv = await hub_factory(  # type: ignore[operator]
        resign=False, expiry=Expiry(timestamp=-3600.0)
    )
    token = await env.enroll("dev1")
    await env.publish("sample", "1", samples / "sample.onnx")
    updater = env.updater(token, tmp_path / "device")
    with pytest.raises(ExpiredMetadataError):
        await asyncio.to_thread(updater.refresh)


async def test_refresh_resigns_roles_in_the_second_half_of_their_life(env: HubEnv) -> None:
    repo = env.hub.repo
    now = utcnow()
    assert repo.refresh(now) == []
    assert repo.refresh(now + dt.timedelta(hours=11)) == []
    assert repo.refresh(now + dt.timedelta(hours=13)) == ["timestamp"]
    assert _versions(env)["timestamp"] == 2
    # Snapshot's 7 days: past 3.5 days both snapshot and timestamp are re-signed.
    later = now + dt.timedelta(days=4)
    assert repo.refresh(later) == ["snapshot", "timestamp"]
    v = _versions(env)
    assert (v["snapshot"], v["timestamp"]) == (2, 3)
    ts = Metadata[Timestamp].from_bytes(env.hub.store.latest_metadata("timestamp")[1])  # type: ignore[index]
    assert ts.signed.snapshot_meta.version == 2
    assert ts.signed.expires == later + dt.timedelta(days=1)


async def test_background_task_resigns_a_timestamp_nearing_expiry(
    hub_factory: object,
) -> None:
    # Initialised with a 1-day timestamp; served with a 3-day lifetime, the current timestamp
    # is past half of that life, so the background task must re-sign it at once.
    first: HubEnv = await hub_factory(resign=False)  # type: ignore[operator]
    assert _versions(first)["timestamp"] == 1
    env: HubEnv = await hub_factory(  # type: ignore[operator]
        refresh_s=0.05, expiry=Expiry(timestamp=3 * 86400.0)
    )
    for _ in range(200):
        if _versions(env)["timestamp"] > 1:
            break
        await asyncio.sleep(0.05)
    assert _versions(env)["timestamp"] == 2
    ts = Metadata[Timestamp].from_bytes(env.hub.store.latest_metadata("timestamp")[1])  # type: ignore[index]
    assert ts.signed.expires - utcnow() > dt.timedelta(days=2)


async def test_key_rotation_is_followed_by_a_device_holding_the_old_root(
    env: HubEnv, samples: Path, tmp_path: Path
) -> None:
    token = await env.enroll("dev1")
    await env.publish("sample", "1", samples / "sample.onnx")
    device = tmp_path / "device"
    await asyncio.to_thread(env.updater(token, device).refresh)  # trusts root v1 and its keys

    assert env.hub.repo.rotate("timestamp", env.root_key_dir) == 2
    assert env.hub.repo.rotate("targets", env.root_key_dir) == 3
    assert env.hub.repo.rotate("root", env.root_key_dir) == 4
    assert list(env.root_key_dir.glob("root.pem.retired-*"))
    await env.publish("sample", "2", samples / "fp16.onnx")

    updater = env.updater(token, device)  # same metadata dir: walks root 1 -> 4
    await asyncio.to_thread(updater.refresh)
    assert await asyncio.to_thread(updater.get_targetinfo, "sample/2/model.onnx")
    local_root = Metadata[Root].from_file(str(device / "metadata" / "root.json"))
    assert local_root.signed.version == 4

    # A device bootstrapped from 1.root.json only still reaches the new keys.
    fresh = env.updater(token, tmp_path / "fresh")
    await asyncio.to_thread(fresh.refresh)
    assert await asyncio.to_thread(fresh.get_targetinfo, "sample/1/model.onnx")


async def test_rotation_refuses_a_key_that_is_not_the_root_key(env: HubEnv, tmp_path: Path) -> None:
    from appliance.errors import ConfigError
    from appliance.hub.repository import write_private

    other = tmp_path / "other"
    write_private(other / "root.pem", (env.hub.config.key_dir / "targets.pem").read_bytes())
    with pytest.raises(ConfigError, match="not the hub's current root key"):
        env.hub.repo.rotate("snapshot", other)
    assert _versions(env)["root"] == 1


async def test_metadata_routes_serve_exactly_what_ngclient_asks_for(env: HubEnv) -> None:
    token = await env.enroll("dev1")
    h = env.bearer(token)
    for path, status in (
        ("/tuf/metadata/1.root.json", 200),
        ("/tuf/metadata/2.root.json", 404),
        ("/tuf/metadata/timestamp.json", 200),
        ("/tuf/metadata/1.snapshot.json", 200),
        ("/tuf/metadata/1.targets.json", 200),
        ("/tuf/metadata/0.targets.json", 404),
        ("/tuf/metadata/1.timestamp.json", 404),
        ("/tuf/metadata/..%2Fhub.db", 404),
    ):
        resp = await env.client.get(path, headers=h)
        assert resp.status == status, path
    resp = await env.client.get("/tuf/metadata/1.snapshot.json", headers=h)
    snap = Metadata[Snapshot].from_bytes(await resp.read())
    assert snap.signed.meta["targets.json"].version == 1
    root = Metadata[Root].from_bytes(env.root_json)
    assert root.signed.consistent_snapshot is True
    assert root.signed.expires - utcnow() > dt.timedelta(days=364)


async def test_a_running_hub_signs_with_a_key_rotated_by_another_process(
    env: HubEnv, samples: Path, tmp_path: Path
) -> None:
    from appliance.hub.service import Hub

    token = await env.enroll("dev1")
    await env.publish("sample", "1", samples / "sample.onnx")  # the server caches its keys
    operator = Hub(env.hub.config)  # what `appliance hub rotate-key` opens
    try:
        operator.repo.rotate("targets", env.root_key_dir)
        operator.repo.rotate("snapshot", env.root_key_dir)
    finally:
        operator.close()
    status, _ = await env.publish("sample", "2", samples / "fp16.onnx")
    assert status == 201
    updater = env.updater(token, tmp_path / "device")
    await asyncio.to_thread(updater.refresh)
    assert await asyncio.to_thread(updater.get_targetinfo, "sample/2/model.onnx")
    assert not list(env.hub.config.key_dir.glob("*.new"))
    assert len(list(env.hub.config.key_dir.glob("targets.pem.retired-*"))) == 1


async def test_root_nearing_expiry_is_reported(
    env: HubEnv, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("WARNING", logger="appliance.hub.tuf"):
        env.hub.repo.refresh(utcnow() + dt.timedelta(days=200))
        assert not [r for r in caplog.records if "root metadata expires" in r.getMessage()]
        env.hub.repo.refresh(utcnow() + dt.timedelta(days=350))
    (record,) = [r for r in caplog.records if "root metadata expires" in r.getMessage()]
    assert "rotate-key root" in record.getMessage()


async def test_old_metadata_versions_are_pruned_but_root_is_kept(
    env: HubEnv, samples: Path, tmp_path: Path
) -> None:
    from appliance.hub.repository import KEEP_VERSIONS

    token = await env.enroll("dev1")
    env.hub.repo.rotate("timestamp", env.root_key_dir)
    for v in range(1, KEEP_VERSIONS + 3):
        env.hub.publish("sample", str(v), samples / "sample.onnx")
    latest = _versions(env)["targets"]
    assert latest == KEEP_VERSIONS + 3
    h = env.bearer(token)
    old = await env.client.get(f"/tuf/metadata/{latest - KEEP_VERSIONS}.targets.json", headers=h)
    assert old.status == 404
    kept = await env.client.get(
        f"/tuf/metadata/{latest - KEEP_VERSIONS + 1}.targets.json", headers=h
    )
    assert kept.status == 200
    for v in (1, 2):
        resp = await env.client.get(f"/tuf/metadata/{v}.root.json", headers=h)
        assert resp.status == 200
    updater = env.updater(token, tmp_path / "device")  # from 1.root.json, as a new device
    await asyncio.to_thread(updater.refresh)
    assert await asyncio.to_thread(updater.get_targetinfo, "sample/1/model.onnx")
