"""`PostgresStore`: the `HubStore` on PostgreSQL (psycopg 3, a pool of synchronous connections).

For a fleet that outgrows one SQLite file or needs several `hub serve` replicas. Imported only
when `--database postgresql://...` is given (the device and an SQLite hub never load psycopg).

- `transaction(key)` is a database transaction holding `pg_advisory_xact_lock(key)`: signing
  (key "hub") is serialised across every replica and CLI, while telemetry locks only its device
  ("device/<id>"), so devices do not queue behind each other.
- Events are range-partitioned by the day received (migrations.py): `maintain()` creates the
  next days' partitions and drops those older than the retention; an insert for a day this
  process has not seen a partition for creates it first.
- `is_leader()` holds `pg_try_advisory_lock` on a dedicated connection: one replica at a time
  runs the metadata refresher and maintenance; when it dies its session ends, the lock is
  released and the next replica to ask takes over. (A replica whose machine vanishes without
  closing its socket holds the lock until PostgreSQL's `tcp_keepalives_*` settings drop it.)
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from typing import Any

import orjson
import psycopg
from psycopg import errors as pgerrors
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool, PoolTimeout

from ..errors import ConfigError
from .errors import Conflict
from .migrations import LATEST, MIGRATIONS
from .records import Event, Rollout
from .sqlstore import SqlStore

log = logging.getLogger("appliance.hub.pg")

_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))"
MIGRATE_KEY = "appliance-hub/migrate"
LEADER_KEY = "appliance-hub/leader"
#: Days of event partitions created ahead of today.
PARTITIONS_AHEAD = 3
#: As many connections as asyncio.to_thread has threads (the server's blocking calls).
POOL_SIZE = min(32, (os.cpu_count() or 1) + 4)


def describe(url: str) -> str:
    """The URL without its password, for messages and logs."""
    try:
        d = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql://(unparsable URL)"
    host = d.get("host") or "localhost"
    port = d.get("port") or "5432"
    return f"postgresql://{d.get('user', '')}@{host}:{port}/{d.get('dbname', '')}"


def _connect(url: str) -> psycopg.Connection[Any]:
    try:
        return psycopg.connect(url, autocommit=True, connect_timeout=10)
    except psycopg.OperationalError as exc:
        raise ConfigError(f"cannot connect to {describe(url)}: {exc}") from None


def schema_version(conn: psycopg.Connection[Any]) -> int:
    try:
        with conn.transaction():
            row = conn.execute("SELECT max(version) FROM schema_migrations").fetchone()
    except pgerrors.UndefinedTable:
        return 0
    return int(row[0] or 0) if row else 0


def migrate(url: str) -> list[int]:
    """Apply the migrations this database lacks, each in its own transaction, under an
    advisory lock (replicas starting together queue up). Returns the versions applied."""
    applied = []
    with _connect(url) as conn:
        conn.execute("SELECT pg_advisory_lock(hashtextextended(%s, 0))", (MIGRATE_KEY,))
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY,"
                " name TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
            )
            current = schema_version(conn)
            if current > LATEST:
                raise ConfigError(
                    f"{describe(url)} has schema version {current}, newer than this hub's "
                    f"{LATEST}: upgrade the hub"
                )
            for version, name, sql in MIGRATIONS:
                if version <= current:
                    continue
                with conn.transaction():
                    conn.execute(sql.encode())
                    conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                        (version, name),
                    )
                log.info("applied migration %d (%s) to %s", version, name, describe(url))
                applied.append(version)
        finally:
            conn.execute("SELECT pg_advisory_unlock(hashtextextended(%s, 0))", (MIGRATE_KEY,))
    return applied


def _day_of(received_at: str) -> dt.date:
    try:
        return dt.date.fromisoformat(received_at[:10])
    except ValueError:
        return dt.datetime.now(dt.timezone.utc).date()


@functools.lru_cache(maxsize=256)
def _pg(query: str) -> bytes:
    """A query of sqlstore.py (`?` placeholders) in psycopg's `%s` style, as bytes (psycopg
    takes a query as `LiteralString` or bytes; these are built from constants, never input)."""
    return query.replace("?", "%s").encode()


def _partition(day: dt.date) -> str:
    return f"events_{day:%Y%m%d}"


class PostgresStore(SqlStore):
    """The hub's tables on PostgreSQL; every method is blocking (the server runs them in
    threads), and a thread inside `transaction()` uses that transaction's connection."""

    def __init__(
        self,
        url: str,
        *,
        apply_migrations: bool = False,
        retention_days: float | None = 30.0,
        pool_size: int = POOL_SIZE,
    ) -> None:
        self.url = url
        self.retention_days = retention_days
        if apply_migrations:
            migrate(url)
        with _connect(url) as conn:
            version = schema_version(conn)
        if version != LATEST:
            what = "has no hub schema" if version == 0 else f"has schema version {version}"
            raise ConfigError(
                f"{describe(url)} {what}, this hub needs {LATEST}: run `appliance hub "
                f"{'init' if version == 0 else 'migrate'} --database URL`"
            )
        self._pool = ConnectionPool(
            url,
            min_size=1,
            max_size=pool_size,
            kwargs={"autocommit": True},
            open=False,
            name="appliance-hub",
        )
        try:
            self._pool.open(wait=True, timeout=15.0)
        except PoolTimeout:
            self._pool.close()
            raise ConfigError(f"cannot open connections to {describe(url)}") from None
        self._local = threading.local()
        self._leader: psycopg.Connection[Any] | None = None
        self._leader_lock = threading.Lock()
        #: Days whose partition exists (only days past the retention are ever dropped).
        self._days: set[dt.date] = set()
        self.ensure_partitions(dt.datetime.now(dt.timezone.utc).date() - dt.timedelta(days=1))

    def close(self) -> None:
        with self._leader_lock:
            if self._leader is not None:
                self._leader.close()
                self._leader = None
        self._pool.close()

    # -- connections and transactions --------------------------------------------------------
    @contextmanager
    def _conn(self) -> Iterator[psycopg.Connection[Any]]:
        conn: psycopg.Connection[Any] | None = getattr(self._local, "conn", None)
        if conn is not None:
            yield conn
            return
        with self._pool.connection() as pooled:
            yield pooled

    @contextmanager
    def transaction(self, key: str = "hub") -> Iterator[None]:
        conn: psycopg.Connection[Any] | None = getattr(self._local, "conn", None)
        if conn is not None:  # nested: the same transaction, one more lock
            if key not in self._local.keys:
                conn.execute(_LOCK, (key,))
                self._local.keys.add(key)
            yield
            return
        with self._pool.connection() as conn:
            # BEGIN and the lock in one round trip (no parameters: the simple query protocol).
            conn.execute(
                sql.SQL("BEGIN; SELECT pg_advisory_xact_lock(hashtextextended({}, 0))").format(
                    sql.Literal(key)
                )
            )
            self._local.conn, self._local.keys = conn, {key}
            try:
                yield
            except BaseException:
                with suppress(psycopg.Error):  # a broken connection: the pool discards it
                    conn.execute("ROLLBACK")
                raise
            else:
                conn.execute("COMMIT")
            finally:
                self._local.conn = None

    def _rows(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._conn() as conn:
            return conn.execute(_pg(sql), args).fetchall()

    def _exec(self, sql: str, args: Sequence[Any] = ()) -> int:
        with self._conn() as conn:
            return conn.execute(_pg(sql), args).rowcount

    def _exec_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        with self._conn() as conn, conn.cursor() as cur:
            cur.executemany(_pg(sql), rows)

    def _insert(self, sql: str, args: Sequence[Any], conflict: str) -> None:
        """An insert that may hit a unique key: a savepoint keeps a surrounding transaction
        usable, the violation becomes a 409."""
        try:
            with self._conn() as conn, conn.transaction():
                conn.execute(_pg(sql), args)
        except pgerrors.UniqueViolation:
            raise Conflict(conflict) from None

    # -- leadership and maintenance ----------------------------------------------------------
    def is_leader(self) -> bool:
        """Whether this process holds the leader lock (taking it when free)."""
        with self._leader_lock:
            if self._leader is not None:
                try:
                    self._leader.execute("SELECT 1")
                    return True
                except psycopg.Error:
                    log.warning("lost the connection holding the hub leader lock")
                    self._leader.close()
                    self._leader = None
            try:
                conn = psycopg.connect(self.url, autocommit=True, connect_timeout=10)
            except psycopg.OperationalError as exc:
                log.warning("cannot connect to %s to take the lead: %s", describe(self.url), exc)
                return False
            row = conn.execute(
                "SELECT pg_try_advisory_lock(hashtextextended(%s, 0))", (LEADER_KEY,)
            ).fetchone()
            if row and row[0]:
                self._leader = conn
                log.info("this hub replica is now the leader (signing, maintenance)")
                return True
            conn.close()
            return False

    def ensure_partitions(self, first: dt.date, days: int = PARTITIONS_AHEAD + 2) -> None:
        with self.transaction("partitions"), self._conn() as conn:
            for i in range(days):
                day = first + dt.timedelta(days=i)
                conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {_partition(day)} PARTITION OF events"
                    f" FOR VALUES FROM ('{day.isoformat()}') TO"
                    f" ('{(day + dt.timedelta(days=1)).isoformat()}')".encode()
                )
                self._days.add(day)

    def event_partitions(self) -> list[dt.date]:
        rows = self._rows(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = 'events'::regclass"
        )
        return sorted(dt.datetime.strptime(r[0], "events_%Y%m%d").date() for r in rows)

    def maintain(self, now: dt.datetime) -> dict[str, int]:
        """Partitions for the days ahead; drop those wholly older than the retention."""
        today = now.astimezone(dt.timezone.utc).date()
        self.ensure_partitions(today - dt.timedelta(days=1))
        dropped = 0
        if self.retention_days:
            cutoff = (now - dt.timedelta(days=self.retention_days)).date()
            for day in self.event_partitions():
                if day < cutoff:
                    with self.transaction("partitions"):
                        self._exec(f"DROP TABLE IF EXISTS {_partition(day)}")
                    self._days.discard(day)
                    dropped += 1
        if dropped:
            log.info("dropped %d day(s) of telemetry past the retention", dropped)
        return {"partitions_dropped": dropped}

    # -- rollouts and telemetry: the writes that differ from SQLite ------------------------
    def add_rollout(
        self, model: str, version: str, target: dict[str, Any], percent: int, when: str
    ) -> Rollout:
        with self.transaction("fleet"):
            rows = self._rows(
                f"{self._ADD_ROLLOUT} RETURNING {self._ROLLOUT_COLS}",
                self._rollout_args(model, version, target, percent, when),
            )
            self.bump_generation()
        return self._rollout(rows[0])

    _ADD_EVENTS = (
        "INSERT INTO events (device_id, seq, time, kind, data, received_at, day)"
        " SELECT u.* FROM unnest(%s::text[], %s::bigint[], %s::text[], %s::text[], %s::text[],"
        " %s::text[], %s::date[]) AS u(device_id, seq, time, kind, data, received_at, day)"
        " WHERE NOT EXISTS (SELECT 1 FROM events e"
        "  WHERE e.device_id = u.device_id AND e.seq = u.seq)"
        " ON CONFLICT DO NOTHING RETURNING device_id, seq"
    )

    def add_events(self, events: Sequence[Event]) -> list[Event]:
        """One statement per batch. Each device's inserts are serialised by its advisory lock,
        so NOT EXISTS sees every earlier batch across partitions and replicas; the unique key
        catches the rest (same day)."""
        if not events:
            return []
        days = [_day_of(e.received_at) for e in events]
        args = (
            [e.device_id for e in events],
            [e.seq for e in events],
            [e.time for e in events],
            [e.kind for e in events],
            [orjson.dumps(e.data).decode() for e in events],
            [e.received_at for e in events],
            days,
        )
        with ExitStack() as stack:
            for device_id in sorted({e.device_id for e in events}):  # one lock order
                stack.enter_context(self.transaction(f"device/{device_id}"))
            for day in sorted(set(days) - self._days):  # days are created ahead: rare
                self.ensure_partitions(day, 1)
            conn = stack.enter_context(self._conn())
            try:
                rows = conn.execute(self._ADD_EVENTS.encode(), args).fetchall()
            except pgerrors.CheckViolation:  # dropped by another replica: recreated next time
                self._days.difference_update(days)
                raise
        new = {(r[0], int(r[1])) for r in rows}
        return [e for e in events if (e.device_id, e.seq) in new]
