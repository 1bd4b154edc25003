"""The hub's state behind one small interface, `HubStore`; `SQLiteStore` is the embedded default.

Everything the hub knows lives here: devices (a hash of each token, never the token), published
targets, rollouts, telemetry events (unique per device and sequence number) and the signed TUF
metadata itself, so that a fleet moving to PostgreSQL moves the repository with it. Writers that
must not interleave (a publish and the background re-signing) run inside `transaction()`, which
is an SQLite write lock across processes here and an advisory lock on PostgreSQL (pgstore.py,
selected by `open_store` from a postgresql:// URL).
"""

from __future__ import annotations

import datetime as dt
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import orjson

from .errors import Conflict


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


class HubStore(Protocol):
    """What the hub needs from a database; small enough to reimplement on PostgreSQL."""

    def transaction(self, key: str = "hub") -> Any:
        """A context manager that serialises writers (re-entrant in one thread). Writers with
        the same `key` never interleave; a store may serialise more (SQLite: every writer)."""

    def is_leader(self) -> bool:
        """Whether this process runs the periodic work (re-signing, maintenance): one replica
        at a time on a shared database; always the one process on SQLite."""

    def maintain(self, now: dt.datetime) -> dict[str, int]:
        """Periodic upkeep by the leader: expire telemetry past the retention."""

    # devices
    def add_device(self, device: Device) -> None: ...
    def device(self, device_id: str) -> Device | None: ...
    def device_by_token_hash(self, token_hash: str) -> Device | None: ...
    def devices(self) -> list[Device]: ...
    def touch_device(self, device_id: str, when: str) -> None: ...
    def set_device_state(self, device_id: str, state: dict[str, Any], state_seq: int) -> None: ...

    # targets
    def add_target(self, target: Target) -> None: ...
    def target(self, name: str, version: str) -> Target | None: ...
    def targets(self) -> list[Target]: ...

    # rollouts
    def add_rollout(
        self, model: str, version: str, target: dict[str, Any], percent: int, when: str
    ) -> Rollout: ...
    def rollout(self, rollout_id: int) -> Rollout | None: ...
    def rollouts(self) -> list[Rollout]: ...
    def update_rollout(self, rollout_id: int, when: str, **changes: Any) -> None: ...

    # telemetry
    def add_events(self, events: Sequence[Event]) -> list[Event]:
        """Store the events not stored yet; returns those that were new."""

    def events(self, device_id: str, after: int, limit: int) -> list[Event]: ...
    def max_seq(self, device_id: str) -> int: ...
    def count_events(self) -> int: ...

    # TUF metadata
    def put_metadata(self, role: str, version: int, body: bytes) -> None: ...
    def metadata(self, role: str, version: int) -> bytes | None: ...
    def latest_metadata(self, role: str) -> tuple[int, bytes] | None: ...
    def prune_metadata(self, role: str, below: int) -> None:
        """Forget versions of `role` older than `below` (never used for root)."""

    def close(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY,
    grp TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    enrolled_at TEXT NOT NULL,
    last_seen TEXT,
    state TEXT NOT NULL DEFAULT '{}',
    state_seq INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS targets (
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    path TEXT NOT NULL UNIQUE,
    sha256 TEXT NOT NULL,
    length INTEGER NOT NULL,
    custom TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE TABLE IF NOT EXISTS rollouts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    model TEXT NOT NULL,
    version TEXT NOT NULL,
    target TEXT NOT NULL,
    percent INTEGER NOT NULL,
    state TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    device_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    time TEXT NOT NULL,
    kind TEXT NOT NULL,
    data TEXT NOT NULL,
    received_at TEXT NOT NULL,
    PRIMARY KEY (device_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS metadata (
    role TEXT NOT NULL,
    version INTEGER NOT NULL,
    body BLOB NOT NULL,
    PRIMARY KEY (role, version)
);
"""


class SQLiteStore:
    """SQLite in WAL mode: the server and a CLI on the same data directory can both write.

    One connection per store, guarded by a lock (aiohttp handlers hand their calls to threads);
    `transaction()` takes SQLite's write lock up front (BEGIN IMMEDIATE) so two processes
    signing metadata queue up instead of failing half-way.
    """

    def __init__(self, path: Path, retention_days: float | None = 30.0) -> None:
        self.path = path
        self.retention_days = retention_days
        self._conn = sqlite3.connect(
            str(path), isolation_level=None, check_same_thread=False, timeout=30.0
        )
        self._lock = threading.RLock()
        self._depth = 0
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._conn.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def is_leader(self) -> bool:
        return True

    def maintain(self, now: dt.datetime) -> dict[str, int]:
        if not self.retention_days:
            return {"events_deleted": 0}
        cutoff = (now - dt.timedelta(days=self.retention_days)).astimezone(dt.timezone.utc)
        n = self._exec(
            "DELETE FROM events WHERE received_at < ?",
            (cutoff.isoformat(timespec="seconds").replace("+00:00", "Z"),),
        )
        return {"events_deleted": n}

    @contextmanager
    def transaction(self, key: str = "hub") -> Iterator[None]:
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            self._conn.execute("BEGIN IMMEDIATE")
            self._depth = 1
            try:
                yield
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            else:
                self._conn.execute("COMMIT")
            finally:
                self._depth = 0

    def _rows(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return list(self._conn.execute(sql, args).fetchall())

    def _exec(self, sql: str, args: Sequence[Any] = ()) -> int:
        with self._lock:
            return self._conn.execute(sql, args).rowcount

    # -- devices -----------------------------------------------------------------------------
    @staticmethod
    def _device(row: tuple[Any, ...]) -> Device:
        return Device(row[0], row[1], row[2], row[3], row[4], orjson.loads(row[5]), row[6])

    _DEVICE_COLS = "device_id, grp, token_hash, enrolled_at, last_seen, state, state_seq"

    def add_device(self, device: Device) -> None:
        try:
            self._exec(
                f"INSERT INTO devices ({self._DEVICE_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
                (
                    device.device_id,
                    device.group,
                    device.token_hash,
                    device.enrolled_at,
                    device.last_seen,
                    orjson.dumps(device.state).decode(),
                    device.state_seq,
                ),
            )
        except sqlite3.IntegrityError:
            raise Conflict(f"device {device.device_id!r} is already enrolled") from None

    def device(self, device_id: str) -> Device | None:
        rows = self._rows(
            f"SELECT {self._DEVICE_COLS} FROM devices WHERE device_id = ?",  # noqa: S608
            (device_id,),
        )
        return self._device(rows[0]) if rows else None

    def device_by_token_hash(self, token_hash: str) -> Device | None:
        rows = self._rows(
            f"SELECT {self._DEVICE_COLS} FROM devices WHERE token_hash = ?",  # noqa: S608
            (token_hash,),
        )
        return self._device(rows[0]) if rows else None

    def devices(self) -> list[Device]:
        rows = self._rows(f"SELECT {self._DEVICE_COLS} FROM devices ORDER BY device_id")  # noqa: S608
        return [self._device(r) for r in rows]

    def touch_device(self, device_id: str, when: str) -> None:
        self._exec("UPDATE devices SET last_seen = ? WHERE device_id = ?", (when, device_id))

    def set_device_state(self, device_id: str, state: dict[str, Any], state_seq: int) -> None:
        self._exec(
            "UPDATE devices SET state = ?, state_seq = ? WHERE device_id = ?",
            (orjson.dumps(state).decode(), state_seq, device_id),
        )

    # -- targets -----------------------------------------------------------------------------
    _TARGET_COLS = "name, version, path, sha256, length, custom, created_at"

    @staticmethod
    def _target(row: tuple[Any, ...]) -> Target:
        return Target(row[0], row[1], row[2], row[3], row[4], orjson.loads(row[5]), row[6])

    def add_target(self, target: Target) -> None:
        try:
            self._exec(
                f"INSERT INTO targets ({self._TARGET_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
                (
                    target.name,
                    target.version,
                    target.path,
                    target.sha256,
                    target.length,
                    orjson.dumps(target.custom).decode(),
                    target.created_at,
                ),
            )
        except sqlite3.IntegrityError:
            raise Conflict(
                f"model {target.name!r} version {target.version!r} is already published"
            ) from None

    def target(self, name: str, version: str) -> Target | None:
        rows = self._rows(
            f"SELECT {self._TARGET_COLS} FROM targets WHERE name = ? AND version = ?",  # noqa: S608
            (name, version),
        )
        return self._target(rows[0]) if rows else None

    def targets(self) -> list[Target]:
        rows = self._rows(f"SELECT {self._TARGET_COLS} FROM targets ORDER BY name, created_at")  # noqa: S608
        return [self._target(r) for r in rows]

    # -- rollouts ----------------------------------------------------------------------------
    _ROLLOUT_COLS = "id, model, version, target, percent, state, created_at, updated_at"

    @staticmethod
    def _rollout(row: tuple[Any, ...]) -> Rollout:
        return Rollout(row[0], row[1], row[2], orjson.loads(row[3]), row[4], row[5], row[6], row[7])

    def add_rollout(
        self, model: str, version: str, target: dict[str, Any], percent: int, when: str
    ) -> Rollout:
        with self._lock:
            cur = self._conn.execute(
                "INSERT INTO rollouts (model, version, target, percent, state, created_at,"
                " updated_at) VALUES (?, ?, ?, ?, 'active', ?, ?)",
                (model, version, orjson.dumps(target).decode(), percent, when, when),
            )
            rollout_id = cur.lastrowid
        assert rollout_id is not None
        rollout = self.rollout(rollout_id)
        assert rollout is not None
        return rollout

    def rollout(self, rollout_id: int) -> Rollout | None:
        rows = self._rows(
            f"SELECT {self._ROLLOUT_COLS} FROM rollouts WHERE id = ?",  # noqa: S608
            (rollout_id,),
        )
        return self._rollout(rows[0]) if rows else None

    def rollouts(self) -> list[Rollout]:
        rows = self._rows(f"SELECT {self._ROLLOUT_COLS} FROM rollouts ORDER BY id")  # noqa: S608
        return [self._rollout(r) for r in rows]

    def update_rollout(self, rollout_id: int, when: str, **changes: Any) -> None:
        allowed = {"state", "percent"}
        if not changes or set(changes) - allowed:
            raise ValueError(f"update_rollout takes only {sorted(allowed)}")
        sets = ", ".join(f"{k} = ?" for k in changes)
        self._exec(
            f"UPDATE rollouts SET {sets}, updated_at = ? WHERE id = ?",  # noqa: S608
            (*changes.values(), when, rollout_id),
        )

    # -- telemetry ---------------------------------------------------------------------------
    def add_events(self, events: Sequence[Event]) -> list[Event]:
        new = []
        with self.transaction():
            for e in events:
                n = self._exec(
                    "INSERT OR IGNORE INTO events (device_id, seq, time, kind, data, received_at)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (e.device_id, e.seq, e.time, e.kind, orjson.dumps(e.data), e.received_at),
                )
                if n == 1:
                    new.append(e)
        return new

    def events(self, device_id: str, after: int, limit: int) -> list[Event]:
        rows = self._rows(
            "SELECT device_id, seq, time, kind, data, received_at FROM events"
            " WHERE device_id = ? AND seq > ? ORDER BY seq LIMIT ?",
            (device_id, after, limit),
        )
        return [Event(r[0], r[1], r[2], r[3], orjson.loads(r[4]), r[5]) for r in rows]

    def max_seq(self, device_id: str) -> int:
        rows = self._rows("SELECT MAX(seq) FROM events WHERE device_id = ?", (device_id,))
        return int(rows[0][0] or 0)

    def count_events(self) -> int:
        return int(self._rows("SELECT COUNT(*) FROM events")[0][0])

    # -- TUF metadata ------------------------------------------------------------------------
    def put_metadata(self, role: str, version: int, body: bytes) -> None:
        try:
            self._exec(
                "INSERT INTO metadata (role, version, body) VALUES (?, ?, ?)",
                (role, version, body),
            )
        except sqlite3.IntegrityError:
            raise Conflict(f"{role} metadata version {version} already exists") from None

    def metadata(self, role: str, version: int) -> bytes | None:
        rows = self._rows(
            "SELECT body FROM metadata WHERE role = ? AND version = ?", (role, version)
        )
        return bytes(rows[0][0]) if rows else None

    def latest_metadata(self, role: str) -> tuple[int, bytes] | None:
        rows = self._rows(
            "SELECT version, body FROM metadata WHERE role = ? ORDER BY version DESC LIMIT 1",
            (role,),
        )
        return (int(rows[0][0]), bytes(rows[0][1])) if rows else None

    def prune_metadata(self, role: str, below: int) -> None:
        if role == "root":
            raise ValueError("root metadata versions are a chain: never pruned")
        self._exec("DELETE FROM metadata WHERE role = ? AND version < ?", (role, below))


def is_database_url(database: str) -> bool:
    return database.startswith(("postgresql://", "postgres://"))


def open_store(
    database: str | Path, *, migrate: bool = False, retention_days: float | None = 30.0
) -> HubStore:
    """A postgresql:// URL opens `PostgresStore` (psycopg imported only then; `migrate` applies
    pending schema migrations first); anything else is the path of an SQLite file."""
    if isinstance(database, str) and is_database_url(database):
        try:
            from .pgstore import PostgresStore
        except ModuleNotFoundError as exc:
            from ..errors import ConfigError

            raise ConfigError(
                f"a PostgreSQL hub needs {exc.name}: pip install 'appliance[hub]'"
            ) from None
        return PostgresStore(database, apply_migrations=migrate, retention_days=retention_days)
    return SQLiteStore(Path(database), retention_days=retention_days)
