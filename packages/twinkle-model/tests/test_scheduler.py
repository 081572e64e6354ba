"""Scheduler rules: seq order, duplicates, unnumbered requests, gaps, fairness, fusion, a responsive loop."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from twinkle.common.wire import NotFoundError, UserError
from twinkle.model.scheduler import Scheduler


class Recorder:
    """Work items that record their execution order (and on which thread they ran)."""

    def __init__(self) -> None:
        self.log: list = []
        self.threads: set[str] = set()

    def job(self, tag, *, sleep: float = 0.0, fail: Exception | None = None):
        def fn():
            self.threads.add(threading.current_thread().name)
            if sleep:
                time.sleep(sleep)
            self.log.append(tag)
            if fail is not None:
                raise fail
            return {"tag": tag}

        return fn


@pytest.fixture
async def sched():
    s = Scheduler(gap_timeout_s=5.0)
    yield s
    await s.close()


async def test_out_of_order_arrival_executes_in_seq_order(sched):
    rec = Recorder()
    sched.add_run("r", next_seq=1)
    tasks = []
    for seq in (2, 4, 1, 3):  # the SDK sends chunk 1 last
        tasks.append(asyncio.create_task(sched.submit("r", seq, rec.job(seq))))
        await asyncio.sleep(0.01)
    results = await asyncio.gather(*tasks)
    assert rec.log == [1, 2, 3, 4]
    assert [r["tag"] for r in results] == [2, 4, 1, 3]
    assert rec.threads == {n for n in rec.threads if n.startswith("twinkle-model")} and rec.threads


async def test_duplicate_gets_the_first_result_and_never_runs_twice(sched):
    rec = Recorder()
    sched.add_run("r", next_seq=1)
    first = await sched.submit("r", 1, rec.job("first"))
    again = await sched.submit("r", 1, rec.job("second"))
    assert again is first and rec.log == ["first"]
    # a duplicate of a request that is still waiting shares its future
    t3 = asyncio.create_task(sched.submit("r", 3, rec.job("three")))
    await asyncio.sleep(0.01)
    t3dup = asyncio.create_task(sched.submit("r", 3, rec.job("three-dup")))
    await asyncio.sleep(0.01)
    await sched.submit("r", 2, rec.job("two"))
    assert (await t3) is (await t3dup)
    assert rec.log == ["first", "two", "three"]


async def test_duplicate_of_a_failed_request_gets_the_same_error(sched):
    rec = Recorder()
    sched.add_run("r")
    boom = UserError("bad input", field="data[0]")
    with pytest.raises(UserError) as e1:
        await sched.submit("r", 1, rec.job("x", fail=boom))
    with pytest.raises(UserError) as e2:
        await sched.submit("r", 1, rec.job("y"))
    assert e1.value is e2.value is boom
    assert await sched.submit("r", 2, rec.job("z")) == {"tag": "z"}  # a failure still consumed seq 1
    assert rec.log == ["x", "z"]


async def test_old_seq_beyond_the_result_cache_is_refused():
    s = Scheduler(result_cache=2)
    s.add_run("r")
    rec = Recorder()
    for seq in (1, 2, 3, 4):
        await s.submit("r", seq, rec.job(seq))
    with pytest.raises(UserError) as ei:
        await s.submit("r", 1, rec.job("again"))
    assert ei.value.field == "seq_id" and "behind the run" in str(ei.value) and "never run twice" in str(ei.value)
    assert rec.log == [1, 2, 3, 4]
    await s.close()


async def test_unnumbered_requests_run_in_arrival_order_after_earlier_ones(sched):
    rec = Recorder()
    sched.add_run("r", next_seq=1)
    t2 = asyncio.create_task(sched.submit("r", 2, rec.job(2)))
    await asyncio.sleep(0.01)
    tn = asyncio.create_task(sched.submit("r", None, rec.job("n1")))  # arrived after seq 2: runs after it
    await asyncio.sleep(0.01)
    await sched.submit("r", 1, rec.job(1))
    await asyncio.gather(t2, tn)
    await sched.submit("r", None, rec.job("n2"))
    await sched.submit("r", 3, rec.job(3))
    assert rec.log == [1, 2, "n1", "n2", 3]


async def test_gap_times_out_with_a_clear_error():
    s = Scheduler(gap_timeout_s=0.3)
    s.add_run("r", next_seq=1)
    rec = Recorder()
    start = time.monotonic()
    t2 = asyncio.create_task(s.submit("r", 2, rec.job(2)))
    t3 = asyncio.create_task(s.submit("r", 3, rec.job(3)))
    for t in (t2, t3):
        with pytest.raises(UserError) as ei:
            await t
        assert ei.value.field == "seq_id"
        assert "seq_id 1" in str(ei.value) and "never arrived" in str(ei.value)
    assert 0.25 < time.monotonic() - start < 3.0
    assert rec.log == []
    with pytest.raises(UserError):  # the missing one, arriving late, is refused: its turn has passed
        await s.submit("r", 1, rec.job(1))
    assert await s.submit("r", 4, rec.job(4)) == {"tag": 4}  # the run goes on
    await s.close()


async def test_runs_interleave_round_robin(sched):
    rec = Recorder()
    for rid in ("a", "b", "c"):
        sched.add_run(rid)
    blocker = asyncio.create_task(sched.run_exclusive(rec.job("block", sleep=0.2)))
    await asyncio.sleep(0.05)  # the model thread is busy: everything below queues up
    tasks = [asyncio.create_task(sched.submit(rid, seq, rec.job(f"{rid}{seq}")))
             for rid, n in (("a", 4), ("b", 2), ("c", 3)) for seq in range(1, n + 1)]
    await asyncio.gather(blocker, *tasks)
    order = rec.log[1:]
    assert order[:3] and sorted(order[:3]) == ["a1", "b1", "c1"]  # one turn each before anyone's second
    assert sorted(order[3:6]) == ["a2", "b2", "c2"]
    assert order[-1] == "a4"


async def test_control_work_goes_first_and_delete_fails_waiting_requests(sched):
    rec = Recorder()
    sched.add_run("r")
    waiting = asyncio.create_task(sched.submit("r", 2, rec.job(2)))
    await asyncio.sleep(0.01)
    sched.remove_run("r")
    with pytest.raises(NotFoundError):
        await waiting
    with pytest.raises(NotFoundError):
        await sched.submit("r", 1, rec.job(1))


async def test_batcher_fuses_heads_of_different_runs():
    batches = []

    def batcher(payloads):
        batches.append(list(payloads))
        return [f"fused-{p}" for p in payloads]

    s = Scheduler(batcher=batcher, max_batch=8)
    rec = Recorder()
    for rid in ("a", "b", "c"):
        s.add_run(rid)
    blocker = asyncio.create_task(s.run_exclusive(rec.job("block", sleep=0.2)))
    await asyncio.sleep(0.05)
    ta = [asyncio.create_task(s.submit("a", seq, rec.job(f"a{seq}"), batch_key="fb", payload=f"a{seq}"))
          for seq in (1, 2)]
    tb = asyncio.create_task(s.submit("b", 1, rec.job("b1"), batch_key="fb", payload="b1"))
    tc = asyncio.create_task(s.submit("c", 1, rec.job("c1"), payload="c1"))  # not batchable
    await asyncio.gather(blocker, *ta, tb, tc)
    assert batches[0] == ["a1", "b1"]  # one per run; a2 waits for a1's turn to finish
    assert (await ta[0]) == "fused-a1" and (await tb) == "fused-b1"
    assert (await tc) == {"tag": "c1"}
    await s.close()


async def test_event_loop_stays_responsive_during_a_long_job(sched):
    """Even a job that holds the GIL in pure Python leaves the loop its turns (the interpreter switches
    threads every few ms). Percentile bound: a loaded box may deschedule the whole process briefly."""
    sched.add_run("r")

    def busy():
        end = time.monotonic() + 0.6
        while time.monotonic() < end:
            sum(i * i for i in range(1000))

    long = asyncio.create_task(sched.submit("r", 1, busy))
    lags = []
    while not long.done():
        t = time.perf_counter()
        await asyncio.sleep(0.01)
        lags.append(time.perf_counter() - t - 0.01)
    await long
    lags.sort()
    assert len(lags) > 5, lags
    assert lags[int(len(lags) * 0.9)] < 0.05 and lags[-1] < 0.25, lags


async def test_a_sliced_job_lets_other_runs_in_between_its_slices(sched):
    """A job whose fn returns a generator runs a slice per turn; its own run's later request still waits."""
    rec = Recorder()
    sched.add_run("big", tenant="heavy")
    sched.add_run("small", tenant="light")

    def sliced():
        for part in range(3):
            rec.log.append(f"big{part}")
            time.sleep(0.02)
            if part < 2:
                yield
        return "big done"

    blocker = asyncio.create_task(sched.run_exclusive(rec.job("block", sleep=0.1)))
    await asyncio.sleep(0.02)
    big = asyncio.create_task(sched.submit("big", 1, sliced))
    big_next = asyncio.create_task(sched.submit("big", 2, rec.job("big-next")))
    await asyncio.sleep(0.02)
    small = [asyncio.create_task(sched.submit("small", seq, rec.job(f"small{seq}"))) for seq in (1, 2)]
    assert await big == "big done"
    await asyncio.gather(blocker, big_next, *small)
    order = rec.log[1:]
    assert order.index("small1") < order.index("big2")  # the light tenant got in between the slices
    assert order.index("big-next") > order.index("big2")  # the run's own next request waited for the job


async def test_the_tenant_with_least_model_time_goes_first(sched):
    """Least attained service per tenant: a tenant who used the model a lot waits behind one who did not,
    whatever the number of its runs."""
    rec = Recorder()
    for rid, tenant in (("h1", "heavy"), ("h2", "heavy"), ("l1", "light")):
        sched.add_run(rid, tenant=tenant)
    await sched.submit("h1", 1, rec.job("warm", sleep=0.3))  # heavy has used the model (far past the quantum)
    blocker = asyncio.create_task(sched.run_exclusive(rec.job("block", sleep=0.1)))
    await asyncio.sleep(0.02)
    tasks = [asyncio.create_task(sched.submit(rid, seq, rec.job(f"{rid}-{seq}", sleep=0.01)))
             for rid, seqs in (("h1", (2, 3)), ("h2", (1, 2)), ("l1", (1, 2))) for seq in seqs]
    await asyncio.gather(blocker, *tasks)
    order = [t for t in rec.log if t not in ("warm", "block")]
    assert order[:2] == ["l1-1", "l1-2"], order


async def test_bulk_work_goes_after_one_pass_work_but_keeps_its_share():
    """Slices of a split (bulk) request run after waiting one-pass requests, yet bulk work keeps about
    ``bulk_share`` of the model time while both wait: never starved."""
    s = Scheduler(bulk_share=0.25)
    spans: list[tuple[str, float]] = []  # (kind, seconds it ran)

    def timed(kind: str, seconds: float):
        t0 = time.perf_counter()
        time.sleep(seconds)
        spans.append((kind, time.perf_counter() - t0))

    def bulk_job():
        for _ in range(40):
            timed("bulk", 0.03)
            yield
        return "bulk done"

    s.add_run("big", tenant="heavy")
    s.add_run("small", tenant="light")
    try:
        blocker = asyncio.create_task(s.run_exclusive(lambda: time.sleep(0.1)))
        await asyncio.sleep(0.02)
        big = asyncio.create_task(s.submit("big", 1, bulk_job, bulk=True))
        small = [asyncio.create_task(s.submit("small", seq, lambda: timed("one-pass", 0.01))) for seq in range(1, 31)]
        await asyncio.gather(blocker, *small)
        assert spans[0][0] == "one-pass"  # queued together: the one-pass request went first
        last = max(i for i, (kind, _) in enumerate(spans) if kind == "one-pass")
        window = spans[: last + 1]
        bulk_time = sum(t for kind, t in window if kind == "bulk")
        share = bulk_time / sum(t for _, t in window)
        # the share holds up to one job either way: a bulk slice (0.03 s) in a window of ~0.4 s
        assert 0.12 < share < 0.45, (share, [k for k, _ in window])
        assert await big == "bulk done"
    finally:
        await s.close()


async def _light_tenant_waits(anticipate_s: float) -> float:
    """Mean wait of a closed-loop light tenant (a 20 ms job, then 10 ms of thinking, again) beside a heavy
    tenant who always has 60 ms slices of bulk work queued."""
    s = Scheduler(anticipate_s=anticipate_s)
    s.add_run("heavy", tenant="heavy")
    s.add_run("light", tenant="light")
    await s.submit("heavy", 1, lambda: time.sleep(0.3), bulk=True)  # bulk has had far more than its share
    heavy = [asyncio.create_task(s.submit("heavy", seq, lambda: time.sleep(0.06), bulk=True))
             for seq in range(2, 40)]
    try:
        await asyncio.sleep(0.01)
        for seq in range(1, 13):
            await s.submit("light", seq, lambda: time.sleep(0.02))
            await asyncio.sleep(0.01)
        count, waited = s.waited()["light"]
        return waited / count
    finally:
        await s.close()  # the heavy requests still waiting fail: "shut down"
        await asyncio.gather(*heavy, return_exceptions=True)


async def test_a_run_expected_back_soon_is_waited_for():
    """Anticipation: the light tenant's next request comes 10 ms after its last one finished; the scheduler
    keeps the model for it instead of starting the heavy tenant's 60 ms bulk slice it would then wait behind."""
    without = await _light_tenant_waits(anticipate_s=0.0)
    with_anticipation = await _light_tenant_waits(anticipate_s=0.1)
    assert without > 0.03, without  # each light request waited for most of a heavy job
    assert with_anticipation < 0.5 * without, (with_anticipation, without)


async def test_bulk_work_that_had_the_model_alone_is_not_starved_afterwards():
    """The shares count only time when both kinds wait: bulk work that ran alone for a while still gets its
    share at once when one-pass work arrives."""
    s = Scheduler(bulk_share=0.25)
    log: list[str] = []
    s.add_run("big", tenant="heavy")
    s.add_run("small", tenant="light")

    def bulk_job(n: int, sleep: float):
        for _ in range(n):
            time.sleep(sleep)
            log.append("bulk")
            yield
        return "done"

    def one_pass():
        time.sleep(0.01)
        log.append("one-pass")

    try:
        assert await s.submit("big", 1, lambda: bulk_job(10, 0.03), bulk=True) == "done"  # alone: 0.3 s
        log.clear()
        big = asyncio.create_task(s.submit("big", 2, lambda: bulk_job(20, 0.01), bulk=True))
        small = [asyncio.create_task(s.submit("small", seq, one_pass)) for seq in range(1, 31)]
        await asyncio.gather(big, *small)
        last = max(i for i, kind in enumerate(log) if kind == "one-pass")
        assert log[:last].count("bulk") >= 5, log  # about a quarter of the 30 + n jobs while both waited
    finally:
        await s.close()
