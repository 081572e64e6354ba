"""SQLite schema of the durable store, versioned in ``meta.schema_version``.

Indexes follow the queries the servers make: everything a user lists is filtered by ``owner``; futures are
deduplicated on ``(model_id, seq_id)`` (a training run's or sampling session's sequence numbers) by a partial
unique index, which is what makes a resubmitted request map to its first ``request_id`` even across
restarts. ``sampled_sequences`` holds what a sampler recorded for ``record_stability_info`` (tokens as
little-endian int32, logprobs as little-endian float32).
"""

from __future__ import annotations

SCHEMA_VERSION = 1

DDL = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS api_keys (
    key_hash  TEXT PRIMARY KEY,
    principal TEXT NOT NULL,
    source    TEXT NOT NULL,
    label     TEXT,
    created   REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    id            TEXT PRIMARY KEY,
    owner         TEXT NOT NULL,
    protocol      TEXT NOT NULL,
    created       REAL NOT NULL,
    heartbeat     REAL NOT NULL,
    finished      REAL,
    finish_reason TEXT,
    tags          TEXT,
    user_metadata TEXT,
    display_name  TEXT,
    sdk_version   TEXT
);
CREATE INDEX IF NOT EXISTS sessions_owner ON sessions(owner, created);
CREATE TABLE IF NOT EXISTS runs (
    id            TEXT PRIMARY KEY,
    owner         TEXT NOT NULL,
    session_id    TEXT,
    base_model    TEXT NOT NULL,
    lora          TEXT NOT NULL,
    created       REAL NOT NULL,
    last_request  REAL NOT NULL,
    protocol      TEXT NOT NULL,
    user_metadata TEXT,
    corrupted     INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS runs_owner ON runs(owner, last_request);
CREATE INDEX IF NOT EXISTS runs_session ON runs(session_id);
CREATE TABLE IF NOT EXISTS checkpoints (
    run_id        TEXT NOT NULL,
    kind          TEXT NOT NULL,
    name          TEXT NOT NULL,
    owner         TEXT NOT NULL,
    path          TEXT NOT NULL,
    created       REAL NOT NULL,
    size_bytes    INTEGER,
    public        INTEGER NOT NULL DEFAULT 0,
    expires_at    REAL,
    user_metadata TEXT,
    base_model    TEXT,
    lora          TEXT,
    PRIMARY KEY (run_id, kind, name)
);
CREATE INDEX IF NOT EXISTS checkpoints_owner ON checkpoints(owner, created);
CREATE INDEX IF NOT EXISTS checkpoints_expiry ON checkpoints(expires_at) WHERE expires_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS samplers (
    id           TEXT PRIMARY KEY,
    owner        TEXT NOT NULL,
    session_id   TEXT,
    base_model   TEXT NOT NULL,
    created      REAL NOT NULL,
    model_path   TEXT,
    adapter_path TEXT,
    run_id       TEXT,
    ephemeral    INTEGER NOT NULL DEFAULT 0,
    last_used    REAL,
    inflight     INTEGER NOT NULL DEFAULT 0,
    clients      INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS samplers_session ON samplers(session_id);
CREATE INDEX IF NOT EXISTS samplers_run ON samplers(run_id) WHERE ephemeral = 1;
CREATE INDEX IF NOT EXISTS samplers_owner ON samplers(owner);
CREATE TABLE IF NOT EXISTS futures (
    request_id TEXT PRIMARY KEY,
    owner      TEXT NOT NULL,
    kind       TEXT NOT NULL,
    model_id   TEXT,
    seq_id     INTEGER,
    status     TEXT NOT NULL,
    result     BLOB,
    error      TEXT,
    category   TEXT,
    meta       TEXT,
    created    REAL NOT NULL,
    finished   REAL,
    fetched    REAL
);
CREATE UNIQUE INDEX IF NOT EXISTS futures_dedupe ON futures(model_id, seq_id) WHERE seq_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS futures_status ON futures(status);
CREATE TABLE IF NOT EXISTS sampled_sequences (
    id         TEXT PRIMARY KEY,
    owner      TEXT NOT NULL,
    session_id TEXT,
    tokens     BLOB NOT NULL,
    logprobs   BLOB NOT NULL,
    last_used  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS sampled_sequences_owner ON sampled_sequences(owner, last_used);
CREATE INDEX IF NOT EXISTS sampled_sequences_used ON sampled_sequences(last_used);
CREATE TABLE IF NOT EXISTS usage_hourly (
    owner      TEXT NOT NULL,
    hour       INTEGER NOT NULL,
    session_id TEXT NOT NULL DEFAULT '',
    base_model TEXT NOT NULL DEFAULT '',
    kind       TEXT NOT NULL,
    quantity   INTEGER NOT NULL,
    PRIMARY KEY (owner, hour, session_id, base_model, kind)
);
CREATE INDEX IF NOT EXISTS usage_hourly_hour ON usage_hourly(hour);
CREATE TABLE IF NOT EXISTS audit_log (
    time    REAL NOT NULL,
    owner   TEXT NOT NULL,
    event   TEXT NOT NULL,
    details TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_log_owner ON audit_log(owner, time);
CREATE INDEX IF NOT EXISTS audit_log_time ON audit_log(time);
CREATE TABLE IF NOT EXISTS run_steps (
    run_id        TEXT NOT NULL,
    step          INTEGER NOT NULL,
    time          REAL NOT NULL,
    loss          REAL,
    tokens        INTEGER NOT NULL,
    learning_rate REAL,
    grad_norm     REAL,
    PRIMARY KEY (run_id, step)
);
"""

# Columns added after a table's first release: (table, column, definition), added to older databases at open.
ADDED_COLUMNS = [
    ("samplers", "inflight", "INTEGER NOT NULL DEFAULT 0"),
    ("samplers", "clients", "INTEGER NOT NULL DEFAULT 0"),
]
