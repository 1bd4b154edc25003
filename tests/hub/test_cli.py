"""`appliance hub ...` as an operator runs it: a real hub process, the CLI in other processes.

On both stores: for PostgreSQL every command finds the database in $APPLIANCE_HUB_DATABASE."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


def hub(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "appliance", "hub", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"hub {args} failed: {proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def data(tmp_path: Path, hub_database: str | None, monkeypatch: pytest.MonkeyPatch) -> Path:
    if hub_database is not None:
        monkeypatch.setenv("APPLIANCE_HUB_DATABASE", hub_database)
    d = tmp_path / "hub"
    hub("init", "--data", str(d))
    return d


@pytest.fixture
def served(data: Path) -> Iterator[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance", "hub", "serve", "--data", str(data), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        assert m, line
        yield f"http://127.0.0.1:{m.group(1)}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_init_keeps_the_root_key_out_of_the_data_dir(data: Path, tmp_path: Path) -> None:
    root_key = tmp_path / "hub-root-key" / "root.pem"
    assert root_key.is_file()
    assert not list(data.rglob("root.pem"))
    for secret in (root_key, data / "admin.token", *(data / "keys").iterdir()):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret
    assert json.loads((data / "1.root.json").read_bytes())["signed"]["version"] == 1
    again = hub("init", "--data", str(data), check=False)
    assert again.returncode != 0 and "already" in again.stderr
    migrated = hub("migrate", "--data", str(data)).stdout
    assert ("up to date" if os.environ.get("APPLIANCE_HUB_DATABASE") else "nothing") in migrated
    inside = hub(
        "init",
        "--data",
        str(tmp_path / "x"),
        "--root-key-dir",
        str(tmp_path / "x" / "k"),
        check=False,
    )
    assert inside.returncode != 0 and "must not lie inside" in inside.stderr


def test_operator_workflow_against_a_running_hub(
    data: Path, served: str, samples: Path, tmp_path: Path
) -> None:
    url = ["--url", served, "--data", str(data)]
    token = hub("enroll", "dev1", "--group", "lab", *url).stdout.strip()
    assert len(token) >= 40
    token_file = tmp_path / "dev2.token"
    hub("enroll", "dev2", "--data", str(data), "--token-out", str(token_file))  # data-dir mode
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600

    acceptance = tmp_path / "acc.json"
    acceptance.write_text('[{"inputs": [], "outputs": [], "rtol": 0.01}]')
    out = hub(
        "publish",
        "sample",
        str(samples / "sample.onnx"),
        "--version",
        "1",
        "--acceptance",
        str(acceptance),
        *url,
    ).stdout
    assert "published: sample/1/model.onnx" in out
    out = hub(
        "publish", "sample", str(samples / "fp16.onnx"), "--version", "2", "--data", str(data)
    ).stdout
    assert "published: sample/2/model.onnx" in out
    clash = hub(
        "publish", "sample", str(samples / "fp16.onnx"), "--version", "1", *url, check=False
    )
    assert clash.returncode == 1 and "409" in clash.stderr

    assert hub("rollout", "sample", "1", "--all", *url).stdout.startswith("r1 ")
    assert hub(
        "rollout", "sample", "2", "--group", "lab", "--percent", "100", *url
    ).stdout.startswith("r2 ")
    req = urllib.request.Request(
        served + "/api/v1/device/assignments", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(req) as resp:
        assert json.loads(resp.read())["models"][0]["version"] == "2"
    assert "halted" in hub("halt", "r2", *url).stdout
    assert "rolled_back" in hub("rollback", "r2", "--data", str(data)).stdout
    devices = json.loads(hub("devices", "--json", *url).stdout)
    assert {d["device_id"]: d["pending"] for d in devices} == {
        "dev1": {"sample": "1"},
        "dev2": {"sample": "1"},
    }
    assert "never" in hub("devices", "--data", str(data)).stdout  # dev2 has not called in

    root = hub("export-root", *url).stdout
    assert json.loads(root)["signed"]["_type"] == "root"
    rotated = hub("rotate-key", "timestamp", "--data", str(data))
    assert "root metadata is now version 2" in rotated.stdout
    assert json.loads(hub("export-root", "--data", str(data)).stdout)["signed"]["version"] == 2
    assert "timestamp" in hub("status", "--data", str(data)).stdout

    bad = hub("enroll", "dev3", "--url", served, "--admin-token-file", str(token_file), check=False)
    assert bad.returncode == 1 and "403" in bad.stderr


def test_the_device_cache_size_is_a_serve_setting(tmp_path: Path) -> None:
    from appliance.cli import parser
    from appliance.errors import ConfigError
    from appliance.hub.cli import _config
    from appliance.hub.polls import DEVICE_CACHE_SIZE

    def config(*extra: str) -> Any:
        args = parser().parse_args(["hub", "serve", "--data", str(tmp_path), *extra])
        return _config(args)

    assert config().device_cache_size == DEVICE_CACHE_SIZE
    assert config("--device-cache-size", "0").device_cache_size == 0
    assert config("--device-cache-size", "1000").device_cache_size == 1000
    with pytest.raises(ConfigError, match="must be 0 or more"):
        config("--device-cache-size", "-1")
