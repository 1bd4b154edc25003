"""The PostgreSQL schema of the hub, as numbered migrations (applied by `hub init`/`hub migrate`).

A migration is never edited once released: a change to the schema is a new entry at the end.
`schema_migrations` records which ones a database has; `appliance hub serve` refuses a database
that is behind (run `appliance hub migrate`) or ahead (an older hub on a newer schema).

Telemetry `events` are range-partitioned by the day the hub received them, so expiring old
events drops a partition instead of deleting rows. A unique key on a partitioned table must hold
the partition column, so (device_id, seq, day) is unique per partition; a retry landing on
another day is caught by the insert's NOT EXISTS under the device's advisory lock (pgstore.py).
"""

from __future__ import annotations

MIGRATIONS: list[tuple[int, str, str]] = [
    (
        1,
        "initial schema",
        """
CREATE TABLE devices (
    device_id TEXT PRIMARY KEY,
    grp TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    enrolled_at TEXT NOT NULL,
    last_seen TEXT,
    state TEXT NOT NULL DEFAULT '{}',
    state_seq BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE targets (
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    path TEXT NOT NULL UNIQUE,
    sha256 TEXT NOT NULL,
    length BIGINT NOT NULL,
    custom TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE TABLE rollouts (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    model TEXT NOT NULL,
    version TEXT NOT NULL,
    target TEXT NOT NULL,
    percent INTEGER NOT NULL,
    state TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE events (
    device_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    time TEXT NOT NULL,
    kind TEXT NOT NULL,
    data TEXT NOT NULL,
    received_at TEXT NOT NULL,
    day DATE NOT NULL,
    PRIMARY KEY (device_id, seq, day)
) PARTITION BY RANGE (day);
CREATE TABLE metadata (
    role TEXT NOT NULL,
    version INTEGER NOT NULL,
    body BYTEA NOT NULL,
    PRIMARY KEY (role, version)
);
""",
    ),
    (
        2,
        "fleet generation",
        """
CREATE TABLE fleet (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    generation BIGINT NOT NULL
);
INSERT INTO fleet (id, generation) VALUES (1, 0);
""",
    ),
]

LATEST = MIGRATIONS[-1][0]
