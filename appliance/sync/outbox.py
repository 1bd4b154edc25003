"""The telemetry outbox: events are written to SQLite first, uploaded when the hub is reachable.

Each event gets a sequence number from an AUTOINCREMENT key, which SQLite never reuses, even
after rows are deleted, so (device, seq) identifies an event for the hub's deduplication across
restarts. The database runs in WAL mode with synchronous=FULL: once `append` returns, a SIGKILL
or a power cut loses nothing. Rows leave only when the hub has acknowledged them, so delivery is
at least once and the hub's unique key makes it exactly once.

Disk use is capped by a running total of the stored rows' sizes: when an append would pass the
cap, the oldest rows are deleted and a "dropped" event (count, first and last seq) is appended,
so a loss is always reported, never silent. A full disk (SQLITE_FULL, or the OS saying so) is
the same kind of loss: `append` does not raise, it counts the event as dropped, and once a write
succeeds again (space returned) a "dropped" event with `reason: "disk_full"` reports how many
were lost. Calls block on fsync: the agent runs them in a thread.
"""

from __future__ import annotations

import datetime as dt
import logging
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from ..errors import is_disk_full

#: Bytes counted per row beside its JSON (key, time, kind, b-tree overhead).
ROW_OVERHEAD = 64
_SIZE = f"length(data) + length(kind) + {ROW_OVERHEAD}"
_TOTALS = f"SELECT COUNT(*), COALESCE(SUM({_SIZE}), 0) FROM events"  # noqa: S608 (constants)
log = logging.getLogger("appliance.sync")
#: Whether an error means a full disk (OS or SQLite).
disk_full = is_disk_full


@dataclass(frozen=True)
class Event:
    seq: int
    time: str
    kind: str
    data: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "time": self.time, "kind": self.kind, "data": self.data}


def utc_now() -> str:
    return (
        dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )


class Outbox:
    """A bounded, durable queue of telemetry events, safe to call from several threads."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA journal_size_limit=1048576")  # the WAL shrinks back after use
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
            "time TEXT NOT NULL, kind TEXT NOT NULL, data TEXT NOT NULL)"
        )
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)"
        )
        row = self._db.execute(_TOTALS).fetchone()
        self._depth, self._bytes = int(row[0]), int(row[1])
        self._dropped = self.counter("dropped")
        #: Events lost to a full disk since the last successful write (reported by the next).
        self._unwritten = 0

    # -- writing -----------------------------------------------------------------------------
    def append(self, kind: str, data: dict[str, Any], time: str | None = None) -> int:
        """Store one event durably; returns its sequence number, or 0 when the disk is full
        (the event is then counted as dropped and reported once a write succeeds)."""
        body = orjson.dumps(data).decode()
        size = len(body) + len(kind) + ROW_OVERHEAD
        with self._lock:
            try:
                return self._append(kind, body, size, time)
            except (sqlite3.Error, OSError) as exc:
                if not disk_full(exc):
                    raise
                if not self._unwritten:
                    log.warning("outbox %s: disk full, events are dropped: %s", self.path, exc)
                self._unwritten += 1
                self._dropped += 1
                return 0

    def _append(self, kind: str, body: str, size: int, time: str | None) -> int:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            if self._unwritten:  # the loss first, so that it is reported in its place
                lost = orjson.dumps({"count": self._unwritten, "reason": "disk_full"}).decode()
                if self._bytes + len(lost) + ROW_OVERHEAD > self.max_bytes:
                    self._drop_oldest(len(lost) + ROW_OVERHEAD)
                self._insert("dropped", lost, utc_now())
                self._count("dropped", self._unwritten)
            if self._bytes + size > self.max_bytes:
                self._drop_oldest(size)
            seq = self._insert(kind, body, time or utc_now())
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            self._reload_totals()
            raise
        if self._unwritten:
            log.warning(
                "outbox %s: writing again; %d events were dropped", self.path, self._unwritten
            )
            self._unwritten = 0
        return seq

    def _count(self, name: str, n: int) -> None:
        self._db.execute(
            "INSERT INTO counters (name, value) VALUES (?, ?) "
            "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
            (name, n),
        )

    def _insert(self, kind: str, body: str, time: str) -> int:
        cur = self._db.execute(
            "INSERT INTO events (time, kind, data) VALUES (?, ?, ?)", (time, kind, body)
        )
        self._depth += 1
        self._bytes += len(body) + len(kind) + ROW_OVERHEAD
        assert cur.lastrowid is not None
        return cur.lastrowid

    def _drop_oldest(self, incoming: int) -> None:
        """Delete the oldest rows until `incoming` and a "dropped" event fit under 90 % of the cap
        (a margin, so that a full outbox does not drop on every single append)."""
        need = self._bytes - (self.max_bytes * 9 // 10 - incoming - 256)
        if need <= 0:
            return
        row = self._db.execute(
            f"SELECT seq FROM (SELECT seq, SUM({_SIZE}) OVER (ORDER BY seq) AS total "  # noqa: S608
            "FROM events) WHERE total >= ? ORDER BY seq LIMIT 1",
            (need,),
        ).fetchone()
        if row is None:  # everything must go
            row = self._db.execute("SELECT MAX(seq) FROM events").fetchone()
        last = row[0]
        if last is None:
            return
        count, first, freed = self._db.execute(
            f"SELECT COUNT(*), MIN(seq), SUM({_SIZE}) FROM events WHERE seq <= ?",  # noqa: S608
            (last,),
        ).fetchone()
        # An earlier "dropped" event that goes too is folded into the new one, so the count
        # reported is always every event lost.
        earlier = self._db.execute(
            "SELECT data FROM events WHERE seq <= ? AND kind = 'dropped'", (last,)
        ).fetchall()
        new_losses = count - len(earlier)
        lost = new_losses
        for (raw,) in earlier:
            folded = orjson.loads(raw)
            lost += int(folded["count"])
            first = min(first, int(folded.get("first_seq", first)))  # none: lost to a full disk
        self._db.execute("DELETE FROM events WHERE seq <= ?", (last,))
        self._depth -= count
        self._bytes -= freed
        self._dropped += new_losses
        self._count("dropped", new_losses)
        body = orjson.dumps({"count": lost, "first_seq": first, "last_seq": last}).decode()
        self._insert("dropped", body, utc_now())

    def _reload_totals(self) -> None:
        row = self._db.execute(_TOTALS).fetchone()
        self._depth, self._bytes = int(row[0]), int(row[1])

    # -- uploading ---------------------------------------------------------------------------
    def batch(self, limit: int) -> list[Event]:
        """The oldest `limit` events not yet acknowledged, in sequence order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, time, kind, data FROM events ORDER BY seq LIMIT ?", (limit,)
            ).fetchall()
        return [Event(int(s), str(t), str(k), orjson.loads(d)) for s, t, k, d in rows]

    def acknowledge(self, up_to_seq: int) -> int:
        """Forget every event up to `up_to_seq` (the hub has stored them); returns how many."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                cur = self._db.execute("DELETE FROM events WHERE seq <= ?", (up_to_seq,))
                self._db.execute(
                    "INSERT INTO counters (name, value) VALUES ('uploaded', ?) "
                    "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
                    (cur.rowcount,),
                )
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
            finally:
                self._reload_totals()
            return cur.rowcount

    # -- reading -----------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        return self._depth

    @property
    def bytes(self) -> int:
        return self._bytes

    @property
    def dropped(self) -> int:
        """Events ever dropped for lack of room (kept across restarts)."""
        return self._dropped

    def counter(self, name: str) -> int:
        with self._lock:
            row = self._db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        return int(row[0]) if row else 0

    def last_seq(self) -> int:
        """The highest sequence number ever handed out (0 for a new outbox)."""
        with self._lock:
            row = self._db.execute(
                "SELECT seq FROM sqlite_sequence WHERE name = 'events'"
            ).fetchone()
        return int(row[0]) if row else 0

    def close(self) -> None:
        with self._lock:
            self._db.close()
