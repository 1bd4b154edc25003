"""Fleet figures for the dashboard (and scripts): rollout progress per group, metadata expiry,
a published version's manifest and acceptance cases.

Derived from what the store already holds (devices' folded state, rollouts, targets), so they
cost no extra writes; blocking like the rest of the service (the server runs them in threads).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from ..errors import NotFound
from ..names import check_name
from .polls import selects as _selects
from .protocol import decode_custom
from .repository import utcnow
from .service import Hub
from .storage import Device, Rollout

#: Each device a rollout selects is in exactly one of these, for that rollout's model.
STAGES = ("waiting", "downloading", "active", "failed", "rolled_back")
#: Below this share of a role's configured lifetime left, its metadata is flagged.
EXPIRY_WARN_SHARE = 0.25


def stage(r: Rollout, device: Device, deciding: Rollout | None) -> str:
    """Where one selected device stands with rollout `r` (`deciding`: the rollout that decides
    the device's version of r's model now, see Hub.assigned)."""
    state = device.state
    if (state.get("active") or {}).get(r.model) == r.version:
        return "active"
    failure = (state.get("failures") or {}).get(r.model) or {}
    if failure.get("version") == r.version:
        return "rolled_back" if failure.get("kind") == "rolled_back" else "failed"
    mine = deciding is not None and deciding.id == r.id
    if mine and (state.get("pending") or {}).get(r.model) == r.version:
        return "downloading"  # assigned, and the device says it is working on it
    return "waiting"


def rollout_progress(hub: Hub) -> list[dict[str, Any]]:
    """Per rollout and per device group: how many devices it selects and where they stand.

    `error_rate` = (failed + rolled back) / devices selected."""
    rollouts = hub.store.rollouts()
    devices = hub.store.devices()
    deciding: dict[str, dict[str, Rollout]] = {
        d.device_id: {r.model: r for r in hub.assigned(d, rollouts)} for d in devices
    }
    out = []
    for r in sorted(rollouts, key=lambda r: r.id, reverse=True):
        groups: dict[str, dict[str, int]] = {}
        for d in devices:
            if not _selects(r, d):
                continue
            counts = groups.setdefault(d.group, dict.fromkeys(("devices", *STAGES), 0))
            counts["devices"] += 1
            counts[stage(r, d, deciding[d.device_id].get(r.model))] += 1
        out.append(
            {
                "rollout": r.public_id,
                "model": r.model,
                "version": r.version,
                "target": r.target,
                "percent": r.percent,
                "state": r.state,
                "created_at": r.created_at,
                "updated_at": r.updated_at,
                "groups": [{"group": g, **_rated(c)} for g, c in sorted(groups.items())],
                "total": _rated(_sum(groups.values())),
            }
        )
    return out


def _sum(counts: Any) -> dict[str, int]:
    total = dict.fromkeys(("devices", *STAGES), 0)
    for c in counts:
        for k, v in c.items():
            total[k] += v
    return total


def _rated(c: dict[str, int]) -> dict[str, Any]:
    bad = c["failed"] + c["rolled_back"]
    return {**c, "error_rate": round(bad / c["devices"], 4) if c["devices"] else 0.0}


def metadata_expiry(hub: Hub) -> dict[str, Any]:
    """Each TUF role's expiry, seconds left and whether it is close (a share of its lifetime)."""
    now = utcnow()
    roles = {}
    for role, when in hub.repo.expires().items():
        left = (when - now).total_seconds()
        lifetime = hub.config.expiry.of(role).total_seconds()
        roles[role] = {
            "expires": when.astimezone(dt.timezone.utc).isoformat().replace("+00:00", "Z"),
            "seconds_left": left,
            "lifetime_s": lifetime,
            "warning": left < lifetime * EXPIRY_WARN_SHARE,
            "expired": left <= 0,
        }
    return {"now": now.isoformat().replace("+00:00", "Z"), "roles": roles}


def model_detail(hub: Hub, name: str, version: str) -> dict[str, Any]:
    """A published version as devices receive it: backend, manifest, acceptance cases."""
    name = check_name(name, "model name")
    version = check_name(version, "version")
    target = hub.store.target(name, version)
    if target is None:
        raise NotFound(f"model {name!r} version {version!r} is not published")
    custom = decode_custom(target.custom)
    return {
        "name": target.name,
        "version": target.version,
        "target": target.path,
        "sha256": target.sha256,
        "length": target.length,
        "created_at": target.created_at,
        "backend": custom.get("backend"),
        "manifest": custom["manifest"],
        "acceptance": custom["acceptance"],
    }
