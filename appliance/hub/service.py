"""The hub's operations, shared by the HTTP API (server.py) and the CLI working on a data dir.

Which version a device should run comes from rollouts (this module, the "director"); whether a
file is genuine comes from the TUF repository (repository.py, the "image repository"), the split
Uptane makes. Every method is blocking (SQLite, hashing, signing): the server calls them in
threads.

Assignment rules, per model, newest rollout first, among the rollouts that select the device
(target and percentage):
- an active rollout assigns its version;
- a halted rollout assigns its version only to devices that already report it active (a halt
  stops the spread, it does not downgrade anyone); the others fall through to older rollouts;
- a rolled-back rollout is skipped: its devices get the version of the previous rollout that
  selects them (and no assignment for that model if there is none).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import logging
import os
import re
import secrets
import tempfile
import threading
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from ..errors import ApplianceError, InvalidInput, NotFound, PayloadTooLarge, Unauthorized
from ..names import DEVICE_ID_MAX_LENGTH, check_name, is_name
from .artifacts import ArtifactStore, LocalArtifacts
from .errors import Conflict, Forbidden
from .polls import (
    DEVICE_CACHE_SIZE,
    DeviceCache,
    FleetView,
    LastSeen,
    NeedsState,
    decide,
    in_percent,
)
from .protocol import decode_custom, encode_custom
from .repository import Expiry, TufRepository, init_repository, write_private
from .storage import Device, Event, HubStore, Rollout, Target, is_database_url, open_store

log = logging.getLogger("appliance.hub")

#: Event sequence numbers stay below it (SQLite's and PostgreSQL's 64-bit integers hold it).
MAX_SEQ = 2**62
KIND_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
SUFFIXES = {"onnx": ".onnx", "gguf": ".gguf", "tflite": ".tflite", "pipeline": ".json"}
#: A pipeline version is its declaration (appliance/pipelines): target name/version/pipeline.json.
PIPELINE, PIPELINE_FILE = "pipeline", "pipeline.json"
MANIFEST_KEYS = ("inputs", "outputs", "parameters", "preprocess", "postprocess", "steps")
ROLLOUT_STATES = ("active", "halted", "rolled_back")
__all__ = [
    "Hub",
    "HubConfig",
    "NeedsState",
    "decode_custom",
    "encode_custom",
    "in_percent",
    "init_hub",
]


def check_device_id(value: Any, what: str = "device id") -> str:
    """Device ids and group names: the name rule (appliance/names.py), host-name length."""
    return check_name(value, what, max_length=DEVICE_ID_MAX_LENGTH)


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def parse_rollout_id(value: str) -> int:
    text = value[1:] if value.startswith("r") else value
    if not text.isdigit() or len(text) > 18:
        raise NotFound(f"no rollout {value!r}")
    return int(text)


@dataclass(frozen=True)
class HubConfig:
    """Settings of one hub (CLI flags; the device config is not involved)."""

    data_dir: Path
    max_upload_bytes: int = 8 << 30
    max_events: int = 500
    max_telemetry_bytes: int = 1 << 20
    #: The signed manifest + acceptance cases of one target: every device downloads all of them
    #: in targets.json (python-tuf clients refuse a targets.json over 5 MB by default).
    max_custom_bytes: int = 64 << 10
    poll_interval_s: int = 60
    expiry: Expiry = field(default_factory=Expiry)
    #: A postgresql:// URL, or an SQLite file (default: DATA/hub.db). Keys, admin token and
    #: artifacts stay in the data directory either way (replicas share it).
    database: str | None = None
    #: Telemetry older than this is dropped by the leader's maintenance (None: kept forever).
    event_retention_days: float | None = 30.0
    #: Device identities kept in memory by token (polls.py); 0 looks every token up.
    device_cache_size: int = DEVICE_CACHE_SIZE

    @property
    def db_path(self) -> Path:
        return self.data_dir / "hub.db"

    @property
    def on_postgres(self) -> bool:
        return self.database is not None and is_database_url(self.database)

    def open_store(self, migrate: bool = False) -> HubStore:
        return open_store(
            self.database or self.db_path,
            migrate=migrate,
            retention_days=self.event_retention_days,
        )

    @property
    def key_dir(self) -> Path:
        return self.data_dir / "keys"

    @property
    def admin_token_path(self) -> Path:
        return self.data_dir / "admin.token"

    @property
    def tmp_dir(self) -> Path:
        return self.data_dir / "tmp"


def default_root_key_dir(data_dir: Path) -> Path:
    """Beside the data directory, never inside it: it is meant to be moved offline."""
    resolved = data_dir.resolve()
    return resolved.parent / f"{resolved.name}-root-key"


def init_hub(config: HubConfig, root_key_dir: Path | None = None) -> tuple[str, Path]:
    """Create the data dir, keys, version 1 of the TUF metadata and the admin token.

    Returns the admin token and where the root key went."""
    data = config.data_dir
    root_key_dir = root_key_dir or default_root_key_dir(data)
    if root_key_dir.resolve().is_relative_to(data.resolve()):
        raise InvalidInput("the root key directory must not lie inside the data directory")
    if not config.on_postgres and config.db_path.exists():
        raise Conflict(f"{data} already holds a hub (hub.db exists)")
    data.mkdir(parents=True, exist_ok=True)
    os.chmod(data, 0o700)  # noqa: PTH101
    store = config.open_store(migrate=True)
    try:
        if store.latest_metadata("root") is not None:
            raise Conflict("this database already holds a hub (it has TUF metadata)")
        root = init_repository(store, config.key_dir, root_key_dir, config.expiry)
    finally:
        store.close()
    (data / "1.root.json").write_bytes(root)
    token = secrets.token_urlsafe(32)
    write_private(config.admin_token_path, (token + "\n").encode())
    (data / "artifacts").mkdir(exist_ok=True)
    return token, root_key_dir


class Hub:
    """One hub over a store, an artifact store and the TUF repository."""

    def __init__(
        self,
        config: HubConfig,
        store: HubStore | None = None,
        artifacts: ArtifactStore | None = None,
    ) -> None:
        self.config = config
        if store is None and not config.on_postgres and not config.db_path.exists():
            raise NotFound(
                f"no hub in {config.data_dir}: run `appliance hub init --data {config.data_dir}`"
            )
        self.store: HubStore = store or config.open_store()
        self.artifacts: ArtifactStore = artifacts or LocalArtifacts(config.data_dir / "artifacts")
        self.repo = TufRepository(self.store, config.key_dir, config.expiry)
        self._admin_hash = self._read_admin_hash()
        #: Since this process started (the stored totals come from the store): per replica.
        self.duplicates = 0
        self.device_cache = DeviceCache(config.device_cache_size)
        self.last_seen = LastSeen()
        self._view: FleetView | None = None
        self._view_lock = threading.Lock()
        #: Changes made through this process: a view read before one is not kept.
        self._changes = 0

    def close(self) -> None:
        self.store.close()

    def _read_admin_hash(self) -> bytes | None:
        try:
            token = self.config.admin_token_path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        return hashlib.sha256(token.encode()).digest() if token else None

    # -- credentials -------------------------------------------------------------------------
    def is_admin(self, token: str) -> bool:
        if self._admin_hash is None:
            return False
        return hmac.compare_digest(hashlib.sha256(token.encode()).digest(), self._admin_hash)

    def device_for_token(self, token: str) -> Device | None:
        """The device a token belongs to: its identity only (id, group; polls.py's cache
        keeps no state): read `store.device()` for what it reported."""
        wanted = token_hash(token)
        cached = self.device_cache.get(wanted)
        if cached is not None:
            return cached
        device = self.store.device_by_token_hash(wanted)
        if device is None or not hmac.compare_digest(device.token_hash, wanted):
            return None
        return self.device_cache.put(device)

    def cached_device(self, token: str) -> Device | None:
        """The device of a token if this process knows it already (no database, no thread)."""
        return self.device_cache.get(token_hash(token))

    def enroll(self, device_id: Any, group: Any = "default") -> str:
        """Register a device; returns its token (shown once, the hub keeps only a hash)."""
        device_id = check_device_id(device_id)
        group = check_device_id(group, "group")
        token = secrets.token_urlsafe(32)
        self.store.add_device(Device(device_id, group, token_hash(token), now_iso(), None))
        log.info("enrolled device %s in group %s", device_id, group)
        return token

    # -- publishing --------------------------------------------------------------------------
    def publish(
        self,
        name: str,
        version: str,
        source: Path,
        backend: str | None = None,
        manifest: dict[str, Any] | None = None,
        acceptance: list[Any] | None = None,
        consume: bool = False,
        progress: Callable[[int], None] | None = None,
    ) -> tuple[Target, bool]:
        """Publish a model file as TUF target "name/version/model.<ext>".

        `progress` is told the bytes copied into the artifact store so far (a big local file).

        Returns the target and whether it is new (publishing identical bytes again is a no-op;
        different bytes under a published version are a 409). `consume`: move `source` into
        the artifact store instead of copying it (an upload already spooled to a temp file)."""
        check_name(name, "model name")
        check_name(version, "version")
        from ..manifest import sha256_file

        backend = backend or detect(source)
        if backend not in SUFFIXES:
            raise InvalidInput(f"unknown backend {backend!r}: one of {', '.join(SUFFIXES)}")
        digest, length = sha256_file(source)
        if length > self.config.max_upload_bytes:
            raise PayloadTooLarge(
                f"model file is {length} bytes, over the limit of "
                f"{self.config.max_upload_bytes} bytes"
            )
        existing = self.store.target(name, version)
        if existing is not None:
            if existing.sha256 == digest:
                return existing, False
            raise Conflict(
                f"model {name!r} version {version!r} is already published with sha256 "
                f"{existing.sha256[:12]}…; versions never change: publish a new version"
            )
        if backend == PIPELINE:  # the declaration is checked here, whatever a client sent
            manifest = inspect_pipeline(source, name)
        elif manifest is None:
            manifest = _inspect(source, backend)
        if not isinstance(manifest, dict):
            raise InvalidInput("the manifest must be a JSON object")
        manifest = {k: manifest[k] for k in MANIFEST_KEYS if manifest.get(k) is not None}
        checked = check_acceptance(acceptance or [])
        filename = PIPELINE_FILE if backend == PIPELINE else "model" + SUFFIXES[backend]
        path = f"{name}/{version}/{filename}"
        key = f"{name}/{version}/{digest}.{filename}"
        custom = encode_custom(name, version, backend, manifest, checked)
        custom_size = len(orjson.dumps(custom))
        if custom_size > self.config.max_custom_bytes:
            raise PayloadTooLarge(
                f"manifest and acceptance cases take {custom_size} bytes, over the limit of "
                f"{self.config.max_custom_bytes} bytes (every device downloads them in "
                "targets.json): use fewer or smaller acceptance cases"
            )
        if consume:
            self.artifacts.put_file(key, source)
        else:
            self.config.tmp_dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.config.tmp_dir, suffix=".copy")
            try:
                with os.fdopen(fd, "wb") as out, source.open("rb") as src:
                    done = 0
                    while block := src.read(1 << 20):
                        out.write(block)
                        done += len(block)
                        if progress is not None:
                            progress(done)
                self.artifacts.put_file(key, Path(tmp))
            finally:  # moved into the store, or half-written (a full disk): gone either way
                Path(tmp).unlink(missing_ok=True)
        target = Target(name, version, path, digest, length, custom, now_iso())
        try:
            self.repo.add_target(
                path, length, digest, custom, lambda: self.store.add_target(target)
            )
        except BaseException:
            stored = self.store.target(name, version)
            if stored is None or stored.sha256 != digest:  # e.g. lost a race to another publish
                self.artifacts.delete(key)
            raise
        self.fleet_changed()
        log.info("published %s (%d bytes, sha256 %s)", path, length, digest[:12])
        return target, True

    def artifact_key(self, target_path: str) -> str:
        """Map a hash-prefixed download path to its artifact key, or raise NotFound.

        Only a published (name, version) with that exact hash and file name is served."""
        parts = target_path.split("/")
        if len(parts) != 3:
            raise NotFound(f"no target file {target_path!r}")
        name, version, base = parts
        digest, _, filename = base.partition(".")
        target = None
        if is_name(name) and is_name(version) and SHA256_RE.match(digest):
            target = self.store.target(name, version)
        if target is None or target.sha256 != digest or target.path.split("/")[-1] != filename:
            raise NotFound(f"no target file {target_path!r}")
        return f"{name}/{version}/{digest}.{filename}"

    # -- rollouts ----------------------------------------------------------------------------
    def create_rollout(self, model: Any, version: Any, target: Any, percent: Any = 100) -> Rollout:
        """Arguments straight from a request: each is validated here."""
        model = check_name(model, "model name")
        version = check_name(version, "version")
        if self.store.target(model, version) is None:
            raise NotFound(f"model {model!r} version {version!r} is not published")
        if not isinstance(percent, int) or isinstance(percent, bool) or not 0 <= percent <= 100:
            raise InvalidInput(f"'percent' must be an integer from 0 to 100, got {percent!r}")
        rollout_target = _check_target(target)
        rollout = self.store.add_rollout(model, version, rollout_target, percent, now_iso())
        self.fleet_changed()
        log.info(
            "rollout %s: %s %s to %s (%d%%)",
            rollout.public_id,
            model,
            version,
            rollout_target,
            percent,
        )
        return rollout

    def rollout(self, rollout_id: str) -> Rollout:
        rollout = self.store.rollout(parse_rollout_id(rollout_id))
        if rollout is None:
            raise NotFound(f"no rollout {rollout_id!r}")
        return rollout

    def halt(self, rollout_id: str) -> Rollout:
        rollout = self.rollout(rollout_id)
        if rollout.state != "active":
            raise Conflict(f"rollout {rollout.public_id} is {rollout.state}, not active")
        self.store.update_rollout(rollout.id, now_iso(), state="halted")
        self.fleet_changed()
        return self.rollout(rollout_id)

    def rollback(self, rollout_id: str) -> Rollout:
        rollout = self.rollout(rollout_id)
        if rollout.state == "rolled_back":
            raise Conflict(f"rollout {rollout.public_id} is already rolled back")
        self.store.update_rollout(rollout.id, now_iso(), state="rolled_back")
        self.fleet_changed()
        return self.rollout(rollout_id)

    def set_percent(self, rollout_id: str, percent: Any) -> Rollout:
        rollout = self.rollout(rollout_id)
        if not isinstance(percent, int) or isinstance(percent, bool) or not 0 <= percent <= 100:
            raise InvalidInput(f"'percent' must be an integer from 0 to 100, got {percent!r}")
        if rollout.state != "active":
            raise Conflict(f"rollout {rollout.public_id} is {rollout.state}, not active")
        self.store.update_rollout(rollout.id, now_iso(), percent=percent)
        self.fleet_changed()
        return self.rollout(rollout_id)

    def assigned(self, device: Device, rollouts: list[Rollout] | None = None) -> list[Rollout]:
        """The rollout that decides each model for this device (rules in the module doc)."""
        rollouts = self.store.rollouts() if rollouts is None else rollouts
        newest_first = sorted(rollouts, key=lambda r: r.id, reverse=True)
        decided = decide(newest_first, device, device.state.get("active") or {})
        return [decided[m] for m in sorted(decided)]

    def assignments(self, device: Device) -> dict[str, Any]:
        """A device's assignments read from the store (its reported state included)."""
        device = self.store.device(device.device_id) or device
        models = []
        for r in self.assigned(device):
            target = self.store.target(r.model, r.version)
            if target is None:  # cannot happen: rollouts need a published target
                continue
            models.append(
                {
                    "name": r.model,
                    "version": r.version,
                    "target": target.path,
                    "rollout": r.public_id,
                }
            )
        return {
            "device_id": device.device_id,
            "models": models,
            "poll_interval_s": self.config.poll_interval_s,
        }

    # -- polls from memory (polls.py) --------------------------------------------------------
    def fleet_changed(self) -> None:
        """Rollouts or targets changed through this process: the next poll re-reads them."""
        with self._view_lock:
            self._changes += 1
            self._view = None

    def fleet_view(self) -> FleetView | None:
        """What polls are answered from, if read since the last change (no database)."""
        return self._view

    def load_fleet_view(self) -> FleetView:
        """Read rollouts and target paths at the store's current generation (blocking)."""
        with self._view_lock:
            if self._view is not None:
                return self._view
            changes = self._changes
        generation = self.store.generation()  # first: a change after it is seen next time
        rollouts = sorted(self.store.rollouts(), key=lambda r: r.id, reverse=True)
        paths = {(t.name, t.version): t.path for t in self.store.targets()}
        view = FleetView(generation, tuple(rollouts), paths, self.config.poll_interval_s)
        with self._view_lock:
            if self._changes == changes:  # else a change came meanwhile: not kept
                self._view = view
        return view

    def check_fleet(self) -> bool:
        """Drop the view if the store's generation moved (a CLI, another replica); blocking.
        Returns whether it was dropped."""
        view = self._view
        if view is None or self.store.generation() == view.generation:
            return False
        self.fleet_changed()
        return True

    def poll(self, device: Device, view: FleetView) -> dict[str, Any]:
        """A device's assignments from `view`; NeedsState when a halted rollout needs what
        the device reported (then `assignments()` reads the store)."""
        return {
            "device_id": device.device_id,
            "models": view.models(device, None),
            "poll_interval_s": view.poll_interval_s,
        }

    def touch(self, device: Device) -> None:
        """Note that the device was seen now; written by `flush_last_seen`."""
        self.last_seen.note(device.device_id)

    def flush_last_seen(self) -> int:
        """Write the pending last-seen stamps in one transaction (blocking); how many."""
        stamps = self.last_seen.take()
        try:
            self.store.touch_devices(stamps)
        except BaseException:
            self.last_seen.put_back(stamps)
            raise
        return len(stamps)

    # -- telemetry ---------------------------------------------------------------------------
    def telemetry(self, device: Device, body: Any) -> dict[str, int]:
        """Store a batch at least once delivered; each (device, seq) is kept exactly once."""
        result = self.store_telemetry([(device, self.check_telemetry(device, body))])[0]
        if isinstance(result, BaseException):
            raise result
        self.touch(device)
        return result

    def store_telemetry(
        self, uploads: Sequence[tuple[Device, list[Event]]]
    ) -> list[dict[str, int] | Exception]:
        """Several devices' checked uploads in one transaction (a group commit: one commit,
        one fsync for all). Each upload's answer, or the exception that failed it: when the
        whole transaction fails, each upload is tried again alone, so that one bad upload
        fails only its own request."""
        # Device order, a device's uploads in arrival order: rows and locks always taken in
        # one order (no deadlock between writers, replicas, the last-seen writer).
        order = sorted(range(len(uploads)), key=lambda i: uploads[i][0].device_id)
        keys = sorted({f"device/{d.device_id}" for d, _ in uploads})
        results: dict[int, dict[str, int]] = {}
        try:
            with ExitStack() as stack:
                for key in keys:  # concurrent batches of one device (on any replica) queue
                    stack.enter_context(self.store.transaction(key))
                for i in order:
                    results[i] = self._store_events(*uploads[i])
        except Exception as exc:
            if len(uploads) == 1:
                return [exc]
            return [self.store_telemetry([u])[0] for u in uploads]
        for r in results.values():
            self.duplicates += r["duplicates"]
        return [results[i] for i in range(len(uploads))]

    def _store_events(self, device: Device, events: list[Event]) -> dict[str, int]:
        new = self.store.add_events(events)
        fresh = self.store.device(device.device_id) or device
        self._apply(fresh, sorted(new, key=lambda e: e.seq))
        return {
            "stored": len(new),
            "duplicates": len(events) - len(new),
            "max_seq": self.store.max_seq(device.device_id),
        }

    def check_telemetry(self, device: Device, body: Any) -> list[Event]:
        """An upload's events, checked (a 400 naming the event and field)."""
        if not isinstance(body, dict) or not isinstance(body.get("events"), list):
            raise InvalidInput('telemetry body must be {"events": [...]}')
        raw = body["events"]
        if len(raw) > self.config.max_events:
            raise PayloadTooLarge(
                f"{len(raw)} events in one batch, over the limit of {self.config.max_events}"
            )
        received = now_iso()
        events = []
        seen: set[int] = set()
        for i, e in enumerate(raw):
            events.append(_check_event(device.device_id, e, i, received))
            if events[-1].seq in seen:
                raise InvalidInput(f"events[{i}]: seq {events[-1].seq} appears twice in the batch")
            seen.add(events[-1].seq)
        return events

    def _apply(self, device: Device, events: list[Event]) -> None:
        """Fold new events into the device's state; late (older) events do not overwrite it."""
        state = dict(device.state)
        seq = device.state_seq
        for e in events:
            if e.seq <= seq:
                continue
            seq = e.seq
            d = e.data
            active = dict(state.get("active") or {})
            if e.kind == "status":
                for key in ("active", "pending"):
                    if isinstance(d.get(key), dict):
                        state[key] = d[key]
                if "tuf" in d:
                    state["tuf"] = d["tuf"]
                if "last_error" in d:
                    state["last_error"] = d["last_error"]
            elif e.kind == "activated" and isinstance(d.get("model"), str):
                active[d["model"]] = d.get("version")
                state["active"] = active
            elif e.kind == "rolled_back" and isinstance(d.get("model"), str):
                active[d["model"]] = d.get("to")
                state["active"] = active
                _note_failure(state, d["model"], d.get("from"), e.kind)
                state["last_error"] = (
                    f"{d['model']}: rolled back from {d.get('from')} to {d.get('to')}: "
                    f"{d.get('reason')}"
                )
            elif e.kind in ("update_failed", "verification_failed"):
                if isinstance(d.get("model"), str):
                    _note_failure(state, d["model"], d.get("version"), e.kind)
                stage = f" ({d['stage']})" if "stage" in d else ""
                state["last_error"] = (
                    f"{e.kind}{stage}: {d.get('model')} {d.get('version')}: {d.get('reason')}"
                )
            elif e.kind == "dropped":
                state["dropped"] = int(state.get("dropped", 0)) + int(d.get("count", 0) or 0)
            state["last_event"] = {"seq": e.seq, "kind": e.kind, "time": e.time}
        if seq != device.state_seq:
            self.store.set_device_state(device.device_id, state, seq)

    def periodic(self) -> list[str]:
        """The leader's work (one replica at a time): re-sign expiring metadata, expire old
        telemetry. Returns the roles re-signed; [] also when another replica leads."""
        if not self.store.is_leader():
            return []
        from .repository import utcnow

        resigned = self.repo.refresh()
        self.store.maintain(utcnow())
        return resigned

    def events(self, device_id: str, after: int = 0, limit: int = 1000) -> list[dict[str, Any]]:
        if self.store.device(device_id) is None:
            raise NotFound(f"no device {device_id!r}")
        return [e.to_json() for e in self.store.events(device_id, after, min(limit, 10000))]

    # -- fleet view --------------------------------------------------------------------------
    def devices(self) -> list[dict[str, Any]]:
        self.flush_last_seen()  # what this process saw, in the list
        rollouts = self.store.rollouts()
        out = []
        for d in self.store.devices():
            active = d.state.get("active") or {}
            failures = d.state.get("failures") or {}
            pending = {
                r.model: r.version
                for r in self.assigned(d, rollouts)
                if active.get(r.model) != r.version
                and not _refused_for_good(failures.get(r.model), r.version)
            }
            out.append(
                {
                    "device_id": d.device_id,
                    "group": d.group,
                    "enrolled_at": d.enrolled_at,
                    "last_seen": d.last_seen,
                    "active": active,
                    "pending": pending,
                    "last_error": d.state.get("last_error"),
                    "tuf": d.state.get("tuf"),
                    "last_seq": d.state_seq,
                }
            )
        return out


def _note_failure(state: dict[str, Any], model: str, version: Any, kind: str) -> None:
    """The last version of each model that failed or was rolled back on the device, kept
    structured (the dashboard counts them per rollout; `last_error` is only text)."""
    failures = dict(state.get("failures") or {})
    before = failures.get(model) or {}
    if kind == "rolled_back" and before.get("version") == version:
        return  # the agent follows a failed update with a rollback: it failed, first of all
    failures[model] = {"version": version, "kind": kind}
    state["failures"] = failures


def _refused_for_good(failure: Any, version: str) -> bool:
    """The agent never retries a version that failed to load or pass acceptance, or that it
    rolled back; a failed verification (expired metadata, an unreachable file) it retries."""
    return (
        isinstance(failure, dict)
        and failure.get("version") == version
        and failure.get("kind") in ("update_failed", "rolled_back")
    )


def require_device(
    hub: Hub, token: str, claimed_id: str | None, device: Device | None = None
) -> Device:
    """The device of `token` (`device`: already found), checked against X-Device-Id."""
    if device is None:
        device = hub.device_for_token(token) if token else None
    if device is None:
        raise Unauthorized("missing or unknown device token")
    if claimed_id is not None and claimed_id != device.device_id:
        raise Forbidden(f"this token belongs to another device than {claimed_id!r}")
    return device


def _check_target(target: Any) -> dict[str, Any]:
    if isinstance(target, dict) and len(target) == 1:
        if target.get("all") is True:
            return {"all": True}
        if "group" in target:
            return {"group": check_device_id(target["group"], "group")}
        devices = target.get("devices")
        if isinstance(devices, list) and devices:
            return {"devices": sorted({check_device_id(d) for d in devices})}
    raise InvalidInput(
        'rollout \'target\' must be {"all": true}, {"group": "G"} or {"devices": ["id", ...]}'
    )


def _check_event(device_id: str, e: Any, i: int, received: str) -> Event:
    where = f"events[{i}]"
    if not isinstance(e, dict):
        raise InvalidInput(f"{where} must be an object")
    seq = e.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool) or not 1 <= seq < MAX_SEQ:
        raise InvalidInput(f"{where}.seq must be a positive integer, got {seq!r}")
    kind = e.get("kind")
    if not isinstance(kind, str) or not KIND_RE.match(kind):
        raise InvalidInput(f"{where}.kind must be a short name, got {kind!r}")
    time = e.get("time")
    if not isinstance(time, str) or not 0 < len(time) <= 64:
        raise InvalidInput(f"{where}.time must be an ISO 8601 string, got {time!r}")
    data = e.get("data", {})
    if not isinstance(data, dict):
        raise InvalidInput(f"{where}.data must be an object")
    return Event(device_id, seq, time, kind, data, received)


def check_acceptance(cases: Any) -> list[dict[str, Any]]:
    """The acceptance cases a device runs before activating (KServe v2 JSON tensors)."""
    if not isinstance(cases, list):
        raise InvalidInput("acceptance must be a JSON list of cases")
    out = []
    for i, c in enumerate(cases):
        if (
            not isinstance(c, dict)
            or not isinstance(c.get("inputs"), list)
            or not isinstance(c.get("outputs"), list)
        ):
            raise InvalidInput(f"acceptance[{i}] must be an object with 'inputs' and 'outputs'")
        rtol, atol = c.get("rtol", 1e-4), c.get("atol", 1e-5)
        for label, v in (("rtol", rtol), ("atol", atol)):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
                raise InvalidInput(f"acceptance[{i}].{label} must be a number >= 0")
        out.append(
            {
                "inputs": c["inputs"],
                "outputs": c["outputs"],
                "rtol": float(rtol),
                "atol": float(atol),
            }
        )
    return out


def detect(path: Path) -> str:
    """The backend of a file to publish: a .json file is a pipeline declaration."""
    if path.suffix.lower() == ".json":
        return PIPELINE
    from ..backends import detect_backend

    try:
        return detect_backend(path)
    except ApplianceError as exc:
        raise InvalidInput(exc.message) from None


def inspect_pipeline(path: Path, name: str) -> dict[str, Any]:
    """A pipeline declaration checked on its own (JSON, steps, wiring: a 400 naming the node
    and key), its inputs as the manifest's. Which models it binds to is the device's check
    (it binds against what the device serves). A version is one file: a declaration naming
    template files is refused (they would not travel with it)."""
    from ..pipelines.declaration import parse

    try:
        doc = orjson.loads(path.read_bytes())
        decl = parse(doc, name)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"pipeline {name!r}: not valid JSON: {exc}") from None
    except ApplianceError as exc:
        raise InvalidInput(exc.message) from None
    if decl.templates:
        raise InvalidInput(
            f"pipeline {name!r}: templates: a published pipeline is one file; template "
            "files are not rolled out (declare the templates on the device)"
        )
    return {"inputs": [t.to_json() for t in decl.inputs]}


def _inspect(path: Path, backend: str) -> dict[str, Any]:
    """Serving fields of the store manifest, read from the model when its runtime is here."""
    try:
        from ..backends import get_backend

        signature, params = get_backend(backend).inspect(path)
    except Exception as exc:  # a hub without the runtime still publishes, without signature
        log.warning(
            "cannot inspect %s with %s (%s): publishing without inputs/outputs", path, backend, exc
        )
        return {}
    return {
        "inputs": [t.to_json() for t in signature.inputs],
        "outputs": [t.to_json() for t in signature.outputs],
        "parameters": params,
    }


def read_json_file(path: Path, what: str) -> Any:
    try:
        return orjson.loads(path.read_bytes())
    except OSError as exc:
        raise InvalidInput(f"cannot read {what} {path}: {exc.strerror}") from None
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"{what} {path} is not valid JSON: {exc}") from None
