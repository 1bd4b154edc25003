"""Attacks on the update path, each refused with its reason in status and telemetry while the
version already installed keeps serving: an assignment TUF does not list, tampered and truncated
artifacts on the hub's disk, a wrong signature on targets metadata, replayed older metadata and
expired metadata (a freeze attack)."""

from __future__ import annotations

import datetime as dt
import json
import re
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata

from tests.sync.conftest import Fleet, Load, kinds, serving_version, sync_status, wait_for


def _refusal(fleet: Fleet, version: str, text: str) -> Callable[[], list[dict[str, Any]]]:
    def check() -> list[dict[str, Any]]:
        return [
            e
            for e in kinds(fleet.hub.events("dev1"), "verification_failed")
            if e["data"]["version"] == version and text in e["data"]["reason"]
        ]

    return check


def _bad_signature(body: bytes) -> bytes:
    obj = json.loads(body)
    sig = obj["signatures"][0]["sig"]
    obj["signatures"][0]["sig"] = ("0" if sig[0] != "0" else "1") + sig[1:]
    return json.dumps(obj).encode()


def _expired(key: Path) -> Callable[[bytes], bytes]:
    """Timestamp metadata re-signed with the hub's real key, one version up, already expired."""
    signer = CryptoSigner(load_pem_private_key(key.read_bytes(), None))

    def rewrite(body: bytes) -> bytes:
        md = Metadata.from_bytes(body)
        md.signed.version += 1
        md.signed.expires = dt.datetime.now(dt.timezone.utc).replace(microsecond=0) - dt.timedelta(
            hours=1
        )
        md.signatures.clear()
        md.sign(signer)
        return bytes(md.to_bytes())

    return rewrite


def test_attacks_are_refused_and_the_old_version_keeps_serving(
    fleet: Fleet, variants: dict[str, Path]
) -> None:
    hub, proxy = fleet.hub, fleet.proxy
    device = fleet.start_device("dev1", fleet.store("dev1"))
    token = (fleet.tmp / "dev1.token").read_text().strip()
    req = urllib.request.Request(
        f"{hub.url}/tuf/metadata/timestamp.json", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(req) as r:
        old_timestamp = r.read()
    load = Load(device)
    attempted = refused = 0

    # 1. The hub's API assigns a version that TUF does not list.
    attempted += 1
    unlisted = {
        "device_id": "dev1",
        "models": [
            {"name": "sample", "version": "9", "target": "sample/9/model.onnx", "rollout": "r99"}
        ],
    }
    proxy.rewrite[r"/api/v1/device/assignments$"] = lambda _body: json.dumps(unlisted).encode()
    wait_for("unlisted target refused", _refusal(fleet, "9", "not listed in the verified TUF"))
    refused += 1
    proxy.rewrite.clear()

    # 2. Tampered artifact on the hub's disk (same length, other bytes).
    attempted += 1
    hub.publish("sample", variants["v2"], "2", *fleet.manifest_args)
    artifact = hub.artifact("sample", "2")
    original = artifact.read_bytes()
    artifact.chmod(0o644)
    artifact.write_bytes(original[:-64] + bytes(64))
    hub.rollout("sample", "2", "dev1")
    wait_for("tampered artifact refused", _refusal(fleet, "2", "failed verification"))
    refused += 1
    assert "sample/2" in sync_status(device)["retrying"]

    # 3. Truncated artifact.
    attempted += 1
    hub.publish("sample", variants["v3"], "3", *fleet.manifest_args)
    short = hub.artifact("sample", "3")
    short.chmod(0o644)
    short.write_bytes(short.read_bytes()[: short.stat().st_size // 2])
    hub.rollout("sample", "3", "dev1")
    wait_for("truncated artifact refused", _refusal(fleet, "3", "the signed length is"))
    refused += 1

    # 4. A wrong signature on targets metadata (on the wire).
    attempted += 1
    proxy.rewrite[r"/tuf/metadata/\d+\.targets\.json$"] = _bad_signature
    hub.publish("sample", variants["v2"], "4", *fleet.manifest_args)
    hub.rollout("sample", "4", "dev1")
    wait_for("bad signature refused", _refusal(fleet, "4", "UnsignedMetadataError"))
    refused += 1
    assert sync_status(device)["tuf"].startswith("error: ")
    proxy.rewrite.clear()
    wait_for("version 4 once the signature is right", lambda: serving_version(device) == "4")

    # 5. Replayed older metadata: the timestamp from before any of these publishes.
    attempted += 1
    proxy.rewrite[r"/tuf/metadata/timestamp\.json$"] = lambda _body: old_timestamp
    hub.publish("sample", variants["v3"], "5", *fleet.manifest_args)
    hub.rollout("sample", "5", "dev1")
    wait_for("replayed timestamp refused", _refusal(fleet, "5", "BadVersionNumberError"))
    refused += 1
    proxy.rewrite.clear()
    wait_for("version 5 once the replay stops", lambda: serving_version(device) == "5")

    # 6. Expired metadata (a freeze attack): updates stop, serving goes on.
    attempted += 1
    proxy.rewrite[r"/tuf/metadata/timestamp\.json$"] = _expired(hub.data / "keys" / "timestamp.pem")
    hub.publish("sample", variants["v2"], "6", *fleet.manifest_args)
    hub.rollout("sample", "6", "dev1")
    wait_for("expired metadata refused", _refusal(fleet, "6", "expired"))
    refused += 1
    assert sync_status(device)["tuf"] == "expired"  # also while it checks again each poll
    wait_for("the expired state", lambda: sync_status(device)["state"] == "expired")
    with urllib.request.urlopen(f"http://{device.url}/metrics") as r:
        metrics = r.read().decode()
    assert re.search(r"^appliance_sync_metadata_expired 1\.0$", metrics, re.M)
    assert serving_version(device) == "5"

    load.stop()
    assert load.failures == [] and load.answered > 0
    events = hub.events("dev1")
    activated = [e["data"]["version"] for e in kinds(events, "activated")]
    assert activated == ["4", "5"], "no refused version was ever activated"
    assert any(e["data"].get("tuf") == "expired" for e in kinds(events, "status"))
    print(f"attacks refused: {refused} of {attempted}")
