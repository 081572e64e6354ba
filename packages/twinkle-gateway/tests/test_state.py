"""The durable store: every record survives a close/reopen; dedupe, recovery and cleanup queries."""

from __future__ import annotations

import sqlite3
import time

import pytest

from twinkle.server.core.state import (
    ApiKeyRecord,
    CheckpointRecord,
    FutureRecord,
    RunRecord,
    SamplerRecord,
    SequenceRecord,
    SessionRecord,
    Store,
)


@pytest.fixture
async def store(tmp_path):
    s = await Store.open(str(tmp_path / "state.sqlite"))
    yield s
    await s.close()


def _session(i="sess-1", owner="p-a", t=100.0):
    return SessionRecord(id=i, owner=owner, created=t, heartbeat=t, tags=["x"], user_metadata={"k": "v"},
                         display_name="demo", sdk_version="0.38.0")


def _run(i="sess-1:train:0", owner="p-a", t=100.0):
    return RunRecord(id=i, owner=owner, session_id="sess-1", base_model="tiny", created=t, last_request=t,
                     lora={"rank": 8, "train_mlp": True}, user_metadata={"renderer": "chatml"})


def _ckpt(name="c1", kind="weights", owner="p-a", t=100.0, run_id="sess-1:train:0", **kw):
    return CheckpointRecord(run_id=run_id, kind=kind, name=name, owner=owner, path=f"/x/{name}", created=t,
                            size_bytes=10, base_model="tiny", lora={"rank": 8}, **kw)


async def test_wal_mode_and_schema(tmp_path, store):
    conn = sqlite3.connect(store.path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"meta", "api_keys", "sessions", "runs", "checkpoints", "samplers", "futures"} <= tables
    conn.close()


async def test_everything_survives_a_restart(tmp_path):
    path = str(tmp_path / "s.sqlite")
    s = await Store.open(path)
    await s.create_session(_session())
    await s.create_run(_run())
    await s.put_checkpoint(_ckpt(user_metadata={"step": "3"}, expires_at=5000.0))
    await s.create_sampler(SamplerRecord(id="sess-1:sample:0", owner="p-a", session_id="sess-1", base_model="tiny",
                                         created=100.0, adapter_path="/x/a", ephemeral=True, run_id="sess-1:train:0"))
    await s.insert_future(FutureRecord(request_id="req-1", owner="p-a", kind="optim_step", created=100.0,
                                       model_id="sess-1:train:0", seq_id=2))
    await s.finish_future("req-1", status="done", result=b'{"metrics":{}}', now=101.0)
    await s.replace_keys("config", [ApiKeyRecord(key_hash="h1", principal="p-a", source="config", created=1.0)])
    await s.close()

    s = await Store.open(path)
    try:
        assert await s.get_session("sess-1") == _session()
        assert await s.get_session("sess-1", owner="p-b") is None
        assert await s.get_run("sess-1:train:0") == _run()
        c = await s.get_checkpoint("sess-1:train:0", "weights", "c1")
        assert c.user_metadata == {"step": "3"} and c.expires_at == 5000.0 and c.lora == {"rank": 8}
        assert (await s.get_sampler("sess-1:sample:0")).ephemeral
        f = await s.get_future("req-1")
        assert (f.status, f.result, f.finished) == ("done", b'{"metrics":{}}', 101.0)
        assert [k.principal for k in await s.list_keys()] == ["p-a"]
        assert await s.session_children("sess-1") == (["sess-1:train:0"], ["sess-1:sample:0"])
    finally:
        await s.close()


async def test_future_dedupe_on_model_and_seq(store):
    first = FutureRecord(request_id="req-1", owner="p-a", kind="forward_backward", created=1.0, model_id="m",
                         seq_id=1)
    assert (await store.insert_future(first)).request_id == "req-1"
    again = FutureRecord(request_id="req-2", owner="p-a", kind="forward_backward", created=2.0, model_id="m",
                         seq_id=1)
    assert (await store.insert_future(again)).request_id == "req-1"
    assert await store.get_future("req-2") is None
    # different seq, or no seq at all: new requests
    other = FutureRecord(request_id="req-3", owner="p-a", kind="optim_step", created=3.0, model_id="m", seq_id=2)
    assert (await store.insert_future(other)).request_id == "req-3"
    for i in (4, 5):
        unnumbered = FutureRecord(request_id=f"req-{i}", owner="p-a", kind="sample", created=4.0)
        assert (await store.insert_future(unnumbered)).request_id == f"req-{i}"
    assert (await store.find_future("m", 2)).request_id == "req-3"
    assert await store.count_futures("m", min_seq=1) == 2


async def test_insert_future_touches_the_run(store):
    await store.create_run(_run(t=100.0))
    await store.insert_future(FutureRecord(request_id="r", owner="p-a", kind="optim_step", created=555.0,
                                           model_id="sess-1:train:0", seq_id=1), touch_run="sess-1:train:0")
    assert (await store.get_run("sess-1:train:0")).last_request == 555.0


async def test_fail_pending_and_terminal_states(store):
    for i in range(3):
        await store.insert_future(FutureRecord(request_id=f"r{i}", owner="p", kind="x", created=1.0))
    await store.finish_future("r0", status="done", result=b"{}")
    assert await store.fail_pending("server restarted") == 2
    r1 = await store.get_future("r1")
    assert (r1.status, r1.category, r1.error) == ("failed", "server", "server restarted")
    # a finished request never goes back
    await store.finish_future("r0", status="failed", error="late")
    assert (await store.get_future("r0")).status == "done"


async def test_prune_futures(store):
    now = time.time()
    for i, (finished, fetched) in enumerate([(now - 10, None), (now - 100, None), (now - 10, now - 50)]):
        await store.insert_future(FutureRecord(request_id=f"r{i}", owner="p", kind="x", created=finished))
        await store.finish_future(f"r{i}", status="done", result=b"{}", now=finished)
        if fetched:
            store.mark_fetched_background(f"r{i}", fetched)
    await store.insert_future(FutureRecord(request_id="pending", owner="p", kind="x", created=now - 1000))
    assert await store.prune_futures(finished_before=now - 60, fetched_before=now - 30) == 2
    assert await store.get_future("r0") is not None
    assert await store.get_future("pending") is not None


async def test_sessions(store):
    await store.create_session(_session("s1", t=10.0))
    await store.create_session(_session("s2", t=20.0))
    await store.create_session(_session("s3", owner="p-b", t=30.0))
    page = await store.list_sessions("p-a", limit=1, offset=0)
    assert page.total == 2 and [s.id for s in page.items] == ["s2"]
    assert (await store.heartbeat("s1", "p-a", 50.0)).heartbeat == 50.0
    assert await store.heartbeat("s1", "p-b", 60.0) is None
    assert not await store.finish_session("s1", "p-b", "success", 70.0)
    assert await store.finish_session("s1", "p-a", "success", 70.0)
    assert await store.finish_session("s1", "p-a", "errored", 80.0)  # first wins
    s1 = await store.get_session("s1")
    assert (s1.finished, s1.finish_reason) == (70.0, "success")
    assert (await store.heartbeat("s1", "p-a", 90.0)).heartbeat == 50.0  # finished: not revived
    assert await store.expire_sessions(heartbeat_before=25.0, now=100.0) == ["s2"]
    assert (await store.get_session("s2")).finish_reason == "expired"
    # a heartbeat brings a session closed for silence back; one finished by its client stays finished
    revived = await store.heartbeat("s2", "p-a", 110.0)
    assert (revived.finished, revived.heartbeat) == (None, 110.0)


async def test_runs_and_checkpoints(store):
    await store.create_run(_run("a:train:0", t=1.0))
    await store.create_run(_run("a:train:1", t=2.0))
    assert not await store.create_run(_run("a:train:1", t=3.0))
    await store.create_run(_run("b:train:0", owner="p-b"))
    page = await store.list_runs("p-a", limit=10, offset=0)
    assert [r.id for r in page.items] == ["a:train:1", "a:train:0"] and page.total == 2
    assert (await store.list_runs("p-a", limit=1, offset=1)).items[0].id == "a:train:0"

    await store.put_checkpoint(_ckpt("w1", run_id="a:train:0", t=1.0))
    await store.put_checkpoint(_ckpt("w2", run_id="a:train:0", t=2.0, expires_at=10.0))
    await store.put_checkpoint(_ckpt("s1", kind="sampler_weights", run_id="a:train:0", t=3.0))
    latest = await store.latest_checkpoints(["a:train:0", "a:train:1"])
    assert latest[("a:train:0", "weights")].name == "w2"
    assert latest[("a:train:0", "sampler_weights")].name == "s1"
    assert [c.name for c in await store.list_checkpoints("a:train:0")] == ["w1", "w2", "s1"]
    page = await store.list_user_checkpoints("p-a", limit=2, offset=0)
    assert page.total == 3 and [c.name for c in page.items] == ["s1", "w2"]
    assert await store.update_checkpoint("a:train:0", "weights", "w1", public=True)
    assert (await store.get_checkpoint("a:train:0", "weights", "w1")).public
    assert [c.name for c in await store.expired_checkpoints(now=11.0)] == ["w2"]
    assert await store.delete_checkpoint("a:train:0", "weights", "w2")
    assert not await store.delete_checkpoint("a:train:0", "weights", "w2")
    with pytest.raises(ValueError):
        await store.update_checkpoint("a:train:0", "weights", "w1", path="/etc")


async def test_ephemeral_samplers(store):
    await store.create_session(_session("s1"))
    for i in range(3):
        await store.create_sampler(SamplerRecord(
            id=f"s1:sample:{i}", owner="p-a", session_id="s1", base_model="tiny", created=float(i),
            adapter_path=f"/x/{i}", ephemeral=True, run_id="r", last_used=float(i)))
    assert [s.id for s in await store.ephemeral_samplers(run_id="r")] == ["s1:sample:2", "s1:sample:1",
                                                                         "s1:sample:0"]
    assert await store.stale_ephemeral_samplers(used_before=10.0) == []  # session still live
    await store.finish_session("s1", "p-a", "success", 5.0)
    assert len(await store.stale_ephemeral_samplers(used_before=1.5)) == 2
    await store.drop_sampler_weights("s1:sample:0")
    assert (await store.get_sampler("s1:sample:0")).adapter_path is None
    assert len(await store.stale_ephemeral_samplers(used_before=1.5)) == 1


async def test_no_raw_keys_and_keys_follow_config(store):
    await store.replace_keys("config", [ApiKeyRecord(key_hash="h1", principal="p1", source="config", created=1.0),
                                        ApiKeyRecord(key_hash="h2", principal="p2", source="config", created=1.0)])
    await store.replace_keys("admin", [ApiKeyRecord(key_hash="h3", principal="p3", source="admin", created=1.0)])
    await store.replace_keys("config", [ApiKeyRecord(key_hash="h2", principal="p2", source="config", created=2.0)])
    assert sorted(k.key_hash for k in await store.list_keys()) == ["h2", "h3"]
    assert await store.meta_setdefault("auth_salt", "aa") == "aa"
    assert await store.meta_setdefault("auth_salt", "bb") == "aa"


async def test_closed_store_refuses(tmp_path):
    s = await Store.open(str(tmp_path / "s.sqlite"))
    await s.close()
    with pytest.raises(RuntimeError, match="closed"):
        await s.get_session("x")


def test_the_store_survives_sigkill_mid_write(tmp_path):
    """WAL: a process killed while writing leaves a database that opens, passes SQLite's integrity check and
    holds every committed row."""
    import signal
    import sqlite3
    import subprocess
    import sys
    import textwrap
    import time

    db = tmp_path / "state.sqlite"
    script = textwrap.dedent(f"""
        import asyncio, time
        from twinkle.server.core.state import FutureRecord, Store

        async def main():
            store = await Store.open({str(db)!r})
            print("ready", flush=True)
            i = 0
            while True:
                i += 1
                await store.insert_future(FutureRecord(request_id=f"req-{{i}}", owner="p-x", kind="k",
                                                       created=time.time(), model_id="run", seq_id=i))
                await store.finish_future(f"req-{{i}}", status="done", result=b"x" * 4096)

        asyncio.run(main())
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    rows = conn.execute("SELECT seq_id, status FROM futures ORDER BY seq_id").fetchall()
    conn.close()
    assert rows and [r[0] for r in rows] == list(range(1, len(rows) + 1))  # no gap: each insert committed whole

    async def reopen():
        from twinkle.server.core.state import Store

        store = await Store.open(str(db))
        try:
            return await store.get_future("req-1")
        finally:
            await store.close()

    import asyncio

    assert asyncio.run(reopen()).status == "done"


async def test_recorded_sequences_are_exact_per_owner_bounded_and_expire(tmp_path):
    path = str(tmp_path / "state.sqlite")
    store = await Store.open(path)

    def seq(i, owner="p-a"):
        return SequenceRecord(id=f"seq-{i}", owner=owner, session_id="sess-1", tokens=[i, 4095, 0],
                              logprobs=[-0.5, -1e-7, -17.25])

    assert await store.record_sequences([seq(1), seq(2), seq(3)], 100.0, keep_per_owner=2) == 1
    assert await store.record_sequences([seq(9, owner="p-b")], 100.0, keep_per_owner=2) == 0
    await store.close()
    store = await Store.open(path)  # durable
    try:
        found = await store.use_sequences("p-a", ["seq-1", "seq-2", "seq-3", "seq-9"], 200.0)
        assert sorted(found) == ["seq-2", "seq-3"]  # one over the cap was dropped; another owner's is invisible
        assert found["seq-2"].tokens == [2, 4095, 0]
        assert found["seq-2"].logprobs == [-0.5, float(__import__("numpy").float32(-1e-7)), -17.25]
        # use restarts the retention clock: seq-9 (unused since 100) expires, the used ones stay
        assert await store.expire_sequences(150.0) == 1
        assert sorted(await store.use_sequences("p-a", ["seq-2", "seq-3"], 300.0)) == ["seq-2", "seq-3"]
        assert await store.use_sequences("p-b", ["seq-9"], 300.0) == {}
    finally:
        await store.close()


async def test_a_database_from_before_inflight_sessions_opens_and_gains_the_column(tmp_path):
    path = tmp_path / "old.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE samplers (id TEXT PRIMARY KEY, owner TEXT NOT NULL, session_id TEXT, base_model TEXT "
                 "NOT NULL, created REAL NOT NULL, model_path TEXT, adapter_path TEXT, run_id TEXT, ephemeral INTEGER "
                 "NOT NULL DEFAULT 0, last_used REAL)")
    conn.execute("INSERT INTO samplers(id, owner, base_model, created) VALUES ('s:sample:0', 'p-a', 'tiny', 1.0)")
    conn.commit()
    conn.close()
    store = await Store.open(str(path))
    try:
        old = await store.get_sampler("s:sample:0")
        assert old is not None and old.inflight is False
        await store.create_sampler(SamplerRecord(id="s:sample:1", owner="p-a", session_id="s", base_model="tiny",
                                                 created=2.0, run_id="r", ephemeral=True, adapter_path="/x",
                                                 inflight=True))
        assert (await store.get_sampler("s:sample:1")).inflight is True
    finally:
        await store.close()


async def test_recorded_sequences_are_bounded_by_tokens_too(store):
    def seq(i, n):
        return SequenceRecord(id=f"seq-{i}", owner="p-a", session_id="s", tokens=[1] * n, logprobs=[-1.0] * n)

    await store.record_sequences([seq(1, 40)], 100.0, keep_per_owner=10, keep_tokens_per_owner=100)
    await store.record_sequences([seq(2, 40)], 101.0, keep_per_owner=10, keep_tokens_per_owner=100)
    # a third one overflows the 100-token budget: the least recently used (seq-1) goes
    assert await store.record_sequences([seq(3, 40)], 102.0, keep_per_owner=10, keep_tokens_per_owner=100) == 1
    assert sorted(await store.use_sequences("p-a", ["seq-1", "seq-2", "seq-3"], 103.0)) == ["seq-2", "seq-3"]


async def test_accounting_is_pruned_after_its_retention(store):
    store.add_audit_background(10.0, "p-a", "checkpoint_create", {"actor": "p-a"})
    store.add_audit_background(500.0, "p-a", "checkpoint_delete", {"actor": "p-a"})
    store.add_usage_background("p-a", 0, "s", "tiny", "training", 5)
    store.add_usage_background("p-a", 3600, "s", "tiny", "training", 7)
    assert await store.prune_accounting(audit_before=100.0, usage_before=3600.0) == 2
    assert [e[2] for e in await store.audit_entries(None, "", 0.0, 1e9, 10)] == ["checkpoint_delete"]
    assert [b[5] for b in await store.usage_buckets(None, 0, 10**9)] == [7]
