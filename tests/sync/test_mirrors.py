"""Static TUF mirrors served by the real nginx with packaging/nginx/mirror.conf: the headers it
promises, Range requests, and devices that take metadata and models from mirrors in order,
passing over a tampered mirror (a flipped byte in a model, then in metadata) and a dead one,
while the hub answers only assignments and telemetry."""

from __future__ import annotations

import json
import re
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import urllib3

from appliance.hub.service import Hub, HubConfig, init_hub
from appliance.hub.static import export_static
from appliance.sync.tuf_client import Refused, TufClient
from tests.support.nginx_static import Nginx, free_port, world_readable_dir
from tests.sync.conftest import Fleet, serving_version, sync_status, wait_for

IMMUTABLE = "public, max-age=31536000, immutable"


def flip(path: Path) -> None:
    """One byte changed in place (same length, same name): what a bad mirror or disk does."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def flip_signed(path: Path) -> None:
    """One hex digit of a signed sha256 changed: still valid JSON, so only the signature
    check can tell (a mirror pointing devices at another file)."""
    data = path.read_bytes()
    m = re.search(rb'"sha256":\s*"[0-9a-f]{63}([0-9a-f])"', data)
    assert m is not None, path
    swapped = b"0" if m.group(1) != b"0" else b"1"
    path.write_bytes(data[: m.start(1)] + swapped + data[m.end(1) :])


@pytest.fixture
def mirror_dirs() -> Iterator[list[Path]]:
    dirs = [world_readable_dir("mirror-a-"), world_readable_dir("mirror-c-")]
    yield dirs
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def nginx(tmp_path: Path, mirror_dirs: list[Path]) -> Iterator[Nginx]:
    server = Nginx(tmp_path / "nginx", mirror_dirs)
    server.start()
    yield server
    print(server.errors()[-3000:])
    server.stop()


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Hub]:
    config = HubConfig(data_dir=tmp_path / "data")
    init_hub(config, tmp_path / "root-key")
    h = Hub(config)
    yield h
    h.close()


def _target(d: Path, version: str) -> Path:
    (found,) = (d / "targets" / "sample" / version).iterdir()
    return found


def test_nginx_mirror_headers_and_ranges(
    hub: Hub, nginx: Nginx, mirror_dirs: list[Path], samples: Path
) -> None:
    model = (samples / "sample.onnx").read_bytes()
    hub.publish("sample", "1", samples / "sample.onnx")
    export_static(hub.store, hub.artifacts, mirror_dirs[0])
    target = _target(mirror_dirs[0], "1").relative_to(mirror_dirs[0])
    http = urllib3.PoolManager(retries=False)
    base = nginx.url(0)

    r = http.request("GET", f"{base}/metadata/timestamp.json")
    assert r.status == 200 and r.headers["Cache-Control"] == "no-cache"
    assert r.headers["Content-Type"] == "application/json"
    assert r.headers["Server"] == "nginx", "no version in the Server header"
    again = http.request(
        "GET", f"{base}/metadata/timestamp.json", headers={"If-None-Match": r.headers["ETag"]}
    )
    assert again.status == 304, "an unchanged timestamp costs a revalidation, not a body"

    for name in ("1.root.json", "2.snapshot.json", "2.targets.json"):
        r = http.request("GET", f"{base}/metadata/{name}")
        assert r.status == 200 and r.headers["Cache-Control"] == IMMUTABLE, name

    r = http.request("GET", f"{base}/{target}")
    assert r.status == 200 and r.data == model
    assert r.headers["Cache-Control"] == IMMUTABLE
    assert r.headers["Accept-Ranges"] == "bytes"
    assert r.headers["Content-Type"] == "application/octet-stream"

    r = http.request("GET", f"{base}/{target}", headers={"Range": "bytes=100-199"})
    assert r.status == 206 and r.data == model[100:200]
    assert r.headers["Content-Range"] == f"bytes 100-199/{len(model)}"
    r = http.request("GET", f"{base}/{target}", headers={"Range": f"bytes={len(model) - 10}-"})
    assert r.status == 206 and r.data == model[-10:]
    r = http.request("GET", f"{base}/{target}", headers={"Range": f"bytes={len(model)}-"})
    assert r.status == 416

    for path in ("/.export.lock", "/metadata/", "/targets/", "/", "/metadata/root.json"):
        assert http.request("GET", base + path).status == 404, path
    assert http.request("POST", f"{base}/metadata/timestamp.json").status == 405


def _client(hub: Hub, tmp_path: Path, mirrors: list[str]) -> TufClient:
    return TufClient(
        "http://127.0.0.1:9",  # the hub: never asked while mirrors are set
        "device-token-never-sent",
        "dev1",
        hub.config.data_dir / "1.root.json",
        tmp_path / "device" / "tuf",
        tmp_path / "device" / "downloads",
        5.0,
        1 << 30,
        mirrors,
    )


def test_client_falls_through_tampered_and_dead_mirrors_and_resumes_with_range(
    hub: Hub,
    nginx: Nginx,
    mirror_dirs: list[Path],
    samples: Path,
    variants: dict[str, Path],
    tmp_path: Path,
) -> None:
    bad, good = mirror_dirs
    mirrors = [nginx.url(0), f"http://127.0.0.1:{free_port()}", nginx.url(1)]
    hub.publish("sample", "1", samples / "sample.onnx")
    for d in mirror_dirs:
        export_static(hub.store, hub.artifacts, d)
    flip(_target(bad, "1"))

    # A flipped byte in a model: refused from the first mirror, the dead one is passed over,
    # the third serves it.
    client = _client(hub, tmp_path, mirrors)
    info = client.refresh().get_targetinfo("sample/1/model.onnx")
    assert info is not None
    path = client.download(info, lambda done, total: None)
    assert path.read_bytes() == (samples / "sample.onnx").read_bytes()
    assert client.served_by == {"metadata": mirrors[0], "target": mirrors[2]}
    assert client.fetches == {
        (mirrors[0], "metadata", "ok"): 1,
        (mirrors[0], "target", "refused"): 1,
        (mirrors[1], "target", "failed"): 1,
        (mirrors[2], "target", "ok"): 1,
    }

    # A flipped byte in metadata: the first mirror's targets.json is refused, the third's
    # verifies; the model then comes from the first mirror (its file is intact, and verified
    # against the good metadata), resuming a partial download with a Range request.
    hub.publish("sample", "2", variants["v2"])
    for d in mirror_dirs:
        export_static(hub.store, hub.artifacts, d)
    flip_signed(bad / "metadata" / "3.targets.json")
    client = _client(hub, tmp_path, mirrors)
    updater = client.refresh()
    assert client.served_by["metadata"] == mirrors[2]
    assert client.fetches[(mirrors[0], "metadata", "refused")] == 1
    assert client.fetches[(mirrors[1], "metadata", "failed")] == 1
    info = updater.get_targetinfo("sample/2/model.onnx")
    assert info is not None
    model = variants["v2"].read_bytes()
    client.partial_path(info).parent.mkdir(parents=True, exist_ok=True)
    cut = len(model) // 2
    client.partial_path(info).write_bytes(model[:cut])
    path = client.download(info, lambda done, total: None)
    assert path.read_bytes() == model
    assert client.served_by["target"] == mirrors[0]
    want = (f'{nginx.ports[0]} GET /{_target(bad, "2").relative_to(bad)} HTTP/1.1 206 '
            f'{len(model) - cut} "-" "bytes={cut}-"')  # fmt: skip
    wait_for("the ranged request in the access log", lambda: want in nginx.requests(), 5)
    assert [line for line in nginx.requests() if "/targets/sample/2/" in line] == [want]

    # Every mirror bad: refused, each mirror named in the reason.
    flip(_target(good, "2"))
    flip(_target(bad, "2"))
    client.discard(info)
    with pytest.raises(Refused) as refused:
        client.download(info, lambda done, total: None)
    for m in mirrors:
        assert m in refused.value.reason
    assert all(line.split(" ", 6)[6].startswith('"-" ') for line in nginx.requests()), "token"


def test_a_mirror_behind_the_hub_is_passed_over_for_one_that_lists_the_target(
    hub: Hub, nginx: Nginx, mirror_dirs: list[Path], samples: Path, tmp_path: Path
) -> None:
    """A LAN cache not yet synced serves valid but older metadata: the device asks the next
    mirror for the version it was assigned; once it trusts newer metadata, the old mirror's
    is a rollback and refused."""
    current = mirror_dirs[1]
    mirrors = [nginx.url(0), nginx.url(1)]
    hub.publish("sample", "1", samples / "sample.onnx")
    for d in mirror_dirs:
        export_static(hub.store, hub.artifacts, d)
    hub.publish("sample", "2", samples / "sample.onnx")
    export_static(hub.store, hub.artifacts, current)

    client = _client(hub, tmp_path, mirrors)
    updater = client.refresh(["sample/2/model.onnx"])
    assert updater.get_targetinfo("sample/2/model.onnx") is not None
    assert client.served_by["metadata"] == mirrors[1]
    assert client.fetches == {
        (mirrors[0], "metadata", "behind"): 1,
        (mirrors[1], "metadata", "ok"): 1,
    }
    # Nobody lists this one: the last mirror's verified metadata is used all the same.
    updater = client.refresh(["sample/9/model.onnx"])
    assert updater.get_targetinfo("sample/9/model.onnx") is None
    assert client.fetches[(mirrors[0], "metadata", "refused")] == 1  # older than trusted now
    assert client.served_by["metadata"] == mirrors[1]


def _metric(device_url: str, labels: str) -> float:
    with urllib.request.urlopen(f"http://{device_url}/metrics") as r:
        text = r.read().decode()
    m = re.search(rf"^appliance_sync_mirror_fetches_total\{{{labels}\}} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_device_rolls_out_through_nginx_mirrors(
    tmp_path: Path, samples: Path, variants: dict[str, Path], mirror_dirs: list[Path]
) -> None:
    """A real hub writing its static directory, a real nginx serving it and a tampered copy,
    a dead mirror between them, a real device: the rollout lands, the hub's /tuf/ is never
    used."""
    bad, good = mirror_dirs
    server = Nginx(tmp_path / "nginx", mirror_dirs)
    server.start()
    fleet: Fleet | None = None
    try:
        fleet = Fleet(tmp_path, samples, serve_args=["--static-dir", str(good),
                                                      "--static-interval", "0.1"])  # fmt: skip
        dead = f"http://127.0.0.1:{free_port()}"
        mirrors = [server.url(0), dead, server.url(1)]
        device = fleet.start_device(
            "dev1", fleet.store("dev1"), {"APPLIANCE_HUB__MIRRORS": json.dumps(mirrors)}
        )
        hub = fleet.hub

        def staged(version: str) -> None:
            hub.publish("sample", variants["v2" if version == "2" else "v3"], version,
                        *fleet.manifest_args)  # fmt: skip
            hub.cli("export-static", str(bad))
            wait_for("the hub's static dir", lambda: (good / "targets/sample" / version).is_dir())

        # 1. a flipped byte in the model on the first mirror
        staged("2")
        flip(_target(bad, "2"))
        hub.rollout("sample", "2", "dev1")
        wait_for("version 2 serving", lambda: serving_version(device) == "2")
        status = sync_status(device)
        assert status["served_by"] == {"metadata": mirrors[0], "target": mirrors[2]}
        assert status["mirrors"] == mirrors
        labels = 'mirror="{}",result="{}",what="{}"'
        assert _metric(device.url, labels.format(mirrors[0], "refused", "target")) >= 1
        assert _metric(device.url, labels.format(dead, "failed", "target")) >= 1
        assert _metric(device.url, labels.format(mirrors[2], "ok", "target")) == 1

        # 2. a flipped byte in the first mirror's new targets metadata
        staged("3")
        stamp = json.loads((bad / "metadata/timestamp.json").read_bytes())
        snap = stamp["signed"]["meta"]["snapshot.json"]["version"]
        flip_signed(bad / "metadata" / f"{snap}.targets.json")
        hub.rollout("sample", "3", "dev1")
        wait_for("version 3 serving", lambda: serving_version(device) == "3")
        assert sync_status(device)["served_by"]["metadata"] == mirrors[2]
        assert _metric(device.url, labels.format(mirrors[0], "refused", "metadata")) >= 1

        tuf = [r for r in fleet.proxy.requests if "/tuf/" in r]
        assert tuf == [], "with mirrors set, the hub answers assignments and telemetry only"
        assert any("/api/v1/device/telemetry" in r for r in fleet.proxy.requests)
        served = [line for line in server.requests() if line.startswith(str(server.ports[1]))]
        assert any(" /targets/sample/2/" in line and " 200 " in line for line in served)
        assert all(line.split(" ", 6)[6].startswith('"-" ') for line in server.requests()), (
            "the device token never goes to a mirror"
        )
    finally:
        if fleet is not None:
            fleet.close()
        print(server.errors()[-3000:])
        server.stop()
