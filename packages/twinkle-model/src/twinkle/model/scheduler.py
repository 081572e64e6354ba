"""Per-run ordering, de-duplication and fair interleaving of model work, executed off the event loop.

Why: the Tinker SDK sends the requests of one training client concurrently and tags each with a ``seq_id``
(chunks of one forward_backward arrive as 2, 1, 3 — chunk 1 last on purpose). The server must run each run's
requests strictly in ``seq_id`` order, answer a retried ``seq_id`` from the first execution (never step
twice), and keep every other user and the event loop moving meanwhile.

The rules (also in the README):

- **Start.** The scheduler is told each run's first expected ``seq_id`` when the run is added (the service
  uses 1, the SDK's first training request; create-from-checkpoint passes the load's own ``seq_id``, 0 for the
  SDK). Requests with a larger ``seq_id`` wait in a buffer; nothing guesses the start from arrival order,
  because the very first forward_backward of the SDK arrives with its chunk 1 last.
- **Order.** A numbered request runs when its ``seq_id`` is the run's next expected one; afterwards the next
  expected is ``seq_id + 1``.
- **Duplicates.** A ``seq_id`` that is waiting, running or done is answered with the first request's result
  (the same object, or the same exception); the duplicate's payload is ignored. Results of the last
  ``result_cache`` (default 32) executed requests per run are kept — retries come within seconds, and a
  forward_backward result can be large; an older repeated ``seq_id`` is a ``UserError``, never a re-run.
- **Unnumbered** (``seq_id`` None) requests run after everything of that run that arrived before them, in
  arrival order, and consume no ``seq_id``: formally one takes the slot just after the highest ``seq_id`` the
  run has seen so far.
- **Gaps.** If a run has waiting requests but its next expected ``seq_id`` does not arrive within
  ``gap_timeout_s`` of the run last making progress, every waiting request of that run fails with a
  ``UserError(field="seq_id")`` naming the missing ``seq_id``, and the run's next expected ``seq_id`` moves
  past them (a late arrival of the missing one is then refused as too old).
- **A failed request still consumes its ``seq_id``**, so one bad request never stalls a run.
- **Fairness.** Control work (creating, deleting, offloading adapters) goes first. Then the runnable run
  whose *tenant* (the run's owner) has had the least model time lately goes next (least attained service,
  decaying with a half-life of ``fair_half_life_s``); runs of one tenant, and tenants within
  ``fair_quantum_s`` of the least, take turns. A tenant sending little waits for at most the slice running
  now, however much others send.
- **Bulk work.** A job submitted with ``bulk=True`` (the service marks requests it must split into several
  passes) runs after waiting one-pass work, except that bulk work as a whole keeps at least ``bulk_share`` of
  the model time while both kinds are about (waiting, or active within the last second; only that time
  counts, decaying like the tenants' time): so oversized requests cannot slow well-sized ones much, and are
  never starved. Either kind alone gets the whole model.
- **Anticipation.** A run of one-pass work that ran out of work a moment ago usually sends its next request
  within its think time (its client reads the result, then sends the next step). When only bulk work is
  waiting and not short of its share, the scheduler keeps the model idle for such a run, up to
  ``min(anticipate_s, 2 x its mean think time)``, instead of starting a bulk slice the run would then wait
  behind. Runs that think longer than ``anticipate_s`` are not waited for; one-pass work of others is never
  held back this way (its jobs are short, and the wait would cost more than it saves).
- **Slices.** A job whose ``fn`` returns a generator runs one slice per ``next()`` (a backend yields between
  micro-batches): after each slice the run's turn ends and other runs may go, while this run's later
  requests still wait for the job to finish. A slice must leave the shared model as it found it.
- **Fusion** (optional): when a ``batcher`` is given, the head requests of several runs that share a
  ``batch_key`` are handed to it together (at most ``max_batch``), one per run, in round-robin order.
- **Execution** happens on ONE dedicated thread: ops of different adapters share one base model and must not
  overlap, and the asyncio loop never runs torch code, so health checks and other users' polls stay fast.
  A caller that stops waiting (cancellation) does not cancel its request: it holds a ``seq_id``.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import inspect
import itertools
import logging
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

from twinkle.common.wire import NotFoundError, UserError

log = logging.getLogger(__name__)

_RECENT_S = 1.0  # a run idle this long is still "about" for the bulk/one-pass shares (clients think between steps)


@dataclass
class Job:
    fn: Callable[[], Any]
    future: asyncio.Future
    seq_id: int | None
    key: tuple[int, int]  # execution order within the run: (seq_id, 0) or (highest seen, arrival)
    batch_key: str | None = None
    payload: Any = None
    slices: Generator[None, None, Any] | None = None  # a sliced job under way
    arrived: float = field(default_factory=time.monotonic)
    started: bool = False
    bulk: bool = False


@dataclass
class _RunQueue:
    run_id: str
    next_seq: int
    highest_seen: int  # highest seq_id seen (next_seq - 1 if none)
    waiting: dict[int, Job] = field(default_factory=dict)  # numbered, not yet run
    unnumbered: collections.deque[Job] = field(default_factory=collections.deque)
    results: collections.OrderedDict[int, asyncio.Future] = field(default_factory=collections.OrderedDict)
    progress_at: float = field(default_factory=time.monotonic)
    running: bool = False
    tenant: str = ""
    resume: Job | None = None  # a sliced job between two of its slices
    idle_at: float | None = None  # when it last ran out of work
    think_s: float | None = None  # mean time from running out of work to its next request
    last_bulk: bool = False  # whether its last job was bulk work

    def head(self) -> Job | None:
        """The job that may run now, if any."""
        if self.running:
            return None
        if self.resume is not None:
            return self.resume
        if self.unnumbered and self.unnumbered[0].key[0] < self.next_seq:
            return self.unnumbered[0]
        return self.waiting.get(self.next_seq)

    def pending(self) -> int:
        return len(self.waiting) + len(self.unnumbered) + int(self.resume is not None)


class Scheduler:
    def __init__(
        self,
        *,
        gap_timeout_s: float = 30.0,
        result_cache: int = 32,
        batcher: Callable[[list[Any]], list[Any]] | None = None,
        max_batch: int = 8,
        thread_name: str = "twinkle-model",
        fair_half_life_s: float = 30.0,
        fair_quantum_s: float = 0.05,
        bulk_share: float = 0.25,
        anticipate_s: float = 0.1,
    ) -> None:
        if not 0.0 < bulk_share <= 1.0:
            raise ValueError("bulk_share must be in (0, 1]")
        self.gap_timeout_s = gap_timeout_s
        self.fair_half_life_s = fair_half_life_s
        self.fair_quantum_s = fair_quantum_s
        self.bulk_share = bulk_share
        self.anticipate_s = anticipate_s
        self._served: dict[str, tuple[float, float]] = {}  # tenant -> (model seconds, when last updated)
        self._served_bulk = (0.0, 0.0)  # model seconds of all work, of bulk work
        self._served_at = time.monotonic()
        self.result_cache = result_cache
        self.batcher = batcher
        self.max_batch = max_batch
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=thread_name)
        self._runs: dict[str, _RunQueue] = {}
        self._rotation: collections.deque[str] = collections.deque()
        self._control: collections.deque[Job] = collections.deque()
        self._arrivals = itertools.count(1)
        self._wakeup: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._busy_since: float | None = None
        self._waited: dict[str, tuple[int, float]] = {}  # tenant -> (jobs started, seconds they waited)
        self._closed = False

    # --- runs -----------------------------------------------------------------------------------------

    def add_run(self, run_id: str, next_seq: int = 1, results: dict[int, Any] | None = None,
                tenant: str | None = None) -> None:
        """Add a run whose requests are expected from ``next_seq`` on; ``results`` are answers already given
        (a restored run's last step), returned to a repeat of their ``seq_id``. ``tenant`` (default: the run
        itself) is who shares model time fairly with the others."""
        if run_id in self._runs:
            raise UserError(f"training run {run_id!r} already exists", field="run_id", status=409)
        q = _RunQueue(run_id=run_id, next_seq=next_seq, highest_seen=next_seq - 1, tenant=tenant or run_id)
        for seq_id, value in (results or {}).items():
            done = asyncio.get_running_loop().create_future()
            done.set_result(value)
            q.results[seq_id] = done
        self._runs[run_id] = q
        self._rotation.append(run_id)

    def remove_run(self, run_id: str, error: Exception | None = None) -> None:
        """Forget a run; its waiting requests fail with ``error`` (default: not found)."""
        q = self._runs.pop(run_id, None)
        if q is None:
            return
        with contextlib.suppress(ValueError):
            self._rotation.remove(run_id)
        err = error or NotFoundError(f"training run {run_id!r} was deleted", field="run_id")
        if q.resume is not None:
            q.resume.slices.close()
        for job in list(q.waiting.values()) + list(q.unnumbered) + ([q.resume] if q.resume else []):
            if not job.future.done():
                job.future.set_exception(err)
        q.waiting.clear()
        q.unnumbered.clear()
        q.resume = None
        if all(other.tenant != q.tenant for other in self._runs.values()):
            self._waited.pop(q.tenant, None)  # its last run here is gone

    def has_run(self, run_id: str) -> bool:
        return run_id in self._runs

    def next_seq(self, run_id: str) -> int:
        """The ``seq_id`` after every one this run has seen (waiting, running or done): where a client that
        attaches to an existing run continues its numbering."""
        q = self._queue(run_id)
        return max(q.next_seq, q.highest_seen + 1)

    def expected(self, run_id: str) -> int:
        """The ``seq_id`` this run runs next."""
        return self._queue(run_id).next_seq

    def knows(self, run_id: str, seq_id: int) -> bool:
        """Whether ``seq_id`` of this run is waiting, running, or done with its answer kept."""
        q = self._queue(run_id)
        return seq_id in q.waiting or seq_id in q.results

    def consume(self, run_id: str, seq_ids: list[int], error: Exception) -> list[int]:
        """Use up ``seq_ids`` that will never arrive here (they ran somewhere that is gone): each fails with
        ``error`` in its turn, so later requests do not wait for it. Returns the ones consumed."""
        q = self._queue(run_id)
        loop = asyncio.get_running_loop()
        consumed = []

        def refuse() -> None:
            raise error

        for seq_id in sorted(set(seq_ids)):
            if seq_id < q.next_seq or seq_id in q.waiting or seq_id in q.results:
                continue
            q.waiting[seq_id] = Job(refuse, loop.create_future(), seq_id, (seq_id, 0))
            q.highest_seen = max(q.highest_seen, seq_id)
            consumed.append(seq_id)
        if consumed:
            self._wake()
        return consumed

    def _queue(self, run_id: str) -> _RunQueue:
        q = self._runs.get(run_id)
        if q is None:
            raise NotFoundError(f"training run {run_id!r} not found", field="run_id")
        return q

    def pending(self, run_id: str | None = None) -> int:
        if run_id is not None:
            q = self._runs.get(run_id)
            return 0 if q is None else q.pending() + int(q.running)
        return sum(q.pending() + int(q.running) for q in self._runs.values()) + len(self._control)

    @property
    def busy_for_s(self) -> float:
        return 0.0 if self._busy_since is None else time.monotonic() - self._busy_since

    def waited(self) -> dict[str, tuple[int, float]]:
        """Per tenant with a run here: how many jobs started, and how long in all they waited to start."""
        return dict(self._waited)

    # --- submission -----------------------------------------------------------------------------------

    async def submit(
        self,
        run_id: str,
        seq_id: int | None,
        fn: Callable[[], Any],
        *,
        batch_key: str | None = None,
        payload: Any = None,
        bulk: bool = False,
    ) -> Any:
        """Queue ``fn`` as request ``seq_id`` of ``run_id`` and wait for its result (see the module rules);
        ``bulk``: the job is bulk work (see Bulk work)."""
        self._ensure_loop()
        q = self._runs.get(run_id)
        if q is None:
            raise NotFoundError(f"training run {run_id!r} not found", field="run_id")
        loop = asyncio.get_running_loop()
        if not q.pending() and not q.running:
            q.progress_at = time.monotonic()  # the gap timer of an idle run starts now
        if seq_id is None:
            job = Job(fn, loop.create_future(), None, (q.highest_seen, next(self._arrivals)), batch_key, payload,
                      bulk=bulk)
            q.unnumbered.append(job)
        else:
            if isinstance(seq_id, bool) or not isinstance(seq_id, int):
                raise UserError(f"seq_id must be an integer, got {seq_id!r}", field="seq_id")
            first = q.results.get(seq_id) or (q.waiting[seq_id].future if seq_id in q.waiting else None)
            if first is not None:  # a retry: answer with the first request's result, never run again
                return await asyncio.shield(first)
            if seq_id < q.next_seq:
                raise UserError(
                    f"seq_id {seq_id} of run {run_id!r} is behind the run (it expects seq_id {q.next_seq} next): it "
                    "was applied already, or given up after a gap timeout, and its answer is no longer kept; a "
                    "request is never run twice",
                    field="seq_id",
                )
            job = Job(fn, loop.create_future(), seq_id, (seq_id, 0), batch_key, payload, bulk=bulk)
            q.waiting[seq_id] = job
            q.highest_seen = max(q.highest_seen, seq_id)
        self._note_arrival(q, job.arrived)
        self._wake()
        return await asyncio.shield(job.future)

    async def run_exclusive(self, fn: Callable[[], Any]) -> Any:
        """Run control work (create/delete/offload an adapter) on the model thread, before queued requests."""
        self._ensure_loop()
        job = Job(fn, asyncio.get_running_loop().create_future(), None, (0, 0))
        self._control.append(job)
        self._wake()
        return await asyncio.shield(job.future)

    # --- the dispatcher -------------------------------------------------------------------------------

    def _ensure_loop(self) -> None:
        if self._closed:
            raise RuntimeError("scheduler is closed")
        loop = asyncio.get_running_loop()
        if self._loop_task is None or self._loop_task.done() or self._loop_task.get_loop() is not loop:
            self._wakeup = asyncio.Event()
            self._loop_task = loop.create_task(self._dispatch(), name="twinkle-scheduler")

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    async def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._expire_gaps()
            batch, expected_until, contended = self._pick()
            if not batch:
                self._wakeup.clear()
                timeout = self._next_deadline()
                if expected_until is not None:  # keep the model for a run whose next request is due
                    wait = max(0.0, expected_until - time.monotonic())
                    timeout = wait if timeout is None else min(timeout, wait)
                try:
                    await asyncio.wait_for(self._wakeup.wait(), timeout=timeout)
                except TimeoutError:
                    pass
                continue
            queues = [self._runs.get(rid) for rid, _ in batch]
            for q in queues:
                if q is not None:
                    q.running = True
            jobs = [job for _, job in batch]
            started = self._busy_since = time.monotonic()
            for job, q in zip(jobs, queues):
                if not job.started and q is not None:  # a sliced job waits once, before its first slice
                    job.started = True
                    count, total = self._waited.get(q.tenant, (0, 0.0))
                    self._waited[q.tenant] = (count + 1, total + started - job.arrived)
            try:
                if len(jobs) == 1:
                    outcomes = [await loop.run_in_executor(self._executor, _call, jobs[0])]
                else:
                    payloads = [j.payload for j in jobs]
                    outcomes = await loop.run_in_executor(self._executor, _call_batch, self.batcher, payloads)
            except asyncio.CancelledError:
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(RuntimeError("model service shut down"))
                raise
            finally:
                self._busy_since = None
            now = time.monotonic()
            kind = jobs[0].bulk if contended else None
            self._charge([q.tenant for q in queues if q is not None], now - started, now, kind)
            for job, q, (ok, value) in zip(jobs, queues, outcomes):
                if ok is None:  # a slice of a sliced job: the run's turn ends, the job goes on later
                    if q is not None:
                        q.running, q.resume, q.progress_at = False, job, now
                    continue
                if not job.future.done():
                    if ok:
                        job.future.set_result(value)
                    else:
                        job.future.set_exception(value)
                        job.future.exception()  # mark retrieved: its caller may have gone away
                if q is not None:
                    q.running = False
                    q.progress_at = now
                    if not q.pending():
                        q.idle_at, q.last_bulk = now, job.bulk
            await asyncio.sleep(0)  # let awaiting callers run before the next job

    def _charge(self, tenants: list[str], seconds: float, now: float, bulk: bool | None) -> None:
        """Add model time to the tenants that used it (split evenly in a fused pass), and to its kind (``bulk``
        None: the other kind was not about, so the time is nobody's share)."""
        for tenant in tenants:
            self._served[tenant] = (self._service(tenant, now) + seconds / len(tenants), now)
        if len(self._served) > 4 * len(self._runs) + 64:  # forget tenants whose service has decayed away
            self._served = {t: v for t, v in self._served.items() if self._service(t, now) > 1e-6}
        if bulk is None:
            return
        total, of_bulk = self._served_bulk
        total, of_bulk = self._decayed(total, self._served_at, now), self._decayed(of_bulk, self._served_at, now)
        self._served_bulk = (total + seconds, of_bulk + (seconds if bulk else 0.0))
        self._served_at = now

    def _decayed(self, seconds: float, at: float, now: float) -> float:
        """Model time counted at ``at``, halved every ``fair_half_life_s`` since."""
        return seconds * 0.5 ** ((now - at) / self.fair_half_life_s)

    def _service(self, tenant: str, now: float) -> float:
        """The tenant's model time, decayed to ``now``."""
        seconds, at = self._served.get(tenant, (0.0, now))
        return self._decayed(seconds, at, now)

    def _bulk_due(self) -> bool:
        """Whether bulk work has had less than its share of the model time lately."""
        total, of_bulk = self._served_bulk
        return of_bulk < self.bulk_share * total

    def _note_arrival(self, q: _RunQueue, now: float) -> None:
        """A new request of an idle run: learn the run's think time (capped, so one pause costs a few steps)."""
        if q.idle_at is None:
            return
        gap = min(max(0.0, now - q.idle_at), 4 * self.anticipate_s)
        q.think_s = gap if q.think_s is None else 0.7 * q.think_s + 0.3 * gap
        q.idle_at = None

    def _expected_until(self, q: _RunQueue, now: float) -> float | None:
        """Until when the idle run ``q`` is worth waiting for (see Anticipation), or None."""
        if q.idle_at is None or q.last_bulk or q.think_s is None or q.think_s > self.anticipate_s:
            return None
        until = q.idle_at + min(self.anticipate_s, 2 * q.think_s)
        return until if now < until else None

    def _next_run(self) -> tuple[str | None, float | None, bool]:
        """The run to go next: the kind of work due (one-pass, or bulk when it is short of its share), then
        the run whose tenant has had the least model time, in rotation order among those within
        ``fair_quantum_s`` of the least (so that equal users simply take turns). When only bulk work is here,
        not due, and a one-pass run is expected back soon, the answer is (None, until when to wait for it).
        The last item says whether the other kind is about too (waiting, or active within ``_RECENT_S``): only
        then does the time count to the shares."""
        now = time.monotonic()
        runnable = [(rid, job.bulk) for rid in self._rotation if (job := self._runs[rid].head()) is not None]
        if not runnable:
            return None, None, False
        kinds = {bulk for _, bulk in runnable}
        bulk = kinds == {True}
        if len(kinds) == 2:
            bulk = self._bulk_due()
        elif bulk and self.anticipate_s > 0 and not self._bulk_due():
            expected = [until for q in self._runs.values() if (until := self._expected_until(q, now)) is not None]
            if expected:
                return None, min(expected), True
        contended = len(kinds) == 2 or any(
            q.idle_at is not None and q.last_bulk != bulk and now - q.idle_at < _RECENT_S for q in self._runs.values())
        services = [(rid, self._service(self._runs[rid].tenant, now)) for rid, b in runnable if b == bulk]
        least = min(service for _, service in services)
        best = next(rid for rid, service in services if service <= least + self.fair_quantum_s)
        self._rotation.remove(best)
        self._rotation.append(best)
        return best, None, contended

    def _pick(self) -> tuple[list[tuple[str | None, Job]], float | None, bool]:
        """The jobs to run now (several when fused), or none and until when a run is expected back; and
        whether the other kind of work is about too (see ``_next_run``)."""
        if self._control:
            return [(None, self._control.popleft())], None, False
        rid, expected_until, contended = self._next_run()
        if rid is None:
            return [], expected_until, contended
        q = self._runs[rid]
        job = q.head()
        picked = [(rid, self._take(q, job))]
        if self.batcher is not None and job.batch_key is not None and job.slices is None:
            for other in list(self._rotation):
                if len(picked) >= self.max_batch:
                    break
                oq = self._runs[other]
                if other == rid:
                    continue
                oj = oq.head()
                if oj is not None and oj.batch_key == job.batch_key and oj.slices is None and oj.bulk == job.bulk:
                    picked.append((other, self._take(oq, oj)))
        return picked, None, contended

    def _take(self, q: _RunQueue, job: Job) -> Job:
        if job is q.resume:
            q.resume = None
            return job
        if job.seq_id is None:
            q.unnumbered.popleft()
        else:
            del q.waiting[job.seq_id]
            q.next_seq = job.seq_id + 1
            q.results[job.seq_id] = job.future
            while len(q.results) > self.result_cache:
                oldest, fut = next(iter(q.results.items()))
                if not fut.done():
                    break
                del q.results[oldest]
        return job

    def _next_deadline(self) -> float | None:
        deadlines = [
            q.progress_at + self.gap_timeout_s for q in self._runs.values() if q.pending() and not q.running
        ]
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.monotonic()) + 0.001

    def _expire_gaps(self) -> None:
        now = time.monotonic()
        for q in self._runs.values():
            if q.running or not q.pending() or q.head() is not None:
                continue
            if now - q.progress_at < self.gap_timeout_s:
                continue
            waiting = sorted(q.waiting)
            err = UserError(
                f"seq_id {q.next_seq} of run {q.run_id!r} never arrived within {self.gap_timeout_s:g} s; "
                f"the requests waiting for it ({', '.join(map(str, waiting)) or 'unnumbered'}) were dropped",
                field="seq_id",
            )
            for job in list(q.waiting.values()) + list(q.unnumbered):
                job.future.set_exception(err)
                job.future.exception()
                if job.seq_id is not None:
                    q.results[job.seq_id] = job.future
            if waiting:
                q.next_seq = waiting[-1] + 1
            q.waiting.clear()
            q.unnumbered.clear()
            q.progress_at = now

    async def close(self) -> None:
        self._closed = True
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._loop_task
        for rid in list(self._runs):
            self.remove_run(rid, RuntimeError("model service shut down"))
        for job in self._control:
            if not job.future.done():
                job.future.set_exception(RuntimeError("model service shut down"))
        await asyncio.to_thread(self._executor.shutdown, True)  # let a running job finish, off the loop


def _call(job: Job) -> tuple[bool | None, Any]:
    """Run a job, or its next slice: (True, result), (False, exception) or (None, None) after a slice."""
    try:
        if job.slices is None:
            out = job.fn()
            if not inspect.isgenerator(out):
                return True, out
            job.slices = out
        next(job.slices)
        return None, None
    except StopIteration as done:
        return True, done.value
    except Exception as e:  # noqa: BLE001 - delivered to the caller's future
        return False, e


def _call_batch(batcher, payloads) -> list[tuple[bool, Any]]:
    """A batcher returns one result per payload; an Exception in its list is that item's failure."""
    try:
        results = batcher(payloads)
    except Exception as e:  # noqa: BLE001
        return [(False, e)] * len(payloads)
    return [(not isinstance(r, BaseException), r) for r in results]
