"""What the hub stores, as plain records: devices, published targets, rollouts, telemetry events.

Shared by the `HubStore` protocol (storage.py) and its SQL implementations (sqlstore.py and its
SQLite and PostgreSQL subclasses), so none of those imports another just for the types.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Device:
    device_id: str
    group: str
    token_hash: str
    enrolled_at: str
    last_seen: str | None
    #: What the device last reported: active, pending, last_error, tuf (see service.py).
    state: dict[str, Any] = field(default_factory=dict)
    #: The highest event sequence number already applied to `state`.
    state_seq: int = 0


@dataclass(frozen=True)
class Target:
    name: str
    version: str
    path: str  # the TUF target path, "name/version/file"
    sha256: str
    length: int
    custom: dict[str, Any]
    created_at: str


@dataclass(frozen=True)
class Rollout:
    id: int
    model: str
    version: str
    target: dict[str, Any]  # {"all": true} | {"group": G} | {"devices": [..]}
    percent: int
    state: str  # "active" | "halted" | "rolled_back"
    created_at: str
    updated_at: str

    @property
    def public_id(self) -> str:
        return f"r{self.id}"

    def to_json(self) -> dict[str, Any]:
        """The rollout as the admin API, the CLI and the dashboard show it."""
        return {
            "rollout": self.public_id,
            "model": self.model,
            "version": self.version,
            "target": self.target,
            "percent": self.percent,
            "state": self.state,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }


@dataclass(frozen=True)
class Event:
    device_id: str
    seq: int
    time: str
    kind: str
    data: dict[str, Any]
    received_at: str

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "time": self.time,
            "kind": self.kind,
            "data": self.data,
            "received_at": self.received_at,
        }
