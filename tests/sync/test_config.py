"""The [hub] section: checked when loaded, and `serve --hub` refuses to start half-configured."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from appliance.config import load_config
from appliance.errors import ConfigError
from tests.conftest import ROOT


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("url", "ftp://hub", "must start with http:// or https://"),
        ("poll_jitter", 1.5, "must be below 1"),
        ("upload_batch", 501, "between 1 and 500"),
        ("error_rate_threshold", 2.0, "between 0 and 1"),
        ("outbox_max_bytes", 1000, "at least 65536"),
        ("mirrors", ["http://a", "file:///srv/m"], r"\[1\] 'file:///srv/m' must start with http"),
    ],
)
def test_bad_values_name_the_key(key: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=f"hub.{key}.*{message}"):
        load_config(None, {"hub": {key: value}}, {})


def test_environment_overrides() -> None:
    config = load_config(None, None, {"APPLIANCE_HUB__POLL_INTERVAL_S": "5"})
    assert config.hub.poll_interval_s == 5.0
    mirrors = '["http://cdn.example/fleet", "http://10.0.0.2:8780"]'
    config = load_config(None, None, {"APPLIANCE_HUB__MIRRORS": mirrors})
    assert config.hub.mirrors == ["http://cdn.example/fleet", "http://10.0.0.2:8780"]


def test_serve_with_a_hub_needs_the_token_and_the_root(tmp_path: Path) -> None:
    def serve(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "appliance", "serve", "--models", str(tmp_path), "--port", "0",
             "--hub", "http://127.0.0.1:9", *args],
            capture_output=True, text=True, cwd=ROOT, timeout=60,
        )  # fmt: skip

    out = serve()
    assert out.returncode == 2 and "hub.token_file is required" in out.stderr
    token = tmp_path / "t"
    token.write_text("secret\n")
    out = serve("--hub-token-file", str(token))
    assert out.returncode == 2 and "hub.root_file is required" in out.stderr
    out = serve("--hub-token-file", str(token), "--hub-root", str(tmp_path / "missing.json"))
    assert out.returncode == 2 and "no such file" in out.stderr
