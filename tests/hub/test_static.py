"""The static mirror directory (appliance/hub/static.py): a consistent snapshot of the hub's TUF
repository in the consistent-snapshot layout, written atomically and kept current by `hub serve`."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient, TestServer
from tuf.api.metadata import Metadata

from appliance.hub.repository import KEEP_VERSIONS
from appliance.hub.server import build_app
from appliance.hub.service import Hub, HubConfig, init_hub
from appliance.hub.static import export_static
from tests.conftest import ROOT


def _hub(tmp_path: Path) -> Hub:
    config = HubConfig(data_dir=tmp_path / "data")
    init_hub(config, tmp_path / "root-key")
    return Hub(config)


def _files(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()}


def _version(path: Path) -> int:
    return int(Metadata.from_bytes(path.read_bytes()).signed.version)


def test_export_is_the_consistent_snapshot_layout_and_only_writes_what_changed(
    tmp_path: Path, samples: Path
) -> None:
    hub = _hub(tmp_path)
    model = samples / "sample.onnx"
    sha = hashlib.sha256(model.read_bytes()).hexdigest()
    hub.publish("sample", "1", model)
    out = tmp_path / "static"

    first = export_static(hub.store, hub.artifacts, out)
    target = f"targets/sample/1/{sha}.model.onnx"
    assert _files(out) == {
        ".export.lock",
        "metadata/1.root.json",
        "metadata/2.targets.json",
        "metadata/2.snapshot.json",
        "metadata/timestamp.json",
        target,
    }
    assert (first.timestamp_version, first.snapshot_version, first.targets_version) == (2, 2, 2)
    assert first.written[-1] == "metadata/timestamp.json", "timestamp is written last"
    assert (out / target).read_bytes() == model.read_bytes()
    assert (out / "metadata/1.root.json").read_bytes() == hub.repo.root_bytes(1)
    root = Metadata.from_bytes((out / "metadata/1.root.json").read_bytes())
    assert root.signed.consistent_snapshot is True, "the layout clients expect from this root"
    for f in _files(out) - {".export.lock"}:
        assert (out / f).stat().st_mode & 0o777 == 0o644, f  # an unprivileged server reads it

    assert export_static(hub.store, hub.artifacts, out).written == [], "nothing changed"

    hub.publish("sample", "2", model)
    second = export_static(hub.store, hub.artifacts, out)
    assert second.written == [
        f"targets/sample/2/{sha}.model.onnx",
        "metadata/3.targets.json",
        "metadata/3.snapshot.json",
        "metadata/timestamp.json",
    ]
    assert _version(out / "metadata/timestamp.json") == 3
    assert not [f for f in _files(out) if ".tmp" in f], "no temporary file left behind"

    # Rotating a key adds a root version (devices walk the chain) and re-signs below it.
    hub.repo.rotate("targets", tmp_path / "root-key")
    third = export_static(hub.store, hub.artifacts, out)
    assert "metadata/2.root.json" in third.written and third.root_version == 2
    hub.close()


def test_old_versions_leave_with_the_hubs_window_and_roots_stay(
    tmp_path: Path, samples: Path
) -> None:
    hub = _hub(tmp_path)
    out = tmp_path / "static"
    for v in range(1, KEEP_VERSIONS + 3):
        hub.publish("sample", str(v), samples / "sample.onnx")
        export_static(hub.store, hub.artifacts, out)
    hub.repo.rotate("snapshot", tmp_path / "root-key")
    export_static(hub.store, hub.artifacts, out)
    names = {p.name for p in (out / "metadata").iterdir()}
    newest = _version(out / "metadata/timestamp.json")
    snapshots = sorted(int(n.split(".")[0]) for n in names if n.endswith(".snapshot.json"))
    assert snapshots == list(range(newest - KEEP_VERSIONS + 1, newest + 1))
    assert {"1.root.json", "2.root.json"} <= names
    # Each version the store still holds is on the mirror, byte for byte.
    for n in names - {"timestamp.json"}:
        version, role, _ = n.split(".")
        assert hub.store.metadata(role, int(version)) == (out / "metadata" / n).read_bytes()
    assert len(list((out / "targets" / "sample").iterdir())) == KEEP_VERSIONS + 2
    hub.close()


def test_export_static_command(tmp_path: Path, samples: Path) -> None:
    _hub(tmp_path).close()
    py = [sys.executable, "-m", "appliance", "hub"]
    data = ["--data", str(tmp_path / "data")]
    subprocess.run([*py, "publish", "sample", str(samples / "sample.onnx"), "--version", "1",
                    *data], check=True, capture_output=True, cwd=ROOT)  # fmt: skip
    out = subprocess.run(
        [*py, "export-static", str(tmp_path / "static"), *data],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert "timestamp 2, snapshot 2, targets 2, root 1; 5 files written" in out.stdout
    assert _version(tmp_path / "static/metadata/timestamp.json") == 2


async def test_serving_hub_keeps_the_directory_current(tmp_path: Path, samples: Path) -> None:
    """Changes the server did not make (a CLI publish on the data dir, as another process
    would) reach the directory too: the writer follows the store's versions."""
    hub = _hub(tmp_path)
    out = tmp_path / "static"
    app = build_app(hub, resign=False, static_dir=out, static_interval_s=0.05)
    client: TestClient[Any, Any] = TestClient(TestServer(app))
    await client.start_server()
    try:
        stamp = out / "metadata/timestamp.json"
        for _ in range(200):
            if stamp.exists():
                break
            await asyncio.sleep(0.05)
        assert _version(stamp) == 1
        other = Hub(HubConfig(data_dir=tmp_path / "data"))  # the CLI's own connection
        await asyncio.to_thread(other.publish, "sample", "1", samples / "sample.onnx")
        other.close()
        for _ in range(200):
            if _version(stamp) == 2:
                break
            await asyncio.sleep(0.05)
        assert _version(stamp) == 2
        assert list((out / "targets/sample/1").iterdir())
    finally:
        await client.close()
        hub.close()
