"""`SqlStore`: the part of the `HubStore` that SQLite and PostgreSQL share, written once.

The queries are written with `?` placeholders (SQLite's qmark style); an engine whose driver
wants another style converts them in its `_rows`/`_exec`/`_insert` (PostgresStore: `%s`), so
no query here may hold a literal `?` or `%`. Values are mapped back to the records with `int()`
where a driver may hand back another integer type. What differs per engine stays in the
subclasses: connections, `transaction()` and its locks, leadership, `maintain()`, how a unique
key violation is detected (`_insert`), and the two batch writes `add_rollout`/`add_events`.
"""

from __future__ import annotations

import datetime as dt
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from .records import Device, Event, Rollout, Target


class SqlStore(ABC):
    """The shared queries and row mappers; a subclass supplies the engine underneath."""

    @abstractmethod
    def transaction(self, key: str = "hub") -> Any: ...

    @abstractmethod
    def is_leader(self) -> bool: ...

    @abstractmethod
    def maintain(self, now: dt.datetime) -> dict[str, int]: ...

    @abstractmethod
    def close(self) -> None: ...

    @abstractmethod
    def _rows(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """The rows a query returns."""

    @abstractmethod
    def _exec(self, sql: str, args: Sequence[Any] = ()) -> int:
        """Run a statement; the number of rows it changed."""

    @abstractmethod
    def _exec_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """Run a statement once per row of arguments (one round of the driver)."""

    @abstractmethod
    def _insert(self, sql: str, args: Sequence[Any], conflict: str) -> None:
        """An insert that may hit a unique key: the violation becomes `Conflict(conflict)`."""

    @abstractmethod
    def add_rollout(
        self, model: str, version: str, target: dict[str, Any], percent: int, when: str
    ) -> Rollout: ...

    @abstractmethod
    def add_events(self, events: Sequence[Event]) -> list[Event]: ...

    # -- devices -----------------------------------------------------------------------------
    _DEVICE_COLS = "device_id, grp, token_hash, enrolled_at, last_seen, state, state_seq"

    @staticmethod
    def _device(row: tuple[Any, ...]) -> Device:
        return Device(row[0], row[1], row[2], row[3], row[4], orjson.loads(row[5]), int(row[6]))

    def add_device(self, device: Device) -> None:
        self._insert(
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
            f"device {device.device_id!r} is already enrolled",
        )

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

    def touch_devices(self, stamps: Mapping[str, str]) -> None:
        """Many last-seen stamps in one transaction (the server batches them, service.py);
        an older stamp never overwrites a newer one (another replica may have flushed first).
        Rows in device order: a telemetry batch locks rows in that order too (no deadlock)."""
        if not stamps:
            return
        with self.transaction("last-seen"):
            self._exec_many(
                "UPDATE devices SET last_seen = ? WHERE device_id = ?"
                " AND (last_seen IS NULL OR last_seen < ?)",
                [(when, device_id, when) for device_id, when in sorted(stamps.items())],
            )

    def set_device_state(self, device_id: str, state: dict[str, Any], state_seq: int) -> None:
        self._exec(
            "UPDATE devices SET state = ?, state_seq = ? WHERE device_id = ?",
            (orjson.dumps(state).decode(), state_seq, device_id),
        )

    # -- targets -----------------------------------------------------------------------------
    _TARGET_COLS = "name, version, path, sha256, length, custom, created_at"

    @staticmethod
    def _target(row: tuple[Any, ...]) -> Target:
        return Target(row[0], row[1], row[2], row[3], int(row[4]), orjson.loads(row[5]), row[6])

    def add_target(self, target: Target) -> None:
        self._insert(
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
            f"model {target.name!r} version {target.version!r} is already published",
        )
        self.bump_generation()

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
    #: The insert both engines run; PostgreSQL appends RETURNING, SQLite reads lastrowid.
    _ADD_ROLLOUT = (
        "INSERT INTO rollouts (model, version, target, percent, state, created_at,"
        " updated_at) VALUES (?, ?, ?, ?, 'active', ?, ?)"
    )

    @staticmethod
    def _rollout(row: tuple[Any, ...]) -> Rollout:
        return Rollout(
            int(row[0]), row[1], row[2], orjson.loads(row[3]), row[4], row[5], row[6], row[7]
        )

    @staticmethod
    def _rollout_args(
        model: str, version: str, target: dict[str, Any], percent: int, when: str
    ) -> tuple[Any, ...]:
        return (model, version, orjson.dumps(target).decode(), percent, when, when)

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
        with self.transaction("fleet"):
            self._exec(
                f"UPDATE rollouts SET {sets}, updated_at = ? WHERE id = ?",  # noqa: S608
                (*changes.values(), when, rollout_id),
            )
            self.bump_generation()

    # -- fleet generation --------------------------------------------------------------------
    def generation(self) -> int:
        """A number every change to what polls answer (rollouts, targets) increases: a server
        compares it to decide whether the assignments it keeps in memory are stale."""
        rows = self._rows("SELECT generation FROM fleet WHERE id = 1")
        return int(rows[0][0]) if rows else 0

    def bump_generation(self) -> None:
        self._exec("UPDATE fleet SET generation = generation + 1 WHERE id = 1")

    # -- telemetry ---------------------------------------------------------------------------
    def events(self, device_id: str, after: int, limit: int) -> list[Event]:
        rows = self._rows(
            "SELECT device_id, seq, time, kind, data, received_at FROM events"
            " WHERE device_id = ? AND seq > ? ORDER BY seq LIMIT ?",
            (device_id, after, limit),
        )
        return [Event(r[0], int(r[1]), r[2], r[3], orjson.loads(r[4]), r[5]) for r in rows]

    def max_seq(self, device_id: str) -> int:
        rows = self._rows("SELECT MAX(seq) FROM events WHERE device_id = ?", (device_id,))
        return int(rows[0][0] or 0)

    def count_events(self) -> int:
        return int(self._rows("SELECT COUNT(*) FROM events")[0][0])

    # -- TUF metadata ------------------------------------------------------------------------
    def put_metadata(self, role: str, version: int, body: bytes) -> None:
        self._insert(
            "INSERT INTO metadata (role, version, body) VALUES (?, ?, ?)",
            (role, version, body),
            f"{role} metadata version {version} already exists",
        )

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
