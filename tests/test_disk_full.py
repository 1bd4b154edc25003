"""A full disk (a real tmpfs of a few MiB, filled to the last byte) during `models add`, an
activation, outbox writes, a hub publish and a sync download: nothing half-written is ever
active or left behind, the error says the disk is full, the outbox reports what it dropped,
serving goes on, and everything works again once space returns."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.registry import ACTIVE_NAME, Registry
from appliance.sync.outbox import Outbox
from tests.conftest import ROOT
from tests.support.smallfs import SmallFs, small_fs
from tests.sync.conftest import (
    Fleet,
    Hub,
    infer,
    kinds,
    serving_version,
    sync_status,
    variant,
    wait_for,
)

REQ = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}


@pytest.fixture
def fs(tmp_path: Path) -> Iterator[SmallFs]:
    with small_fs(tmp_path / "small", "8m") as mounted:
        yield mounted


@pytest.fixture
def store(fs: SmallFs, samples: Path) -> Registry:
    """The model store on the small filesystem (the `serve` fixture serves this one)."""
    registry = Registry(fs.path / "models")
    registry.add("sample", samples / "sample.onnx")
    return registry


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob(".*") if p.name != ".filler")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


def test_models_add_on_a_full_disk_changes_nothing(
    fs: SmallFs, store: Registry, samples: Path
) -> None:
    fs.fill()
    out = cli("models", "add", "sample", str(samples / "sample.onnx"), "--models", str(store.root))
    assert out.returncode == 1, out.stderr
    assert "no space left on the device" in out.stderr and "Traceback" not in out.stderr
    assert "nothing was changed" in out.stderr
    assert store.versions("sample") == ["1"] and store.entry("sample").active == "1"
    assert leftovers(store.root) == []  # no staging directory, no temp file
    fs.free()
    out = cli("models", "add", "sample", str(samples / "sample.onnx"), "--models", str(store.root))
    assert out.returncode == 0, out.stderr
    assert store.entry("sample").active == "2"


async def test_an_activation_on_a_full_disk_is_507_and_serving_goes_on(
    serve, fs: SmallFs, store: Registry, samples: Path
) -> None:
    store.add("sample", samples / "sample.onnx", activate=False)  # version 2, not active
    client = await serve()
    fs.fill()
    r = await client.post(
        "/v2/repository/models/sample/load", json={"parameters": {"version": "2"}}
    )
    assert r.status == 507
    assert "no space left on the device" in (await r.json())["error"]
    # What is recorded stays whole: ACTIVE names version 1 (a restart serves it).
    assert (store.root / "sample" / ACTIVE_NAME).read_text().split() == ["1"]
    assert leftovers(store.root) == []
    for _ in range(3):
        r = await client.post("/v2/models/sample/infer", json=REQ)
        assert r.status == 200
    assert (await client.get("/v2/health/ready")).status == 200
    fs.free()
    r = await client.post(
        "/v2/repository/models/sample/load", json={"parameters": {"version": "2"}}
    )
    assert r.status == 200
    assert (store.root / "sample" / ACTIVE_NAME).read_text().split() == ["2", "1"]


def test_the_outbox_on_a_full_disk_drops_and_reports_it(fs: SmallFs) -> None:
    box = Outbox(fs.path / "outbox.sqlite", 1 << 20)
    for i in range(5):
        box.append("e", {"i": i})
    fs.fill()
    assert [box.append("e", {"i": 100 + i, "pad": "x" * 4096}) for i in range(20)] == [0] * 20
    assert box.dropped == 20 and box.depth == 5  # nothing raised; the loss is counted
    fs.free()
    seq = box.append("e", {"i": 999})
    events = box.batch(100)
    assert [e.kind for e in events] == ["e"] * 5 + ["dropped", "e"]
    assert events[-2].data == {"count": 20, "reason": "disk_full"} and events[-1].seq == seq
    box.close()
    again = Outbox(fs.path / "outbox.sqlite", 1 << 20)
    assert again.dropped == 20  # counted on disk once it was written
    again.close()


def test_a_hub_publish_on_a_full_disk_is_507_and_publishes_nothing(
    tmp_path: Path, samples: Path
) -> None:
    with small_fs(tmp_path / "hubfs", "16m") as hubfs:
        hub = Hub(hubfs.path / "hub")
        hub.start()
        try:
            targets_before = hub.admin("GET", "/api/v1/admin/models")
            hubfs.fill()
            status, body = _publish(hub, samples / "sample.onnx", "1")
            assert status == 507 and "no space left" in body, body
            assert hub.admin("GET", "/api/v1/admin/models") == targets_before
            assert not list((hub.data / "artifacts").rglob("*.onnx"))
            assert hub.proc is not None and hub.proc.poll() is None
            hubfs.free()
            status, body = _publish(hub, samples / "sample.onnx", "1")
            assert status == 201, body
            assert not any("Traceback" in line for line in hub.lines)
        finally:
            hub.stop()


def _publish(hub: Hub, file: Path, version: str) -> tuple[int, str]:
    """POST /api/v1/admin/models (multipart), as `appliance hub publish --hub URL` does."""
    import urllib.error
    import urllib.request
    import uuid

    boundary = uuid.uuid4().hex
    parts = []
    for name, value in (("name", b"sample"), ("version", version.encode())):
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
            + value
            + b"\r\n"
        )
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
        f'filename="{file.name}"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode()
        + file.read_bytes()
        + b"\r\n"
    )
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    req = urllib.request.Request(
        hub.url + "/api/v1/admin/models",
        data=body,
        method="POST",
        headers={
            "Content-Type": f"multipart/form-data; boundary={boundary}",
            "Authorization": f"Bearer {hub.admin_token}",
        },
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_a_sync_download_on_a_full_disk_keeps_serving_and_resumes(
    tmp_path: Path, samples: Path
) -> None:
    big = variant(samples / "sample.onnx", tmp_path / "big.onnx", 2.0, 4 * 1024 * 1024)
    fleet = Fleet(tmp_path / "fleet", samples)
    try:
        with small_fs(tmp_path / "devfs", "12m") as devfs:
            store = devfs.path / "models"
            Registry(store).add("sample", samples / "sample.onnx", version="1")
            device = fleet.start_device("dev1", store)
            fleet.hub.publish("sample", big, "2", *fleet.manifest_args)
            wait_for("the first status", lambda: kinds(fleet.hub.events("dev1"), "status"))
            devfs.fill()
            fleet.hub.rollout("sample", "2", "dev1")

            def failed() -> bool:
                error = sync_status(device).get("last_error") or ""
                return "no room on disk" in error or None  # type: ignore[return-value]

            wait_for("the disk-full failure", failed)
            for _ in range(5):
                assert infer(device)["model_version"] == "1"
            assert Registry(store).versions("sample") == ["1"]
            assert not [p for p in (store / ".sync" / "downloads").glob("*") if p.is_file()]
            devfs.free()
            wait_for("version 2 once space returned", lambda: serving_version(device) == "2")
            # ACTIVE is written just after the switch: wait for it, not only for the answer
            wait_for("ACTIVE naming 2", lambda: Registry(store).entry("sample").active == "2")

            def reported() -> list[object]:
                events = kinds(fleet.hub.events("dev1"), "dropped")
                return [e for e in events if e["data"].get("reason") == "disk_full"]

            wait_for("the events lost to the full disk reported", reported)
            fleet.stop_device(device)
    finally:
        fleet.close()
