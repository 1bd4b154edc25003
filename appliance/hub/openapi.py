"""The hub's `/openapi.json`: what each of its HTTP routes takes and answers, by (METHOD, path
as registered in hub/server.py). The paths come from the running application, so a route
added there is listed at once; tests/hub/test_openapi.py names any route declared nowhere here.

Public, like /healthz: it describes this version's routes (the source tells as much) and names
no device, model or token.
"""

from __future__ import annotations

from typing import Any

from .. import __version__
from ..openapi import Api, Examples, Operation, Schema, handler, ref
from .fleet import STAGES
from .service import Hub

_JSON = "application/json"
_TEXT = {"type": "string"}
_INT = {"type": "integer"}
#: Device ids and group names (appliance/names.py's rule, host-name length).
_ID = {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"}
_NAME = {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"}

SCHEMAS: dict[str, Schema] = {
    "Health": {"type": "object", "properties": {"status": _TEXT}},
    "Assignments": {
        "type": "object",
        "required": ["device_id", "models"],
        "properties": {
            "device_id": _TEXT,
            "models": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "name": _TEXT,
                        "version": _TEXT,
                        "target": _TEXT,
                        "rollout": _TEXT,
                    },
                },
            },
            "poll_interval_s": {"type": "number"},
        },
    },
    "Telemetry": {
        "type": "object",
        "required": ["events"],
        "properties": {
            "events": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["seq", "kind", "time"],
                    "properties": {
                        "seq": {"type": "integer", "minimum": 1, "maximum": 2**62 - 1},
                        "kind": {"type": "string", "pattern": r"^[A-Za-z0-9_.-]{1,64}$"},
                        "time": {"type": "string", "minLength": 1, "maxLength": 64},
                        "data": {"type": "object"},
                    },
                },
            }
        },
    },
    "TelemetryStored": {
        "type": "object",
        "properties": {
            "stored": _INT,
            "duplicates": _INT,
            "max_seq": {"type": ["integer", "null"]},
        },
    },
    "Enroll": {
        "type": "object",
        "required": ["device_id"],
        "properties": {"device_id": _ID, "group": _ID},
    },
    "Enrolled": {
        "type": "object",
        "properties": {"device_id": _TEXT, "group": _TEXT, "token": _TEXT},
    },
    "Publish": {
        "type": "object",
        "required": ["name", "version", "file"],
        "properties": {
            "name": _NAME,
            "version": _NAME,
            "file": {"type": "string", "format": "binary"},
            "backend": _TEXT,
            "manifest": {"type": "string", "description": "a JSON object"},
            "acceptance": {"type": "string", "description": "a JSON list of cases"},
        },
    },
    "Published": {
        "type": "object",
        "properties": {
            "name": _TEXT,
            "version": _TEXT,
            "target": _TEXT,
            "sha256": _TEXT,
            "length": _INT,
            "new": {"type": "boolean"},
        },
    },
    "Target": {
        "type": "object",
        "properties": {
            "name": _TEXT,
            "version": _TEXT,
            "target": _TEXT,
            "sha256": _TEXT,
            "length": _INT,
            "created_at": _TEXT,
            "backend": {"type": ["string", "null"]},
            "acceptance_cases": _INT,
        },
    },
    "NewRollout": {
        "type": "object",
        "required": ["model", "version", "target"],
        "properties": {
            "model": _NAME,
            "version": _NAME,
            "target": {
                "oneOf": [
                    {
                        "type": "object",
                        "required": ["all"],
                        "additionalProperties": False,
                        "properties": {"all": {"const": True}},
                    },
                    {
                        "type": "object",
                        "required": ["group"],
                        "additionalProperties": False,
                        "properties": {"group": _ID},
                    },
                    {
                        "type": "object",
                        "required": ["devices"],
                        "additionalProperties": False,
                        "properties": {"devices": {"type": "array", "items": _ID, "minItems": 1}},
                    },
                ]
            },
            "percent": {"type": "integer", "minimum": 0, "maximum": 100},
        },
    },
    "Rollout": {
        "type": "object",
        "properties": {
            "rollout": _TEXT,
            "model": _TEXT,
            "version": _TEXT,
            "target": {},
            "percent": _INT,
            "state": _TEXT,
            "created_at": _TEXT,
            "updated_at": _TEXT,
        },
    },
    "Percent": {
        "type": "object",
        "required": ["percent"],
        "properties": {"percent": {"type": "integer", "minimum": 0, "maximum": 100}},
    },
}

_COUNT = {"type": "integer", "minimum": 0}
_COUNTS: Schema = {
    "type": "object",
    "required": ["devices", *STAGES, "error_rate"],
    "properties": {
        **{k: _COUNT for k in ("devices", *STAGES)},
        "error_rate": {"type": "number", "minimum": 0, "maximum": 1},
    },
}
#: hub/fleet.py's answers (README: "Dashboard"); every key it writes is required.
FLEET_SCHEMAS: dict[str, Schema] = {
    "RolloutProgress": {
        "type": "object",
        "required": ["rollout", "model", "version", "target", "percent", "state",
                     "created_at", "updated_at", "groups", "total"],
        "properties": {
            "rollout": _TEXT, "model": _TEXT, "version": _TEXT, "target": {"type": "object"},
            "percent": _INT, "state": _TEXT, "created_at": _TEXT, "updated_at": _TEXT,
            "groups": {"type": "array", "items": {
                "allOf": [_COUNTS, {"required": ["group"], "properties": {"group": _TEXT}}]}},
            "total": _COUNTS,
        },
    },
    "MetadataExpiry": {
        "type": "object",
        "required": ["now", "roles"],
        "properties": {
            "now": _TEXT,
            "roles": {"type": "object", "additionalProperties": {
                "type": "object",
                "required": ["expires", "seconds_left", "lifetime_s", "warning", "expired"],
                "properties": {
                    "expires": _TEXT, "seconds_left": {"type": "number"},
                    "lifetime_s": {"type": "number"}, "warning": {"type": "boolean"},
                    "expired": {"type": "boolean"},
                },
            }},
        },
    },
    "ModelVersion": {
        "type": "object",
        "required": ["name", "version", "target", "sha256", "length", "created_at", "backend",
                     "manifest", "acceptance"],
        "properties": {
            "name": _TEXT, "version": _TEXT, "target": _TEXT, "sha256": _TEXT, "length": _INT,
            "created_at": _TEXT, "backend": {"type": ["string", "null"]},
            "manifest": {"type": "object"}, "acceptance": {"type": "array"},
        },
    },
}  # fmt: skip
SCHEMAS.update(FLEET_SCHEMAS)
#: The dashboard's files' content types (hub/server.py's _UI_TYPES).
_UI_MEDIA = ("text/html", "text/javascript", "text/css", "image/svg+xml")

_DEVICE = "device API (a device token and X-Device-Id)"
_ADMIN = "admin API (the admin token)"
_TUF = "TUF repository (a device token or the admin token)"


def operations() -> dict[tuple[str, str], Operation]:
    from .server import UI_FILES  # (server.py imports this module)

    j = _JSON
    missing = {"404": ("not published", {j: ref("Error")})}
    return {
        ("GET", "/"): Operation("the fleet dashboard", "dashboard",
                                answer={"text/html": _TEXT}, public=True),
        ("GET", "/ui/{name}"): Operation(
            "a file of the dashboard (only these names: any other needs the admin token)",
            "dashboard", answer={kind: _TEXT for kind in _UI_MEDIA}, public=True,
            path={"name": {"type": "string", "enum": sorted(UI_FILES)}},
        ),
        ("GET", "/api/v1/admin/rollouts/progress"): Operation(
            "every rollout (newest first): where its devices stand, per group", _ADMIN,
            answer={j: {"type": "array", "items": ref("RolloutProgress")}},
        ),
        ("GET", "/api/v1/admin/metadata"): Operation(
            "each TUF role's expiry", _ADMIN, answer={j: ref("MetadataExpiry")},
        ),
        ("GET", "/api/v1/admin/models/{name}/{version}"): Operation(
            "a published version: backend, manifest, acceptance cases", _ADMIN,
            answer={j: ref("ModelVersion")}, more=missing,
            path={"name": _NAME, "version": _NAME},
        ),
        ("GET", "/healthz"): Operation("the hub answers", "health", answer={j: ref("Health")},
                                       public=True),
        ("GET", "/openapi.json"): Operation("this document", "meta",
                                            answer={j: {"type": "object"}}, public=True),
        ("GET", "/metrics"): Operation("Prometheus metrics (admin token)", "metrics",
                                       answer={"text/plain": _TEXT}),
        ("GET", "/tuf/metadata/{name}"): Operation(
            "TUF metadata: N.root.json, N.targets.json, N.snapshot.json, timestamp.json", _TUF,
            answer={j: {"type": "object"}},
        ),
        ("GET", "/tuf/targets/{path}"): Operation(
            "a target file (Range requests resume a download)", _TUF,
            answer={"application/octet-stream": {"type": "string", "format": "binary"}},
            more={"206": ("part of the file (Range)", {"application/octet-stream":
                                                       {"type": "string", "format": "binary"}}),
                  "416": ("the range is outside the file", {})},
        ),
        ("GET", "/api/v1/device/assignments"): Operation(
            "the model versions this device should serve", _DEVICE,
            answer={j: ref("Assignments")}, more={"304": ("unchanged (If-None-Match)", {})},
        ),
        ("POST", "/api/v1/device/telemetry"): Operation(
            "a batch of events (kept exactly once per seq)", _DEVICE,
            body={j: ref("Telemetry")}, answer={j: ref("TelemetryStored")},
        ),
        ("POST", "/api/v1/admin/devices"): Operation(
            "enroll a device: its token is shown once", _ADMIN, body={j: ref("Enroll")},
            answer={j: ref("Enrolled")}, status="201",
        ),
        ("GET", "/api/v1/admin/devices"): Operation(
            "the fleet", _ADMIN, answer={j: {"type": "array", "items": {"type": "object"}}},
        ),
        ("GET", "/api/v1/admin/devices/{device_id}/events"): Operation(
            "a device's events after a seq", _ADMIN,
            answer={j: {"type": "array", "items": {"type": "object"}}},
            query={"after": {"type": "integer", "minimum": 0},
                   "limit": {"type": "integer", "minimum": 1}},
            path={"device_id": _ID},
        ),
        ("POST", "/api/v1/admin/models"): Operation(
            "publish a model version", _ADMIN, body={"multipart/form-data": ref("Publish")},
            answer={j: ref("Published")}, status="201",
            more={"200": ("already published, unchanged", {j: ref("Published")})},
        ),
        ("GET", "/api/v1/admin/models"): Operation(
            "the published model versions", _ADMIN,
            answer={j: {"type": "array", "items": ref("Target")}},
        ),
        ("POST", "/api/v1/admin/rollouts"): Operation(
            "start a rollout", _ADMIN, body={j: ref("NewRollout")}, answer={j: ref("Rollout")},
            status="201",
        ),
        ("GET", "/api/v1/admin/rollouts"): Operation(
            "every rollout", _ADMIN, answer={j: {"type": "array", "items": ref("Rollout")}},
        ),
        ("POST", "/api/v1/admin/rollouts/{id}/halt"): Operation(
            "halt a rollout (devices keep what they run)", _ADMIN, answer={j: ref("Rollout")},
        ),
        ("POST", "/api/v1/admin/rollouts/{id}/rollback"): Operation(
            "roll a rollout back", _ADMIN, answer={j: ref("Rollout")},
        ),
        ("POST", "/api/v1/admin/rollouts/{id}/percent"): Operation(
            "change the share of devices a rollout reaches", _ADMIN,
            body={j: ref("Percent")}, answer={j: ref("Rollout")},
        ),
        ("GET", "/api/v1/admin/root.json"): Operation(
            "the TUF root a device is provisioned with", _ADMIN,
            answer={j: {"type": "object"}},
        ),
    }  # fmt: skip


_METADATA_NAMES = ("timestamp.json", "1.root.json", "1.targets.json", "1.snapshot.json")


def served(hub: Hub) -> Examples:
    """What exists now (devices, rollouts, targets, metadata): examples of the path
    parameters, so that a client or a fuzzer reaches real ones."""
    store = hub.store
    targets = store.targets()
    return {
        "device_id": sorted(d.device_id for d in store.devices())[:20],
        "id": sorted(r.public_id for r in store.rollouts())[:20],
        "path": sorted(t.path for t in targets)[:20],
        # TUF metadata's names, and the published models' (the dashboard's model route)
        "name": [*_METADATA_NAMES, *sorted({t.name for t in targets})[:20]],
        "version": sorted({t.version for t in targets})[:20],
    }


def route_handler(hub: Hub) -> Any:
    """The GET /openapi.json handler of one hub application."""
    api = Api(
        title="appliance hub",
        version=__version__,
        description="Fleet hub: TUF repository, device API (device tokens), admin API (the "
        "admin token). Every route but /healthz and /openapi.json takes a bearer token.",
        operations=operations(),
        token=True,
    )
    return handler(api, lambda: SCHEMAS, lambda app: served(hub))
