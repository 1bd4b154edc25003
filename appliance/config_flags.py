"""Settings given as command-line flags, applied over the config file and APPLIANCE_* variables.

One place for the CLI and for commands that build a config of their own (`appliance bench` is
given its flags as typed options, not an argparse namespace).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import Config


@dataclass(frozen=True)
class ConfigFlags:
    """Flags that override settings; None where a flag was not given."""

    #: The TOML config file (None: $APPLIANCE_CONFIG, if set).
    config: str | None = None
    models: str | None = None
    host: str | None = None
    port: int | None = None
    token_file: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    log_level: str | None = None
    device: str | None = None
    mqtt: str | None = None
    grpc_port: int | None = None
    device_id: str | None = None
    hub: str | None = None
    hub_token_file: str | None = None
    hub_root: str | None = None

    def overrides(self) -> dict[str, Any]:
        """The flags as a nested settings table, as `load_config` takes overrides."""
        out: dict[str, Any] = {}
        server = _given(
            host=self.host,
            port=self.port,
            auth_token_file=self.token_file,
            tls_cert=self.tls_cert,
            tls_key=self.tls_key,
            tls_client_ca=self.tls_client_ca,
            log_level=self.log_level,
        )
        if server:
            out["server"] = server
        if self.models is not None:
            out["store"] = {"path": self.models}
        if self.device is not None:
            out["model_defaults"] = {"device": self.device}
        mqtt = _given(url=self.mqtt, device_id=self.device_id)
        if mqtt:
            out["mqtt"] = mqtt
        grpc = _given(port=self.grpc_port)
        if grpc:
            out["grpc"] = grpc
        hub = _given(
            url=self.hub,
            device_id=self.device_id if self.hub is not None else None,
            token_file=self.hub_token_file,
            root_file=self.hub_root,
        )
        if hub:
            out["hub"] = hub
        return out


def _given(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def config_from_flags(flags: ConfigFlags) -> Config:
    """The effective config: file (flag or $APPLIANCE_CONFIG), variables, then the flags."""
    from .config import load_config

    path = flags.config or os.environ.get("APPLIANCE_CONFIG")
    return load_config(path, flags.overrides())
