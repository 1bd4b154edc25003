"""The hub's state behind one small interface, `HubStore`; `SQLiteStore` is the embedded default.

Everything the hub knows lives here: devices (a hash of each token, never the token), published
targets, rollouts, telemetry events (unique per device and sequence number) and the signed TUF
metadata itself, so that a fleet moving to PostgreSQL moves the repository with it. Writers that
must not interleave (a publish and the background re-signing) run inside `transaction()`, which
is an SQLite write lock across processes here and an advisory lock on PostgreSQL (pgstore.py,
selected by `open_store` from a postgresql:// URL). The queries both engines share live once in
sqlstore.py; the records themselves in records.py (re-exported here).
"""

from __future__ import annotations

import datetime as dt
import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import orjson

from .errors import Conflict
from .records import Device, Event, Rollout, Target
from .sqlstore import SqlStore

__all__ = [
    "Device",
    "Event",
    "HubStore",
    "Rollout",
    "SQLiteStore",
    "Target",
    "is_database_url",
    "open_store",
]


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
    def touch_devices(self, stamps: Mapping[str, str]) -> None:
        """Last-seen stamps of many devices at once; never moves a stamp back in time."""

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

    # what polls answer
    def generation(self) -> int:
        """Increased by every change to rollouts or targets, by any process or replica."""

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
CREATE TABLE IF NOT EXISTS fleet (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    generation INTEGER NOT NULL
);
INSERT OR IGNORE INTO fleet (id, generation) VALUES (1, 0);
CREATE TABLE IF NOT EXISTS metadata (
    role TEXT NOT NULL,
    version INTEGER NOT NULL,
    body BLOB NOT NULL,
    PRIMARY KEY (role, version)
);
"""


class SQLiteStore(SqlStore):
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

    def _exec_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        with self._lock:
            self._conn.executemany(sql, rows)

    def _insert(self, sql: str, args: Sequence[Any], conflict: str) -> None:
        try:
            self._exec(sql, args)
        except sqlite3.IntegrityError:
            raise Conflict(conflict) from None

    def add_rollout(
        self, model: str, version: str, target: dict[str, Any], percent: int, when: str
    ) -> Rollout:
        with self.transaction("fleet"):
            cur = self._conn.execute(
                self._ADD_ROLLOUT, self._rollout_args(model, version, target, percent, when)
            )
            rollout_id = cur.lastrowid
            self.bump_generation()
        assert rollout_id is not None
        rollout = self.rollout(rollout_id)
        assert rollout is not None
        return rollout

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
