"""The durable store: one SQLite file (WAL) behind an async API.

Why one connection on one dedicated thread: SQLite serialises writers anyway, a single connection needs no
locking of its own, and running every statement on that thread keeps disk I/O (and the occasional fsync)
off the event loop, so a slow disk delays no heartbeat or poll. Statements are short; a round trip through
the thread costs tens of microseconds.

``synchronous=NORMAL`` in WAL mode: a commit survives a process crash (what "a restarted server still knows
finished results" needs); only a power cut may lose the last transactions.

A shared database for several gateway replicas (PostgreSQL, …) would implement the same methods; the SQLite
file is for one gateway process at a time (``fail_pending`` at startup assumes nobody else is running).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import os
import sqlite3
import threading
import time
from typing import Any, Callable, Iterable, TypeVar

import msgspec
import numpy as np

from .records import (
    ApiKeyRecord,
    CheckpointRecord,
    FutureRecord,
    Page,
    RunRecord,
    SamplerRecord,
    SequenceRecord,
    SessionRecord,
)
from .schema import ADDED_COLUMNS, DDL, SCHEMA_VERSION

T = TypeVar("T")
_json_encode = msgspec.json.encode
_json_decode = msgspec.json.decode


def _dumps(value: Any) -> str | None:
    return None if value is None else _json_encode(value).decode()


def _loads(text: str | bytes | None) -> Any:
    return None if text is None else _json_decode(text)


class Store:
    """Async facade over one SQLite connection owned by a private thread. Use ``await Store.open(path)``."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(os.path.expanduser(path))
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="twinkle-store")
        self._conn: sqlite3.Connection | None = None
        self._closed = False

    @classmethod
    async def open(cls, path: str) -> "Store":
        store = cls(path)
        await store._call(store._open)
        return store

    # --------------------------------------------------------------------------------- plumbing

    def _open(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=30.0)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.executescript(DDL)
        for table, column, definition in ADDED_COLUMNS:
            if column not in {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}:
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
        row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if row is None:
            conn.execute("INSERT INTO meta(key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        elif int(row[0]) > SCHEMA_VERSION:
            conn.close()
            raise RuntimeError(
                f"state database {self.path} has schema version {row[0]}, newer than this server's "
                f"{SCHEMA_VERSION}; upgrade twinkle-gateway or point state_db elsewhere"
            )
        self._conn = conn

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        if self._closed:
            raise RuntimeError("the state store is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args))

    def submit_background(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue a write without waiting for it (e.g. 'first fetched at'), on the same thread and in order."""
        if not self._closed:
            self._executor.submit(fn, *args)

    @property
    def conn(self) -> sqlite3.Connection:
        assert self._conn is not None and threading.current_thread().name.startswith("twinkle-store")
        return self._conn

    def _tx(self, statements: Callable[[sqlite3.Connection], T]) -> T:
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            out = statements(conn)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return out

    async def close(self) -> None:
        if self._closed:
            return

        def _close() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await self._call(_close)
        self._closed = True
        self._executor.shutdown(wait=True)

    # --------------------------------------------------------------------------------- meta

    async def meta_setdefault(self, key: str, value: str) -> str:
        """Store ``value`` under ``key`` unless a value exists; return the stored one."""

        def run() -> str:
            self.conn.execute("INSERT OR IGNORE INTO meta(key, value) VALUES (?, ?)", (key, value))
            return self.conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()[0]

        return await self._call(run)

    # --------------------------------------------------------------------------------- API keys

    async def replace_keys(self, source: str, keys: list[ApiKeyRecord]) -> None:
        """Make the keys of ``source`` exactly ``keys`` (configured keys follow the config)."""

        def run(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM api_keys WHERE source=?", (source,))
            conn.executemany(
                "INSERT OR REPLACE INTO api_keys(key_hash, principal, source, label, created) VALUES (?,?,?,?,?)",
                [(k.key_hash, k.principal, k.source, k.label, k.created) for k in keys],
            )

        await self._call(self._tx, run)

    async def list_keys(self) -> list[ApiKeyRecord]:
        def run() -> list[ApiKeyRecord]:
            rows = self.conn.execute("SELECT key_hash, principal, source, label, created FROM api_keys").fetchall()
            return [ApiKeyRecord(key_hash=r[0], principal=r[1], source=r[2], label=r[3], created=r[4]) for r in rows]

        return await self._call(run)

    # --------------------------------------------------------------------------------- sessions

    _SESSION_COLS = ("id, owner, protocol, created, heartbeat, finished, finish_reason, tags, user_metadata, "
                     "display_name, sdk_version")

    @staticmethod
    def _session(r: tuple) -> SessionRecord:
        return SessionRecord(
            id=r[0], owner=r[1], protocol=r[2], created=r[3], heartbeat=r[4], finished=r[5], finish_reason=r[6],
            tags=_loads(r[7]) or [], user_metadata=_loads(r[8]), display_name=r[9], sdk_version=r[10],
        )

    async def create_session(self, s: SessionRecord) -> None:
        await self._call(
            lambda: self.conn.execute(
                f"INSERT INTO sessions({self._SESSION_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (s.id, s.owner, s.protocol, s.created, s.heartbeat, s.finished, s.finish_reason, _dumps(s.tags),
                 _dumps(s.user_metadata), s.display_name, s.sdk_version),
            )
        )

    async def get_session(self, session_id: str, owner: str | None = None) -> SessionRecord | None:
        def run() -> SessionRecord | None:
            r = self.conn.execute(f"SELECT {self._SESSION_COLS} FROM sessions WHERE id=?", (session_id,)).fetchone()
            if r is None or (owner is not None and r[1] != owner):
                return None
            return self._session(r)

        return await self._call(run)

    async def heartbeat(self, session_id: str, owner: str, now: float) -> SessionRecord | None:
        """Record a heartbeat; return the session. A session closed for silence comes back to life (its client
        is evidently alive); one finished by its client is returned unchanged."""

        def run() -> SessionRecord | None:
            self.conn.execute(
                "UPDATE sessions SET heartbeat=?, finished=NULL, finish_reason=NULL WHERE id=? AND owner=? "
                "AND (finished IS NULL OR finish_reason='expired')", (now, session_id, owner)
            )
            r = self.conn.execute(f"SELECT {self._SESSION_COLS} FROM sessions WHERE id=?", (session_id,)).fetchone()
            return None if r is None or r[1] != owner else self._session(r)

        return await self._call(run)

    async def finish_session(self, session_id: str, owner: str, reason: str, now: float) -> bool:
        """Mark a session finished; the first call wins. False if there is no such session of ``owner``."""

        def run() -> bool:
            r = self.conn.execute("SELECT owner FROM sessions WHERE id=?", (session_id,)).fetchone()
            if r is None or r[0] != owner:
                return False
            self.conn.execute(
                "UPDATE sessions SET finished=?, finish_reason=? WHERE id=? AND finished IS NULL",
                (now, reason, session_id),
            )
            return True

        return await self._call(run)

    async def expire_sessions(self, heartbeat_before: float, now: float) -> list[str]:
        """Finish every live session whose last heartbeat is older than ``heartbeat_before``."""

        def run(conn: sqlite3.Connection) -> list[str]:
            ids = [r[0] for r in conn.execute(
                "SELECT id FROM sessions WHERE finished IS NULL AND heartbeat < ?", (heartbeat_before,))]
            conn.executemany(
                "UPDATE sessions SET finished=?, finish_reason='expired' WHERE id=?", [(now, i) for i in ids]
            )
            return ids

        return await self._call(self._tx, run)

    async def list_sessions(self, owner: str, limit: int, offset: int) -> Page:
        def run() -> Page:
            total = self.conn.execute("SELECT COUNT(*) FROM sessions WHERE owner=?", (owner,)).fetchone()[0]
            rows = self.conn.execute(
                f"SELECT {self._SESSION_COLS} FROM sessions WHERE owner=? ORDER BY created DESC, id LIMIT ? OFFSET ?",
                (owner, limit, offset),
            ).fetchall()
            return Page([self._session(r) for r in rows], total)

        return await self._call(run)

    async def count_open_sessions(self, owner: str) -> int:
        return await self._call(lambda: self.conn.execute(
            "SELECT COUNT(*) FROM sessions WHERE owner=? AND finished IS NULL", (owner,)).fetchone()[0])

    async def session_children(self, session_id: str) -> tuple[list[str], list[str]]:
        """(training run ids, sampler ids) created in a session, oldest first."""

        def run() -> tuple[list[str], list[str]]:
            runs = [r[0] for r in self.conn.execute(
                "SELECT id FROM runs WHERE session_id=? ORDER BY created, id", (session_id,))]
            samplers = [r[0] for r in self.conn.execute(
                "SELECT id FROM samplers WHERE session_id=? ORDER BY created, id", (session_id,))]
            return runs, samplers

        return await self._call(run)

    # --------------------------------------------------------------------------------- training runs

    _RUN_COLS = "id, owner, session_id, base_model, lora, created, last_request, protocol, user_metadata, corrupted"

    @staticmethod
    def _run(r: tuple) -> RunRecord:
        return RunRecord(
            id=r[0], owner=r[1], session_id=r[2], base_model=r[3], lora=_loads(r[4]) or {}, created=r[5],
            last_request=r[6], protocol=r[7], user_metadata=_loads(r[8]), corrupted=bool(r[9]),
        )

    async def create_run(self, run: RunRecord) -> bool:
        """Insert a run; False (and no change) if the id exists already."""

        def go() -> bool:
            cur = self.conn.execute(
                f"INSERT OR IGNORE INTO runs({self._RUN_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (run.id, run.owner, run.session_id, run.base_model, _dumps(run.lora), run.created, run.last_request,
                 run.protocol, _dumps(run.user_metadata), int(run.corrupted)),
            )
            return cur.rowcount == 1

        return await self._call(go)

    async def get_run(self, run_id: str, owner: str | None = None) -> RunRecord | None:
        def go() -> RunRecord | None:
            r = self.conn.execute(f"SELECT {self._RUN_COLS} FROM runs WHERE id=?", (run_id,)).fetchone()
            if r is None or (owner is not None and r[1] != owner):
                return None
            return self._run(r)

        return await self._call(go)

    async def list_runs(self, owner: str, limit: int, offset: int) -> Page:
        def go() -> Page:
            total = self.conn.execute("SELECT COUNT(*) FROM runs WHERE owner=?", (owner,)).fetchone()[0]
            rows = self.conn.execute(
                f"SELECT {self._RUN_COLS} FROM runs WHERE owner=? ORDER BY last_request DESC, id LIMIT ? OFFSET ?",
                (owner, limit, offset),
            ).fetchall()
            return Page([self._run(r) for r in rows], total)

        return await self._call(go)

    async def delete_run(self, run_id: str) -> None:
        def go(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM runs WHERE id=?", (run_id,))
            conn.execute("DELETE FROM run_steps WHERE run_id=?", (run_id,))

        await self._call(self._tx, go)

    # --------------------------------------------------------------------------------- checkpoints

    _CKPT_COLS = ("run_id, kind, name, owner, path, created, size_bytes, public, expires_at, user_metadata, "
                  "base_model, lora")

    @staticmethod
    def _ckpt(r: tuple) -> CheckpointRecord:
        return CheckpointRecord(
            run_id=r[0], kind=r[1], name=r[2], owner=r[3], path=r[4], created=r[5], size_bytes=r[6],
            public=bool(r[7]), expires_at=r[8], user_metadata=_loads(r[9]), base_model=r[10], lora=_loads(r[11]),
        )

    async def put_checkpoint(self, c: CheckpointRecord) -> None:
        await self._call(
            lambda: self.conn.execute(
                f"INSERT OR REPLACE INTO checkpoints({self._CKPT_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (c.run_id, c.kind, c.name, c.owner, c.path, c.created, c.size_bytes, int(c.public), c.expires_at,
                 _dumps(c.user_metadata), c.base_model, _dumps(c.lora)),
            )
        )

    async def get_checkpoint(self, run_id: str, kind: str, name: str) -> CheckpointRecord | None:
        def go() -> CheckpointRecord | None:
            r = self.conn.execute(
                f"SELECT {self._CKPT_COLS} FROM checkpoints WHERE run_id=? AND kind=? AND name=?", (run_id, kind, name)
            ).fetchone()
            return None if r is None else self._ckpt(r)

        return await self._call(go)

    async def list_checkpoints(self, run_id: str) -> list[CheckpointRecord]:
        def go() -> list[CheckpointRecord]:
            rows = self.conn.execute(
                f"SELECT {self._CKPT_COLS} FROM checkpoints WHERE run_id=? ORDER BY created, kind, name", (run_id,)
            ).fetchall()
            return [self._ckpt(r) for r in rows]

        return await self._call(go)

    async def latest_checkpoints(self, run_ids: list[str]) -> dict[tuple[str, str], CheckpointRecord]:
        """The newest checkpoint of each kind for each run: {(run_id, kind): record}."""
        if not run_ids:
            return {}

        def go() -> dict[tuple[str, str], CheckpointRecord]:
            marks = ",".join("?" * len(run_ids))
            rows = self.conn.execute(
                f"SELECT {self._CKPT_COLS} FROM checkpoints WHERE run_id IN ({marks}) ORDER BY created", run_ids
            ).fetchall()
            out: dict[tuple[str, str], CheckpointRecord] = {}
            for r in rows:
                out[(r[0], r[1])] = self._ckpt(r)
            return out

        return await self._call(go)

    async def list_user_checkpoints(self, owner: str, limit: int, offset: int) -> Page:
        def go() -> Page:
            total = self.conn.execute("SELECT COUNT(*) FROM checkpoints WHERE owner=?", (owner,)).fetchone()[0]
            rows = self.conn.execute(
                f"SELECT {self._CKPT_COLS} FROM checkpoints WHERE owner=? ORDER BY created DESC, run_id, kind, name "
                "LIMIT ? OFFSET ?",
                (owner, limit, offset),
            ).fetchall()
            return Page([self._ckpt(r) for r in rows], total)

        return await self._call(go)

    async def checkpoint_usage(self, owner: str) -> tuple[int, int]:
        """(count, bytes) of the checkpoints ``owner`` keeps."""
        row = await self._call(lambda: self.conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(size_bytes), 0) FROM checkpoints WHERE owner=?", (owner,)).fetchone())
        return int(row[0]), int(row[1])

    async def usage(self, owners: Iterable[str] = ()) -> dict[str, dict[str, int]]:
        """Per owner: ``runs``, ``open_sessions``, ``checkpoints``, ``checkpoint_bytes``; every owner that has
        any, and each of ``owners`` (with zeros)."""
        empty = {"runs": 0, "open_sessions": 0, "checkpoints": 0, "checkpoint_bytes": 0}

        def go() -> dict[str, dict[str, int]]:
            out: dict[str, dict[str, int]] = {owner: dict(empty) for owner in owners}

            def add(sql: str, *fields: str) -> None:
                for owner, *values in self.conn.execute(sql).fetchall():
                    row = out.setdefault(owner, dict(empty))
                    row.update({f: int(v or 0) for f, v in zip(fields, values)})

            add("SELECT owner, COUNT(*) FROM runs GROUP BY owner", "runs")
            add("SELECT owner, COUNT(*) FROM sessions WHERE finished IS NULL GROUP BY owner", "open_sessions")
            add("SELECT owner, COUNT(*), SUM(size_bytes) FROM checkpoints GROUP BY owner", "checkpoints",
                "checkpoint_bytes")
            return out

        return await self._call(go)

    async def delete_checkpoint(self, run_id: str, kind: str, name: str) -> bool:
        def go() -> bool:
            cur = self.conn.execute(
                "DELETE FROM checkpoints WHERE run_id=? AND kind=? AND name=?", (run_id, kind, name)
            )
            return cur.rowcount == 1

        return await self._call(go)

    async def update_checkpoint(self, run_id: str, kind: str, name: str, **changes: Any) -> bool:
        """Change ``public`` and/or ``expires_at``."""
        allowed = {"public", "expires_at"}
        if not changes or set(changes) - allowed:
            raise ValueError(f"can only update {allowed}")
        sets = ", ".join(f"{k}=?" for k in changes)
        values = [int(v) if k == "public" else v for k, v in changes.items()]

        def go() -> bool:
            cur = self.conn.execute(
                f"UPDATE checkpoints SET {sets} WHERE run_id=? AND kind=? AND name=?", (*values, run_id, kind, name)
            )
            return cur.rowcount == 1

        return await self._call(go)

    async def expired_checkpoints(self, now: float) -> list[CheckpointRecord]:
        def go() -> list[CheckpointRecord]:
            rows = self.conn.execute(
                f"SELECT {self._CKPT_COLS} FROM checkpoints WHERE expires_at IS NOT NULL AND expires_at <= ?", (now,)
            ).fetchall()
            return [self._ckpt(r) for r in rows]

        return await self._call(go)

    # --------------------------------------------------------------------------------- samplers

    _SAMPLER_COLS = ("id, owner, session_id, base_model, created, model_path, adapter_path, run_id, ephemeral, last_used, "
                     "inflight")

    @staticmethod
    def _sampler(r: tuple) -> SamplerRecord:
        return SamplerRecord(
            id=r[0], owner=r[1], session_id=r[2], base_model=r[3], created=r[4], model_path=r[5],
            adapter_path=r[6], run_id=r[7], ephemeral=bool(r[8]), last_used=r[9], inflight=bool(r[10]),
        )

    async def create_sampler(self, s: SamplerRecord) -> bool:
        def go() -> bool:
            cur = self.conn.execute(
                f"INSERT OR IGNORE INTO samplers({self._SAMPLER_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (s.id, s.owner, s.session_id, s.base_model, s.created, s.model_path, s.adapter_path, s.run_id,
                 int(s.ephemeral), s.last_used, int(s.inflight)),
            )
            return cur.rowcount == 1

        return await self._call(go)

    async def get_sampler(self, sampler_id: str, owner: str | None = None) -> SamplerRecord | None:
        def go() -> SamplerRecord | None:
            r = self.conn.execute(f"SELECT {self._SAMPLER_COLS} FROM samplers WHERE id=?", (sampler_id,)).fetchone()
            if r is None or (owner is not None and r[1] != owner):
                return None
            return self._sampler(r)

        return await self._call(go)

    async def list_samplers(self, owner: str, limit: int) -> list[SamplerRecord]:
        """The owner's sampling sessions, most recently used first."""
        return await self._call(lambda: [self._sampler(r) for r in self.conn.execute(
            f"SELECT {self._SAMPLER_COLS} FROM samplers WHERE owner=? ORDER BY COALESCE(last_used, created) DESC "
            "LIMIT ?", (owner, limit)).fetchall()])

    async def ephemeral_samplers(self, *, run_id: str | None = None, session_ids: list[str] | None = None
                                 ) -> list[SamplerRecord]:
        """Samplers holding ephemeral weights, of one run or of some sessions, newest first."""

        def go() -> list[SamplerRecord]:
            if run_id is not None:
                rows = self.conn.execute(
                    f"SELECT {self._SAMPLER_COLS} FROM samplers WHERE ephemeral=1 AND run_id=? "
                    "ORDER BY created DESC", (run_id,)).fetchall()
            else:
                ids = session_ids or []
                if not ids:
                    return []
                marks = ",".join("?" * len(ids))
                rows = self.conn.execute(
                    f"SELECT {self._SAMPLER_COLS} FROM samplers WHERE ephemeral=1 AND session_id IN ({marks}) "
                    "ORDER BY created DESC", ids).fetchall()
            return [self._sampler(r) for r in rows]

        return await self._call(go)

    async def stale_ephemeral_samplers(self, used_before: float) -> list[SamplerRecord]:
        """Ephemeral samplers of finished sessions not used since ``used_before``."""

        def go() -> list[SamplerRecord]:
            rows = self.conn.execute(
                f"SELECT {', '.join('s.' + c.strip() for c in self._SAMPLER_COLS.split(','))} "
                "FROM samplers s JOIN sessions ss ON ss.id = s.session_id "
                "WHERE s.ephemeral=1 AND s.adapter_path IS NOT NULL AND ss.finished IS NOT NULL "
                "AND COALESCE(s.last_used, s.created) < ?", (used_before,)).fetchall()
            return [self._sampler(r) for r in rows]

        return await self._call(go)

    async def drop_sampler_weights(self, sampler_id: str) -> None:
        """The sampler's ephemeral weights were deleted: keep the row (ids stay known), forget the path."""
        await self._call(lambda: self.conn.execute("UPDATE samplers SET adapter_path=NULL WHERE id=?", (sampler_id,)))

    async def join_sampler(self, sampler_id: str, owner: str) -> int | None:
        """A new client of a sampling session: its number (the session's first client is 0, joiners 1, 2, ...),
        or None when the owner has no such session."""

        def go(conn: sqlite3.Connection) -> int | None:
            if conn.execute("UPDATE samplers SET clients = clients + 1 WHERE id=? AND owner=?",
                            (sampler_id, owner)).rowcount != 1:
                return None
            return conn.execute("SELECT clients FROM samplers WHERE id=?", (sampler_id,)).fetchone()[0]

        return await self._call(self._tx, go)

    def touch_sampler_background(self, sampler_id: str, now: float) -> None:
        self.submit_background(
            lambda: self.conn.execute("UPDATE samplers SET last_used=? WHERE id=?", (now, sampler_id))
        )

    # --------------------------------------------------------------------------------- futures

    _FUT_COLS = ("request_id, owner, kind, model_id, seq_id, status, result, error, category, meta, created, finished, "
                 "fetched")

    @staticmethod
    def _future(r: tuple) -> FutureRecord:
        return FutureRecord(
            request_id=r[0], owner=r[1], kind=r[2], model_id=r[3], seq_id=r[4], status=r[5], result=r[6],
            error=r[7], category=r[8], meta=_loads(r[9]), created=r[10], finished=r[11], fetched=r[12],
        )

    async def insert_future(self, f: FutureRecord, *, touch_run: str | None = None) -> FutureRecord:
        """Insert a pending request. If ``(model_id, seq_id)`` is taken, return the existing record instead
        (a resubmission). ``touch_run`` also bumps that run's last request time, in the same transaction."""

        def go(conn: sqlite3.Connection) -> FutureRecord:
            if f.seq_id is not None:
                r = conn.execute(
                    f"SELECT {self._FUT_COLS} FROM futures WHERE model_id=? AND seq_id=?", (f.model_id, f.seq_id)
                ).fetchone()
                if r is not None:
                    return self._future(r)
            conn.execute(
                f"INSERT INTO futures({self._FUT_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (f.request_id, f.owner, f.kind, f.model_id, f.seq_id, f.status, f.result, f.error, f.category,
                 _dumps(f.meta), f.created, f.finished, f.fetched),
            )
            if touch_run is not None:
                conn.execute("UPDATE runs SET last_request=? WHERE id=?", (f.created, touch_run))
            return f

        return await self._call(self._tx, go)

    async def get_future(self, request_id: str) -> FutureRecord | None:
        def go() -> FutureRecord | None:
            r = self.conn.execute(f"SELECT {self._FUT_COLS} FROM futures WHERE request_id=?", (request_id,)).fetchone()
            return None if r is None else self._future(r)

        return await self._call(go)

    async def finish_future(self, request_id: str, *, status: str, result: bytes | None = None,
                            error: str | None = None, category: str | None = None, now: float | None = None) -> None:
        now = time.time() if now is None else now
        await self._call(
            lambda: self.conn.execute(
                "UPDATE futures SET status=?, result=?, error=?, category=?, finished=? "
                "WHERE request_id=? AND status='pending'",
                (status, result, error, category, now, request_id),
            )
        )

    async def finished_in_block(self, model_id: str, seq_lo: int, seq_hi: int, after_us: int, limit: int
                                ) -> list[tuple[str, str, int | None, int]]:
        """``(request_id, status, result bytes, finished µs)`` of the finished requests numbered ``seq_lo..seq_hi``
        of ``model_id`` that finished after ``after_us`` (µs since the epoch), oldest first."""
        return await self._call(lambda: self.conn.execute(
            "SELECT request_id, status, length(result), CAST(ROUND(finished * 1000000) AS INTEGER) AS done_us "
            "FROM futures WHERE model_id=? AND seq_id BETWEEN ? AND ? AND status != 'pending' "
            "AND CAST(ROUND(finished * 1000000) AS INTEGER) > ? ORDER BY done_us LIMIT ?",
            (model_id, seq_lo, seq_hi, after_us, limit)).fetchall())

    def mark_fetched_background(self, request_id: str, now: float) -> None:
        self.submit_background(
            lambda: self.conn.execute(
                "UPDATE futures SET fetched=? WHERE request_id=? AND fetched IS NULL", (now, request_id)
            )
        )

    async def find_future(self, model_id: str, seq_id: int) -> FutureRecord | None:
        def go() -> FutureRecord | None:
            r = self.conn.execute(
                f"SELECT {self._FUT_COLS} FROM futures WHERE model_id=? AND seq_id=?", (model_id, seq_id)
            ).fetchone()
            return None if r is None else self._future(r)

        return await self._call(go)

    async def numbered_futures(self, model_id: str, *, min_seq: int, limit: int = 4096) -> list[tuple[int, str]]:
        """``(seq_id, kind)`` of a run's requests from ``min_seq`` on, in order (at most ``limit``)."""
        return await self._call(lambda: [(int(s), k) for s, k in self.conn.execute(
            "SELECT seq_id, kind FROM futures WHERE model_id=? AND seq_id >= ? ORDER BY seq_id LIMIT ?",
            (model_id, min_seq, limit)).fetchall()])

    async def count_futures(self, model_id: str, *, min_seq: int = 0) -> int:
        """How many sequenced requests a run (or sampling session) has had with ``seq_id >= min_seq``."""
        return await self._call(lambda: self.conn.execute(
            "SELECT COUNT(*) FROM futures WHERE model_id=? AND seq_id >= ?", (model_id, min_seq)).fetchone()[0])

    async def pending_futures(self) -> list[FutureRecord]:
        """Every request still pending (at startup: what a process that died left running)."""
        return await self._call(lambda: [self._future(r) for r in self.conn.execute(
            f"SELECT {self._FUT_COLS} FROM futures WHERE status='pending' ORDER BY created").fetchall()])

    async def fail_pending(self, message: str, now: float | None = None) -> int:
        """Fail every request left pending by a process that died (called once at startup)."""
        now = time.time() if now is None else now

        def go() -> int:
            cur = self.conn.execute(
                "UPDATE futures SET status='failed', error=?, category='server', finished=? WHERE status='pending'",
                (message, now),
            )
            return cur.rowcount

        return await self._call(go)

    async def prune_futures(self, finished_before: float, fetched_before: float) -> int:
        """Delete results finished before ``finished_before``, or first fetched before ``fetched_before``."""

        def go() -> int:
            cur = self.conn.execute(
                "DELETE FROM futures WHERE status != 'pending' AND (finished < ? OR fetched < ?)",
                (finished_before, fetched_before),
            )
            return cur.rowcount

        return await self._call(go)

    # --------------------------------------------------------------------------------- sampled sequences

    async def record_sequences(self, records: list[SequenceRecord], now: float, *, keep_per_owner: int,
                               keep_tokens_per_owner: int | None = None) -> int:
        """Store sampled sequences; an owner past ``keep_per_owner`` sequences or ``keep_tokens_per_owner`` tokens
        loses its least recently used ones. Returns how many were dropped."""

        def go(conn: sqlite3.Connection) -> int:
            conn.executemany(
                "INSERT OR REPLACE INTO sampled_sequences(id, owner, session_id, tokens, logprobs, last_used) "
                "VALUES (?,?,?,?,?,?)",
                [(r.id, r.owner, r.session_id, np.asarray(r.tokens, dtype="<i4").tobytes(),
                  np.asarray(r.logprobs, dtype="<f4").tobytes(), now) for r in records])
            dropped = 0
            for owner in {r.owner for r in records}:
                dropped += conn.execute(
                    "DELETE FROM sampled_sequences WHERE id IN (SELECT id FROM sampled_sequences WHERE owner=? "
                    "ORDER BY last_used DESC LIMIT -1 OFFSET ?)", (owner, keep_per_owner)).rowcount
                if keep_tokens_per_owner is not None:  # int32 tokens: 4 bytes each
                    dropped += conn.execute(
                        "DELETE FROM sampled_sequences WHERE id IN (SELECT id FROM (SELECT id, SUM(length(tokens)) "
                        "OVER (ORDER BY last_used DESC, id) AS kept FROM sampled_sequences WHERE owner=?) "
                        "WHERE kept > ?)", (owner, 4 * keep_tokens_per_owner)).rowcount
            return dropped

        return await self._call(self._tx, go)

    async def use_sequences(self, owner: str, ids: list[str], now: float) -> dict[str, SequenceRecord]:
        """The owner's recorded sequences among ``ids`` (others are absent), marked used at ``now``."""

        def go(conn: sqlite3.Connection) -> dict[str, SequenceRecord]:
            found: dict[str, SequenceRecord] = {}
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                marks = ",".join("?" * len(chunk))
                for r in conn.execute(f"SELECT id, session_id, tokens, logprobs FROM sampled_sequences "
                                      f"WHERE owner=? AND id IN ({marks})", (owner, *chunk)):
                    found[r[0]] = SequenceRecord(
                        id=r[0], owner=owner, session_id=r[1],
                        tokens=np.frombuffer(r[2], dtype="<i4").tolist(),
                        logprobs=np.frombuffer(r[3], dtype="<f4").astype(float).tolist())
                conn.execute(f"UPDATE sampled_sequences SET last_used=? WHERE owner=? AND id IN ({marks})",
                             (now, owner, *chunk))
            return found

        return await self._call(self._tx, go)

    async def expire_sequences(self, used_before: float) -> int:
        return await self._call(lambda: self.conn.execute(
            "DELETE FROM sampled_sequences WHERE last_used < ?", (used_before,)).rowcount)

    # --------------------------------------------------------------------------------- usage

    def add_usage_background(self, owner: str, hour: int, session_id: str | None, base_model: str | None,
                             kind: str, quantity: int) -> None:
        """Add ``quantity`` to one hourly usage bucket (queued behind the store's other writes)."""
        self.submit_background(lambda: self.conn.execute(
            "INSERT INTO usage_hourly(owner, hour, session_id, base_model, kind, quantity) VALUES (?,?,?,?,?,?) "
            "ON CONFLICT(owner, hour, session_id, base_model, kind) DO UPDATE SET quantity = quantity + excluded.quantity",
            (owner, hour, session_id or "", base_model or "", kind, quantity)))

    async def usage_buckets(self, owner: str | None, start_hour: int, end_hour: int
                            ) -> list[tuple[str, int, str, str, str, int]]:
        """``(owner, hour, session_id, base_model, kind, quantity)`` with ``start_hour <= hour < end_hour``, of one
        owner (None: every owner), oldest first."""
        sql = ("SELECT owner, hour, session_id, base_model, kind, quantity FROM usage_hourly WHERE hour >= ? AND "
               "hour < ?")
        args: tuple = (start_hour, end_hour)
        if owner is not None:
            sql += " AND owner = ?"
            args += (owner,)
        return await self._call(lambda: self.conn.execute(sql + " ORDER BY hour, owner", args).fetchall())

    # --------------------------------------------------------------------------------- audit log

    def add_audit_background(self, now: float, owner: str, event: str, details: dict[str, Any]) -> None:
        """One audit entry: ``owner`` is the key whose resource it is about (the actor is in ``details``)."""
        self.submit_background(lambda: self.conn.execute(
            "INSERT INTO audit_log(time, owner, event, details) VALUES (?,?,?,?)", (now, owner, event, _dumps(details))))

    async def audit_entries(self, owner: str | None, prefix: str, start: float, end: float, limit: int
                            ) -> list[tuple[float, str, str, dict[str, Any]]]:
        """``(time, owner, event, details)`` in ``[start, end)`` whose event starts with ``prefix``, of one owner
        (None: all), oldest first."""
        sql = "SELECT time, owner, event, details FROM audit_log WHERE time >= ? AND time < ? AND event LIKE ?"
        args: tuple = (start, end, prefix.replace("%", "") + "%")
        if owner is not None:
            sql += " AND owner = ?"
            args += (owner,)
        return await self._call(lambda: [(t, o, e, _loads(d)) for t, o, e, d in self.conn.execute(
            sql + " ORDER BY time LIMIT ?", (*args, limit)).fetchall()])

    # --------------------------------------------------------------------------------- run history

    def add_step_background(self, run_id: str, step: int, now: float, loss: float | None, tokens: int,
                            learning_rate: float | None, grad_norm: float | None) -> None:
        self.submit_background(lambda: self.conn.execute(
            "INSERT OR REPLACE INTO run_steps(run_id, step, time, loss, tokens, learning_rate, grad_norm) "
            "VALUES (?,?,?,?,?,?,?)", (run_id, step, now, loss, tokens, learning_rate, grad_norm)))

    async def last_steps(self, run_ids: list[str]) -> dict[str, tuple[int, float | None]]:
        """Per run that has steps: ``(step, loss)`` of its newest one."""
        if not run_ids:
            return {}
        marks = ",".join("?" * len(run_ids))
        return await self._call(lambda: {r: (step, loss) for r, step, loss in self.conn.execute(
            f"SELECT s.run_id, s.step, s.loss FROM run_steps s JOIN (SELECT run_id, MAX(step) AS top FROM run_steps "
            f"WHERE run_id IN ({marks}) GROUP BY run_id) t ON s.run_id = t.run_id AND s.step = t.top",
            run_ids).fetchall()})

    async def run_steps(self, run_id: str, after_step: int, limit: int) -> list[tuple]:
        """``(step, time, loss, tokens, learning_rate, grad_norm)`` of a run's steps after ``after_step``."""
        return await self._call(lambda: self.conn.execute(
            "SELECT step, time, loss, tokens, learning_rate, grad_norm FROM run_steps WHERE run_id=? AND step > ? "
            "ORDER BY step LIMIT ?", (run_id, after_step, limit)).fetchall())

    async def prune_accounting(self, audit_before: float, usage_before: float) -> int:
        """Drop audit entries older than ``audit_before`` and usage buckets older than ``usage_before``."""

        def go(conn: sqlite3.Connection) -> int:
            n = conn.execute("DELETE FROM audit_log WHERE time < ?", (audit_before,)).rowcount
            return n + conn.execute("DELETE FROM usage_hourly WHERE hour < ?", (int(usage_before),)).rowcount

        return await self._call(self._tx, go)
