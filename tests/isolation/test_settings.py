"""Settings of isolation and the backend plugins' discovery."""

from __future__ import annotations

import pytest

from appliance import backends
from appliance.config import load_config
from appliance.errors import ConfigError, ModelError


def test_isolation_settings_are_checked_where_they_are_named() -> None:
    config = load_config(None, {"models": {"m": {"isolation": "process"}}}, {})
    assert config.model_config("m").isolation == "process"
    assert config.model_config("other").isolation == "none"
    assert config.model_config("other").probe_first_load is True
    for table, message in (
        ({"isolation": "thread"}, "isolation = 'thread': must be one of 'none', 'process'"),
        ({"process": {"restart_backoff_s": 0}}, "restart_backoff_s = 0.0: must be greater than 0"),
        ({"process": {"restart_backoff_s": 5, "restart_backoff_max_s": 1}},
         "models.m.process.restart_backoff_max_s = 1.0: must not be below restart_backoff_s"),
        ({"probe_first_load": "yes"}, "models.m.probe_first_load = 'yes': must be true or false"),
        ({"process": {"spin_us": -1}}, "models.m.process.spin_us = -1: must not be negative"),
    ):  # fmt: skip
        with pytest.raises(ConfigError) as err:
            load_config(None, {"models": {"m": table}}, {})
        assert message in err.value.message


def test_plugins_come_from_the_entry_point_group(plugin: None) -> None:
    assert "crashy" in backends.names() and "onnx" in backends.names()
    cls = backends.get_backend("crashy")
    assert cls.__name__ == "CrashyBackend" and cls.platform == "test_crashy"
    assert any(line.startswith("crashy: plugin") for line in backends.runtime_report())


def test_without_the_plugin_its_name_is_unknown() -> None:
    with pytest.raises(ModelError, match="unknown backend 'crashy'"):
        backends.get_backend("crashy")
