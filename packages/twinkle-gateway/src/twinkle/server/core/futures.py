"""Durable futures: every long call is written to the store, answered with a ``request_id`` at once, and run
as an asyncio task whose outcome is written back; ``retrieve_future`` long-polls for it.

Why this shape:

- **Write before answering.** The request row exists before the client learns its id, so a restarted
  server can always answer for it. Rows left ``pending`` by a dead process are taken over at startup: a
  numbered training request is followed to its outcome at the Model service (which keys it by ``seq_id``,
  so it is never applied twice, and uses up one it never received); any other fails with a ``server``
  error ("server restarted while the request was running"): the SDK raises instead of polling forever.
- **Dedupe on (model_id, seq_id).** The SDK retries a submission with a *new* idempotency key, and resends a
  sample with the same ``seq_id`` after backpressure, so the sequence number is the identity. A repeat gets
  the first request's id (in memory while the first submission is still being written, then by the store's
  unique index, which also holds across restarts).
- **Long-poll on an event, not the database.** Each running request has an ``asyncio.Event``; a poll waits on
  it for up to ``long_poll_s`` (below the SDK's 45 s read timeout) and then says "try again". Finished
  records stay in a small LRU so an already-finished poll costs no database read.
- **Bounded per key.** A key may have ``max_pending_per_owner`` requests queued or running and
  ``max_polls_per_owner`` long-polls held at once; past either it gets 429 with ``Retry-After`` (the SDK
  backs off and retries), never an unbounded queue, and its polls never take the slots others need.
- **One form of a result.** ``work`` returns a protocol-neutral value (a ``twinkle.common.wire`` struct such
  as ``ForwardBackwardOutput``, or plain data); it is kept as that value in memory (``FutureRecord.value``)
  and stored once as msgpack. Every protocol renders from the value directly; a record read back from the
  store is decoded to the same type, by its ``kind`` (``RESULT_TYPES``).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import secrets
import time
from typing import Any, Awaitable, Callable

import msgspec

from twinkle.common.http import log_internal_error
from twinkle.common.wire import ForwardBackwardOutput, OptimStepOutput, SampleOutput, ServiceUnavailable, UserError

from .state import FutureRecord, Store

log = logging.getLogger("twinkle.server.futures")

RESTARTED = "server restarted while the request was running; submit it again"
SHUTDOWN = "server shut down while the request was running; submit it again"
CANCELLED = "cancelled by the client (cancel_future)"

Work = Callable[[], Awaitable[Any]]

#: The type a stored result of each kind decodes to (other kinds: plain data).
RESULT_TYPES: dict[str, type] = {
    "forward_backward": ForwardBackwardOutput,
    "forward": ForwardBackwardOutput,
    "optim_step": OptimStepOutput,
    "sample": SampleOutput,
}
_encode = msgspec.msgpack.Encoder().encode


def result_value(record: FutureRecord) -> Any:
    """The result of a finished record as a value (decoded once from the store's bytes when needed)."""
    if record.value is None and record.result is not None:
        type_ = RESULT_TYPES.get(record.kind, Any)
        try:
            record.value = msgspec.msgpack.decode(record.result, type=type_)
        except (msgspec.DecodeError, msgspec.ValidationError):
            record.value = msgspec.json.decode(record.result, type=type_)  # a result stored by 0.1
    return record.value


class Busy(UserError):
    """Too much of the caller's work is in flight: HTTP 429 with ``Retry-After``; waiting clears it."""

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message, status=429)
        self.retry_after_s = retry_after_s

    def __reduce__(self):
        return (_rebuild_busy, (self.message, self.retry_after_s))


def _rebuild_busy(message: str, retry_after_s: float) -> "Busy":
    return Busy(message, retry_after_s=retry_after_s)


def new_request_id() -> str:
    return "req-" + secrets.token_hex(12)


class Futures:
    def __init__(self, store: Store, *, long_poll_s: float = 25.0, cache_size: int = 4096,
                 cache_bytes: int = 256 * 1024 * 1024, foreign_poll_s: float = 0.25,
                 max_pending_per_owner: int | None = None, max_polls_per_owner: int | None = None,
                 observers: list[Callable[[FutureRecord, Any], None]] | None = None) -> None:
        self.store = store
        self.observers = list(observers or ())  # told of every request's outcome (metrics)
        self.long_poll_s = long_poll_s
        self.max_pending_per_owner = max_pending_per_owner
        self.max_polls_per_owner = max_polls_per_owner
        self._pending: collections.Counter[str] = collections.Counter()
        self._polls: collections.Counter[str] = collections.Counter()
        self._foreign_poll_s = foreign_poll_s
        self._running: dict[str, tuple[FutureRecord, asyncio.Event, asyncio.Task]] = {}
        self._submitting: dict[tuple[str, int], asyncio.Future] = {}
        self._done: collections.OrderedDict[str, FutureRecord] = collections.OrderedDict()
        self._cache_size = cache_size
        self._cache_bytes = cache_bytes
        self._cached_bytes = 0
        self._closing = False
        self._cancelled: set[str] = set()
        self._watchers: dict[str, set[asyncio.Event]] = {}

    async def recover(self, resume: Callable[[FutureRecord], Work | None] | None = None) -> int:
        """Take over what a previous process left pending. Call once, before serving. ``resume`` gives the work
        that finds a request's outcome where it ran (or None): such a request is followed to its end like a
        new one; every other is failed (``server``, "submit it again"). Returns how many were failed."""
        if resume is None:
            failed = await self.store.fail_pending(RESTARTED)
            if failed:
                log.warning("failed %d request(s) left pending by a previous server process", failed)
            return failed
        failed = 0
        for record in await self.store.pending_futures():
            work = resume(record)
            if work is None:
                await self.store.finish_future(record.request_id, status="failed", error=RESTARTED,
                                               category="server")
                failed += 1
                continue
            self._pending[record.owner] += 1
            event = asyncio.Event()
            task = asyncio.create_task(self._execute(record, event, work), name=f"future {record.request_id}")
            self._running[record.request_id] = (record, event, task)
        if failed:
            log.warning("failed %d request(s) left pending by a previous server process", failed)
        if self._running:
            log.warning("following %d request(s) a previous server process left running", len(self._running))
        return failed

    # ------------------------------------------------------------------------------- submit

    async def submit(self, *, owner: str, kind: str, work: Work, model_id: str | None = None,
                     seq_id: int | None = None, meta: dict[str, Any] | None = None,
                     touch_run: str | None = None) -> FutureRecord:
        """Record the request, start ``work`` and return its record (or the first record of a duplicate)."""
        if self._closing:
            raise UserError("the server is shutting down", status=503)
        key = (model_id, seq_id) if (model_id is not None and seq_id is not None) else None
        if key is not None and key in self._submitting:
            return await asyncio.shield(self._submitting[key])
        limit = self.max_pending_per_owner
        if limit is not None and self._pending[owner] >= limit:
            raise Busy(f"this API key has {self._pending[owner]} requests queued or running (the limit is {limit}, "
                       "server setting max_pending_per_key); retry when some have finished")
        record = FutureRecord(request_id=new_request_id(), owner=owner, kind=kind, created=time.time(),
                              model_id=model_id, seq_id=seq_id, meta=meta)
        slot: asyncio.Future | None = None
        if key is not None:
            slot = asyncio.get_running_loop().create_future()
            self._submitting[key] = slot
        try:
            stored = await self.store.insert_future(record, touch_run=touch_run)
            if stored.request_id == record.request_id:
                self._pending[owner] += 1
                event = asyncio.Event()
                task = asyncio.create_task(self._execute(record, event, work), name=f"future {record.request_id}")
                self._running[record.request_id] = (record, event, task)
            if slot is not None:
                slot.set_result(stored)
            return stored
        except BaseException as e:
            if slot is not None and not slot.done():
                slot.set_exception(e)
                slot.exception()  # retrieved: a concurrent duplicate re-raises it, nobody else must
            raise
        finally:
            if key is not None:
                self._submitting.pop(key, None)

    async def find(self, model_id: str, seq_id: int) -> FutureRecord | None:
        """The request already submitted as ``seq_id`` of ``model_id``, if any."""
        slot = self._submitting.get((model_id, seq_id))
        if slot is not None:
            return await asyncio.shield(slot)
        return await self.store.find_future(model_id, seq_id)

    async def finished_seqs(self, model_id: str, min_seq: int) -> list[tuple[int, str]]:
        """``(seq_id, kind)`` of the run's requests from ``min_seq`` on that have an outcome (here or in an
        earlier process): they will never be sent to the model service again."""
        running = {r.seq_id for r, _e, _t in self._running.values() if r.model_id == model_id}
        running.update(seq for (mid, seq) in self._submitting if mid == model_id)
        rows = await self.store.numbered_futures(model_id, min_seq=min_seq)
        return [(seq, kind) for seq, kind in rows if seq not in running]

    async def _execute(self, record: FutureRecord, event: asyncio.Event, work: Work) -> None:
        status, value, result, error, category = "done", None, None, None, None
        try:
            value = await work()
            result = _encode(value)
        except UserError as e:
            status, error, category = "failed", str(e), "user"
        except asyncio.CancelledError:
            if record.request_id in self._cancelled:
                status, error, category = "failed", CANCELLED, "user"
            else:
                status, error, category = "failed", SHUTDOWN, "server"
        except ServiceUnavailable as e:
            status, error, category = "failed", str(e), "server"
        except Exception as e:  # noqa: BLE001 - every failure must end the future
            cid = log_internal_error(log, f"request {record.request_id} ({record.kind}) failed", e,
                                     request_id=record.request_id)
            status, error, category = "failed", f"internal server error (correlation id {cid})", "server"
        now = round(time.time(), 6)  # whole microseconds: the completion cursor of retrieve_futures
        done = FutureRecord(
            request_id=record.request_id, owner=record.owner, kind=record.kind, created=record.created,
            model_id=record.model_id, seq_id=record.seq_id, status=status, result=result, error=error,
            category=category, meta=record.meta, finished=now, value=value,
        )
        # Waiters get the outcome from memory at once; the store write follows (it is queued on the store's
        # thread before any 'fetched' mark of the woken poll, so the order of writes is kept).
        self._remember(done)
        for observe in self.observers:
            try:
                observe(done, value)
            except Exception:  # noqa: BLE001 - an observer never changes an outcome
                log.exception("observer failed on %s", record.request_id)
        self._running.pop(record.request_id, None)
        self._cancelled.discard(record.request_id)
        self._pending[record.owner] -= 1
        if not self._pending[record.owner]:
            del self._pending[record.owner]
        event.set()
        try:
            await self.store.finish_future(record.request_id, status=status, result=result, error=error,
                                           category=category, now=now)
        except Exception:  # noqa: BLE001 - the client has its answer; only durability is lost
            log.exception("could not record the outcome of %s", record.request_id)
        if record.model_id is not None:
            for watcher in self._watchers.pop(record.model_id, ()):
                watcher.set()

    def _remember(self, record: FutureRecord) -> None:
        """Keep a finished record in the LRU, bounded by count and by result bytes (the store has them all)."""
        previous = self._done.pop(record.request_id, None)
        if previous is not None:
            self._cached_bytes -= len(previous.result or b"")
        self._done[record.request_id] = record
        self._cached_bytes += len(record.result or b"")
        while len(self._done) > 1 and (len(self._done) > self._cache_size or self._cached_bytes > self._cache_bytes):
            _, old = self._done.popitem(last=False)
            self._cached_bytes -= len(old.result or b"")

    async def cancel(self, request_id: str, owner: str, kinds: frozenset[str]) -> FutureRecord | None:
        """Cancel a request of ``owner`` that is still running, if its kind is one of ``kinds``: its work is
        cancelled where it waits (a sampler drops it at its next step) and it fails as cancelled. A finished
        request is left as it is. ``None``: no such request of ``owner``."""
        running = self._running.get(request_id)
        if running is None:
            record = self._done.get(request_id) or await self.store.get_future(request_id)
            return record if record is not None and record.owner == owner else None
        record, _event, task = running
        if record.owner != owner:
            return None
        if record.kind not in kinds:
            raise UserError(f"a {record.kind} request cannot be cancelled (only {', '.join(sorted(kinds))})",
                            field="request_id", status=409)
        self._cancelled.add(request_id)
        task.cancel()
        return record

    # ------------------------------------------------------------------------------- retrieve

    async def completions(self, owner: str, model_id: str, seq_lo: int, seq_hi: int, after_us: int,
                          timeout: float | None, limit: int = 1000) -> list[tuple[str, str, int | None, int]]:
        """The completion queue of requests ``seq_lo..seq_hi`` of ``model_id`` (``Store.finished_in_block``) after
        cursor ``after_us``; when empty, wait up to ``timeout`` (None: the long-poll time, 0: do not wait) for
        one to finish."""
        timeout = self.long_poll_s if timeout is None else min(max(timeout, 0.0), self.long_poll_s)
        deadline = time.monotonic() + timeout
        while True:
            watcher = asyncio.Event()
            self._watchers.setdefault(model_id, set()).add(watcher)  # before the read: no finish is missed
            try:
                rows = await self.store.finished_in_block(model_id, seq_lo, seq_hi, after_us, limit)
                left = deadline - time.monotonic()
                if rows or left <= 0:
                    return rows
                self._hold_poll(owner)
                try:
                    await asyncio.wait_for(watcher.wait(), left)
                except asyncio.TimeoutError:
                    pass
                finally:
                    self._release_poll(owner)
            finally:
                watchers = self._watchers.get(model_id)
                if watchers is not None:
                    watchers.discard(watcher)
                    if not watchers:
                        del self._watchers[model_id]

    async def wait(self, request_id: str, owner: str, timeout: float | None = None) -> FutureRecord | None:
        """The finished record, or a pending one if ``timeout`` passed first. ``None``: no such request of
        ``owner`` (another principal's id is indistinguishable from an unknown one)."""
        timeout = self.long_poll_s if timeout is None else timeout
        running = self._running.get(request_id)
        if running is not None:
            record, event, _task = running
            if record.owner != owner:
                return None
            if timeout > 0:
                self._hold_poll(owner)
                try:
                    await asyncio.wait_for(event.wait(), timeout)
                except asyncio.TimeoutError:
                    return record
                finally:
                    self._release_poll(owner)
            elif not event.is_set():
                return record
            return self._fetched(self._done.get(request_id) or await self.store.get_future(request_id))
        record = self._done.get(request_id)
        if record is None:
            record = await self.store.get_future(request_id)
            if record is None or record.owner != owner:
                return None
            if record.terminal:
                self._remember(record)
            else:
                record = await self._poll_foreign(request_id, timeout) or record
        if record.owner != owner:
            return None
        return self._fetched(record)

    def _hold_poll(self, owner: str) -> None:
        limit = self.max_polls_per_owner
        if limit is not None and self._polls[owner] >= limit:
            raise Busy(f"this API key already holds {limit} waiting polls (server setting max_polls_per_key); "
                       "poll fewer requests at once")
        self._polls[owner] += 1

    def _release_poll(self, owner: str) -> None:
        self._polls[owner] -= 1
        if not self._polls[owner]:
            del self._polls[owner]

    async def _poll_foreign(self, request_id: str, timeout: float) -> FutureRecord | None:
        """A request pending in the store but not running here (another gateway replica runs it)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            await asyncio.sleep(self._foreign_poll_s)
            if request_id in self._done:
                return self._done[request_id]
            record = await self.store.get_future(request_id)
            if record is not None and record.terminal:
                self._remember(record)
                return record
        return None

    def _fetched(self, record: FutureRecord | None) -> FutureRecord | None:
        if record is not None and record.terminal and record.fetched is None:
            record.fetched = time.time()
            self.store.mark_fetched_background(record.request_id, record.fetched)
        return record

    # ------------------------------------------------------------------------------- lifecycle

    def polls_by_owner(self) -> dict[str, int]:
        return dict(self._polls)

    def pending_by_owner(self) -> dict[str, int]:
        """Requests queued or running here, per owner."""
        return dict(self._pending)

    @property
    def running(self) -> int:
        return len(self._running)

    def is_running(self, request_id: str) -> bool:
        return request_id in self._running

    async def close(self) -> None:
        """Cancel running work; each cancelled request is recorded as failed (``server``)."""
        self._closing = True
        tasks = [task for _r, _e, task in list(self._running.values())]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
