"""What a device poll needs, kept in memory, so that a poll costs no database query.

A fleet of 100,000 devices polling every minute is 1,667 polls a second; each used to look its
token up, write its last-seen stamp and read every rollout. Here:

- `DeviceCache`: token hash -> the device's identity (id, group). A device's id, group and
  token never change after enrolment (there is no operation that changes them), so an entry
  stays right for as long as it is kept; bounded, the oldest entry leaves first. Should an
  operation to revoke or regroup a device be added, it must call `forget()` (and bump the
  fleet generation so that other replicas drop theirs).
- `LastSeen`: last-seen stamps gathered in memory and written in one transaction every few
  seconds (`Hub.flush_last_seen`). A crash loses at most that window of stamps, never an event
  (telemetry is written before it is answered).
- `FleetView`: the rollouts and the target paths they name, read at one fleet generation
  (`HubStore.generation()`, increased by every rollout and publish, whoever made it). A change
  made through this process drops the view at once; the server re-reads the generation every
  `fleet_check_s` (1 s) for changes made elsewhere (a CLI, another replica). A poll is answered
  from the view unless a halted rollout would need the device's reported state (then the store
  is read, as before).
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .records import Device, Rollout

#: Entries of the device cache by default: a fleet larger than this pays a database lookup per
#: poll of the devices that do not fit (about 0.4 KB per entry).
DEVICE_CACHE_SIZE = 250_000


class DeviceCache:
    """Token hash -> device identity (its state left out: read from the store when needed)."""

    def __init__(self, size: int = DEVICE_CACHE_SIZE) -> None:
        self.size = size
        self._entries: dict[str, Device] = {}
        self._lock = threading.Lock()  # writers only (worker threads); readers take none

    def get(self, token_hash: str) -> Device | None:
        return self._entries.get(token_hash)

    def put(self, device: Device) -> Device:
        """Keep the identity of `device`; returns what is kept (no state, no last-seen)."""
        kept = Device(device.device_id, device.group, device.token_hash, device.enrolled_at, None)
        if self.size <= 0:
            return kept
        entries = self._entries
        with self._lock:
            if device.token_hash not in entries and len(entries) >= self.size:
                del entries[next(iter(entries))]  # the oldest: dicts keep insertion order
            entries[device.token_hash] = kept
        return kept

    def forget(self, device_id: str | None = None) -> None:
        """Drop one device's entries, or every entry."""
        with self._lock:
            if device_id is None:
                self._entries.clear()
                return
            for key in [k for k, d in self._entries.items() if d.device_id == device_id]:
                del self._entries[key]

    def __len__(self) -> int:
        return len(self._entries)


class LastSeen:
    """Devices seen since the last write, with the second each was last seen (ISO 8601)."""

    def __init__(self) -> None:
        self._pending: dict[str, str] = {}
        self._second = -1
        self._stamp = ""

    def now(self) -> str:
        """The current second as the hub writes it (formatted once per second)."""
        second = int(time.time())
        if second != self._second:
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(second))
            self._second = second
        return self._stamp

    def note(self, device_id: str, when: str | None = None) -> None:
        self._pending[device_id] = when or self.now()

    def take(self) -> dict[str, str]:
        """The pending stamps, leaving none."""
        pending, self._pending = self._pending, {}
        return pending

    def put_back(self, stamps: Mapping[str, str]) -> None:
        """Stamps whose write failed: kept for the next try, unless a newer one came."""
        for device_id, when in stamps.items():
            if self._pending.get(device_id, "") < when:
                self._pending[device_id] = when

    def __len__(self) -> int:
        return len(self._pending)


class NeedsState(Exception):
    """A halted rollout decides by what the device reports: the store must be read."""


# -- the assignment rules (service.py's module doc says them in words) ----------------------
def in_percent(rollout_id: str, device_id: str, percent: int) -> bool:
    """Stable pseudo-random membership: the same device stays in as the percentage grows."""
    h = int(hashlib.sha256(f"{rollout_id}:{device_id}".encode()).hexdigest()[:8], 16)
    return h % 100 < percent


def selects(r: Rollout, device: Device) -> bool:
    t = r.target
    if t.get("all"):
        hit = True
    elif "group" in t:
        hit = t["group"] == device.group
    else:
        hit = device.device_id in t.get("devices", [])
    return hit and in_percent(r.public_id, device.device_id, r.percent)


def decide(
    newest_first: Iterable[Rollout], device: Device, active: Mapping[str, str] | None
) -> dict[str, Rollout]:
    """The rollout that decides each model for `device`. `active`: the versions the device
    reports active; None when not read (NeedsState is raised if a halted rollout needs them)."""
    decided: dict[str, Rollout] = {}
    for r in newest_first:
        if r.model in decided or r.state == "rolled_back" or not selects(r, device):
            continue
        if r.state == "active":
            decided[r.model] = r
        elif r.state == "halted":
            if active is None:
                raise NeedsState
            if active.get(r.model) == r.version:
                decided[r.model] = r
    return decided


@dataclass(frozen=True)
class FleetView:
    """Rollouts (newest first) and the target path of each (model, version) they name, read
    at fleet generation `generation`."""

    generation: int
    rollouts: tuple[Rollout, ...]
    paths: Mapping[tuple[str, str], str]
    poll_interval_s: int

    def models(self, device: Device, active: Mapping[str, str] | None) -> list[dict[str, str]]:
        """The assignments of a device (rules in service.py). `active`: the versions the
        device reports active, or None when not read (raises NeedsState if they matter)."""
        decided = decide(self.rollouts, device, active)
        out = []
        for model in sorted(decided):
            r = decided[model]
            path = self.paths.get((r.model, r.version))
            if path is not None:  # always: rollouts need a published target
                out.append(
                    {"name": r.model, "version": r.version, "target": path, "rollout": r.public_id}
                )
        return out
