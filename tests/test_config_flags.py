"""Command-line setting flags over the config file: what each flag sets, and that an unset flag
leaves the file's value alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.config_flags import ConfigFlags, config_from_flags


def test_flags_override_the_file_and_unset_flags_do_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "appliance.toml"
    path.write_text('[server]\nport = 9001\nlog_level = "warning"\n[store]\npath = "from-file"\n')
    monkeypatch.setenv("APPLIANCE_CONFIG", str(path))
    config = config_from_flags(ConfigFlags(port=9002, device="cpu", mqtt="mqtt://b:1883"))
    assert config.server.port == 9002  # the flag
    assert config.server.log_level == "warning"  # the file, no flag given
    assert config.store.path == "from-file"
    assert config.model_defaults.device == "cpu"
    assert config.mqtt.url == "mqtt://b:1883"

    other = tmp_path / "other.toml"
    other.write_text("[server]\nport = 9003\n")
    assert config_from_flags(ConfigFlags(config=str(other))).server.port == 9003


def test_device_id_goes_to_the_hub_only_with_a_hub() -> None:
    assert "hub" not in ConfigFlags(device_id="d1").overrides()
    assert ConfigFlags(device_id="d1").overrides()["mqtt"] == {"device_id": "d1"}
    hub = ConfigFlags(device_id="d1", hub="https://hub", hub_root="root.json").overrides()["hub"]
    assert hub == {"url": "https://hub", "device_id": "d1", "root_file": "root.json"}
    assert ConfigFlags().overrides() == {}
