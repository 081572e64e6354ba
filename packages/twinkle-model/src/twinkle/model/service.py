"""``ModelService``: the async API of the Model service, shared by the Ray Serve deployment and the HTTP routes.

It owns who may touch which run, the per-owner adapter quota, idle offloading, and the ordering of each run's
requests; the backend owns the tensors. Every model operation goes through the :class:`Scheduler` (ordered by
``seq_id``, de-duplicated, executed on one dedicated thread), so this object never blocks its event loop.

Ownership: ``owner`` is an opaque principal id given by the gateway. A run owned by somebody else answers
exactly like a run that does not exist (``NotFoundError``), so run ids cannot be probed.

Quota (``adapter_limit_per_owner``, the YAML's ``per_token_adapter_limit``), over the owner's runs here and
those saved by every replica: creating one more run than the limit is a ``UserError`` with status **400**,
not 429. The Tinker SDK retries 429 automatically, but this limit does not clear by waiting: the user must
delete a run. Offloaded runs still count.

Idle offload (``adapter_timeout_s``, the YAML's ``adapter_timeout``): a sweeper task offloads runs idle that
long (see ``TransformersBackend`` for where the state goes); the next request restores them transparently.
Idleness never deletes anything: an idle user never loses work. ``delete_run`` is explicit.

Durable runs (``state_dir``, see ``durability.py``): a run's state is saved after its creation, each
``optim_step`` and each ``load_state``, before that request is answered (the write runs off the model thread,
so the next request computes meanwhile). A replica that restarts finds every saved run on first use, at its
last acknowledged step, for the same owner under the same id. With several replicas (``holder`` names this
one), each run is served by the replica holding its lease (``RunLeases``): one that finds its run taken by
another replica drops its copy and answers ``RunMoved``, which the caller sends again to the run's new replica. Requests numbered after that step ran on the
lost replica: the front end says which of them finished (``settle``) and they are used up; when one of them
was a ``forward_backward``, the next ``optim_step`` fails (409) instead of stepping on partial gradients. A
repeat of the saved step's ``seq_id`` gets its recorded answer; older ones are refused, never run twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from dataclasses import dataclass, field

from twinkle.common.limits import check_seq_id
from twinkle.common.models import tokenizer_id
from twinkle.common.wire import (
    AdamParams,
    CheckpointInfo,
    ForwardBackwardInput,
    ForwardBackwardOutput,
    LoraConfig,
    NotFoundError,
    OptimStepOutput,
    ResyncNeeded,
    RunInfo,
    RunMoved,
    ServiceHealth,
    ServiceInfo,
    UserError,
)

from .backend import FusedItem, TrainingBackend, validate_lora
from .batching import one_pass
from .durability import RunLeases, RunStateStore, SavedRun
from .scheduler import Scheduler

log = logging.getLogger(__name__)


def _never_run() -> None:
    raise AssertionError("a repeated seq_id is answered from its first request")


def _numbered(seq_id: int) -> int:
    """A front end's ``seq_id`` for a request it speaks for (never None here)."""
    if check_seq_id(seq_id) is None:
        raise UserError("seq_id is required", field="seq_id")
    return seq_id


@dataclass
class _RunRecord:
    run_id: str
    owner: str
    lora: LoraConfig
    last_used: float = field(default_factory=time.monotonic)
    ready: bool = False  # the adapter exists in the backend
    resync: bool = False  # restored from disk and not yet told which later requests ran before
    lost_gradients: list[int] = field(default_factory=list)  # forward_backward seq_ids a restart lost


class ModelService:
    def __init__(
        self,
        model_id: str,
        *,
        adapter_limit_per_owner: int = 30,
        adapter_timeout_s: float | None = 1800.0,
        backend: TrainingBackend | None = None,
        device: str | None = None,
        gap_timeout_s: float = 30.0,
        fuse_batches: bool = False,
        max_fused: int = 8,
        result_cache: int = 32,
        sweep_interval_s: float | None = None,
        max_tokens_per_datum: int | None = None,
        token_budget: int | None = None,
        state_dir: str | None = None,
        holder: str | None = None,
    ) -> None:
        """``fuse_batches``: run different users' concurrent forward_backward requests in one pass (faster with
        several users; equal to separate passes only up to float rounding). ``adapter_timeout_s`` None or <= 0
        disables offloading. ``sweep_interval_s`` (idle offload, and dropping runs another replica took) defaults
        to a tenth of the timeout, between 1 s and 60 s.
        ``max_tokens_per_datum`` (the YAML's ``max_length``) and ``token_budget`` go to the backend built here.
        ``state_dir``: where runs are kept durable (None: runs live in memory only). ``holder``: this replica's
        unique name when replicas share ``state_dir`` (runs are then leased, see the module docstring)."""
        if backend is None:
            from .transformers_backend import TransformersBackend

            backend = TransformersBackend(model_id, device=device, max_tokens_per_datum=max_tokens_per_datum,
                                          token_budget=token_budget)
        self.model_id = model_id
        self.backend = backend
        self.adapter_limit_per_owner = adapter_limit_per_owner
        self.adapter_timeout_s = adapter_timeout_s if adapter_timeout_s and adapter_timeout_s > 0 else None
        self.fuse_batches = fuse_batches
        if sweep_interval_s is None and self.adapter_timeout_s is not None:
            sweep_interval_s = min(60.0, max(1.0, self.adapter_timeout_s / 10))
        if sweep_interval_s is None and state_dir and holder:
            sweep_interval_s = 60.0
        self.sweep_interval_s = sweep_interval_s
        self.scheduler = Scheduler(
            gap_timeout_s=gap_timeout_s,
            result_cache=result_cache,
            batcher=self._run_fused if fuse_batches else None,
            max_batch=max_fused,
        )
        described = self.backend.describe()
        self._pass_tokens = described.token_budget * described.dp_size  # what one pass of the service takes
        self._runs: dict[str, _RunRecord] = {}
        self.leases = RunLeases(state_dir, holder) if state_dir and holder else None
        self.durable = RunStateStore(state_dir, self.leases) if state_dir else None
        self._restoring: dict[str, asyncio.Future] = {}
        self._saving: dict[str, asyncio.Future] = {}
        self._sweeper: asyncio.Task | None = None
        self._started = time.time()
        self._adapters = {"hits": 0, "loads": 0, "offloads": 0}  # since start, for metrics

    # --- runs -----------------------------------------------------------------------------------------

    async def create_run(self, run_id: str, owner: str, lora: LoraConfig, *, first_seq_id: int = 1) -> RunInfo:
        """Create a training run with a fresh adapter. Its requests are expected from ``first_seq_id`` on."""
        self._ensure_started()
        validate_lora(lora)
        if not isinstance(run_id, str) or not run_id:
            raise UserError("run_id must be a non-empty string", field="run_id")
        if self.durable is not None and self.durable.path(run_id) is None:
            raise UserError("run_id may hold letters, digits and _ . : - only (at most 200)", field="run_id")
        exists = UserError(f"training run {run_id!r} already exists", field="run_id", status=409)
        if self.durable is not None and await asyncio.to_thread(self.durable.read, run_id):
            raise exists
        if run_id in self._runs:
            raise exists
        if self.leases is not None:  # before the run exists here, so no lease check can find it unleased
            await asyncio.to_thread(self.leases.claim, run_id)
            if run_id in self._runs:
                raise exists
        # Runs saved by any replica count too (with several replicas, each holds some of them); the runs held
        # here are counted after the last await, so that the reservation below cannot race.
        saved = set() if self.durable is None else {
            s.run_id for s in await asyncio.to_thread(self.durable.list, owner)}
        held = len(saved | {r.run_id for r in self._runs.values() if r.owner == owner})
        if held >= self.adapter_limit_per_owner:
            await self._release_lease(run_id)
            raise UserError(
                f"adapter limit reached: this API key already holds {held} training runs on this model "
                f"(per_token_adapter_limit = {self.adapter_limit_per_owner}); delete a run before creating another"
            )
        rec = _RunRecord(run_id=run_id, owner=owner, lora=lora)
        self._runs[run_id] = rec  # reserved synchronously: the quota check above cannot race
        self.scheduler.add_run(run_id, next_seq=first_seq_id, tenant=owner)
        try:
            rec.lora = await self.scheduler.run_exclusive(lambda: self.backend.create_adapter(run_id, lora))
            rec.ready = True
            if self.durable is not None:
                snap = await self.scheduler.run_exclusive(lambda: self.backend.snapshot(run_id))
                await self.durable.save(run_id, snap, self._saved(rec, snap.step, first_seq_id))
        except BaseException:
            self._runs.pop(run_id, None)
            self.scheduler.remove_run(run_id)
            if rec.ready:
                with contextlib.suppress(Exception):
                    await self.scheduler.run_exclusive(lambda: self.backend.delete_adapter(run_id))
            await self._release_lease(run_id)
            raise
        return self._info(rec)

    async def _release_lease(self, run_id: str) -> None:
        if self.leases is not None:
            with contextlib.suppress(OSError):
                await asyncio.to_thread(self.leases.release, run_id)

    async def delete_run(self, run_id: str, owner: str) -> None:
        self._ensure_started()
        rec = await self._resolve(run_id, owner)
        del self._runs[run_id]
        self.scheduler.remove_run(run_id)
        if rec.ready:
            await self.scheduler.run_exclusive(lambda: self.backend.delete_adapter(run_id))
        if self.durable is not None:
            await self.durable.remove(run_id)

    async def run_info(self, run_id: str, owner: str) -> RunInfo:
        return self._info(await self._resolve(run_id, owner))

    async def next_seq_id(self, run_id: str, owner: str) -> int:
        """The ``seq_id`` a client attaching to this run should number its next request with."""
        await self._resolve(run_id, owner)
        return self.scheduler.next_seq(run_id)

    async def list_runs(self, owner: str) -> list[RunInfo]:
        """The owner's runs: live ones, and saved ones no replica has restored since a restart."""
        runs = {r.run_id: self._info(r) for r in self._runs.values() if r.owner == owner}
        if self.durable is not None:
            for saved in await asyncio.to_thread(self.durable.list, owner):
                runs.setdefault(saved.run_id, RunInfo(run_id=saved.run_id, lora=saved.lora, step=saved.step,
                                                      resident=False))
        return [runs[k] for k in sorted(runs)]

    async def outcome(self, run_id: str, owner: str, seq_id: int):
        """The answer to request ``seq_id`` for a front end that lost track of it (its process restarted):
        waits while it is queued or running, and returns (or raises) what it gave. One this service never
        received is used up, so that a late copy is refused, and reported as not applied."""
        rec = await self._resolve(run_id, owner)
        _numbered(seq_id)
        self._check_in_sync(rec, seq_id)
        if self.scheduler.knows(run_id, seq_id) or seq_id < self.scheduler.expected(run_id):
            return await self.scheduler.submit(run_id, seq_id, _never_run)  # a repeat: the first answer
        not_applied = UserError("the server restarted before this request reached the model service; it was "
                                "not applied: submit it again", field="seq_id")
        self.scheduler.consume(run_id, [seq_id], not_applied)
        raise not_applied

    async def settle(self, run_id: str, owner: str, finished: list[tuple[int, str]]) -> list[int]:
        """The front end's answer to ``ResyncNeeded``: ``finished`` lists ``(seq_id, kind)`` of this run's
        requests it saw finish. Those this replica never saw ran on a lost one: they are used up, and a lost
        ``forward_backward`` makes the next ``optim_step`` fail. Returns the seq_ids used up."""
        rec = await self._resolve(run_id, owner)
        seen = {int(s): str(k) for s, k in finished}
        lost = self.scheduler.consume(run_id, list(seen), UserError(
            "this request ran on a model replica that was lost; its effect was lost with it", field="seq_id"))
        rec.lost_gradients.extend(s for s in lost if seen[s] == "forward_backward")
        rec.resync = False
        if lost:
            log.warning("run %s: requests %s ran on a lost replica", run_id, lost)
        return lost

    # --- training -------------------------------------------------------------------------------------

    async def forward_backward(
        self,
        run_id: str,
        owner: str,
        seq_id: int | None,
        inp: ForwardBackwardInput,
        forward_only: bool = False,
    ) -> ForwardBackwardOutput:
        await self._resolve(run_id, owner)
        fusable = self.fuse_batches and not forward_only and self.backend.can_fuse(run_id)
        return await self._submit(
            run_id,
            seq_id,
            lambda: self.backend.forward_backward_slices(run_id, inp, forward_only),
            batch_key="fb" if fusable else None,
            payload=FusedItem(run_id, inp),
            bulk=self._needs_several_passes(inp),
        )

    def _needs_several_passes(self, inp: ForwardBackwardInput) -> bool:
        """Whether the backend will split this request into micro-batches: bulk work for the scheduler."""
        if not self._pass_tokens:
            return False
        return not one_pass([len(d.model_input) for d in inp.data], self._pass_tokens)

    async def optim_step(self, run_id: str, owner: str, seq_id: int | None, params: AdamParams) -> OptimStepOutput:
        rec = await self._resolve(run_id, owner)

        def step() -> OptimStepOutput:
            self._check_gradients(rec, seq_id)
            return self.backend.optim_step(run_id, params)

        out = await self._submit(run_id, seq_id, self._saving_after(rec, seq_id, step))
        await self._saved_to_disk(run_id)
        return out

    # --- checkpoints ----------------------------------------------------------------------------------

    async def save_state(
        self, run_id: str, owner: str, seq_id: int | None, path: str, include_optimizer: bool = True
    ) -> CheckpointInfo:
        await self._resolve(run_id, owner)
        return await self._submit(run_id, seq_id, lambda: self.backend.save_state(run_id, path, include_optimizer))

    async def save_sampler_weights(self, run_id: str, owner: str, seq_id: int | None, path: str) -> CheckpointInfo:
        await self._resolve(run_id, owner)
        return await self._submit(run_id, seq_id, lambda: self.backend.save_sampler_weights(run_id, path))

    async def load_state(
        self,
        run_id: str,
        owner: str,
        seq_id: int | None,
        path: str,
        include_optimizer: bool,
        create: bool = False,
    ) -> RunInfo:
        """Load a state checkpoint into a run. ``create=True`` first creates the run with the checkpoint's LoRA
        config; the load is then the run's request ``seq_id`` (the Tinker SDK's implicit seq 0), or, when
        ``seq_id`` is None, an unnumbered request before the run's seq 1. A failed create-and-load leaves no run."""
        self._ensure_started()
        if create:
            lora = await asyncio.to_thread(self.backend.read_checkpoint_lora, path)
            await self.create_run(run_id, owner, lora, first_seq_id=seq_id if seq_id is not None else 1)
        rec = await self._resolve(run_id, owner)
        load = self._saving_after(rec, seq_id, lambda: self.backend.load_state(run_id, path, include_optimizer))
        try:
            await self._submit(run_id, seq_id, load)
            await self._saved_to_disk(run_id)
        except BaseException:
            if create:
                with contextlib.suppress(Exception):
                    await self.delete_run(run_id, owner)
            raise
        return self._info(await self._resolve(run_id, owner))

    # --- service --------------------------------------------------------------------------------------

    async def skip(self, run_id: str, owner: str, seq_id: int, reason: str) -> None:
        """Use up ``seq_id`` for a request a front end refused before it reached the service (undecodable,
        oversize...). Later requests of the run must not wait for it; a repeat of it gets ``reason``."""
        await self._resolve(run_id, owner)
        _numbered(seq_id)
        self.scheduler.consume(run_id, [seq_id], UserError(reason, field="seq_id"))

    async def info(self) -> ServiceInfo:
        d = self.backend.describe()
        return ServiceInfo(
            kind="model",
            model_name=d.model_name,
            model_id=d.model_id,
            backend=d.backend,
            max_context_length=d.max_context_length,
            vocab_size=d.vocab_size,
            tokenizer_id=tokenizer_id(self.model_id),
            dp_size=d.dp_size,
            runs=len(self._runs),
        )

    async def health(self) -> ServiceHealth:
        """Answers from the event loop without touching the model thread: cheap even during a long step."""
        resident = sum(1 for r in self._runs.values() if r.ready and self._safe_resident(r.run_id))
        return ServiceHealth(
            kind="model",
            uptime_s=round(time.time() - self._started, 1),
            workers=self.backend.describe().dp_size,
            queued=self.scheduler.pending(),
            busy_for_s=round(self.scheduler.busy_for_s, 3),
            runs=len(self._runs),
            resident_runs=resident,
            adapter_hits=self._adapters["hits"],
            adapter_loads=self._adapters["loads"],
            adapter_offloads=self._adapters["offloads"],
            queue_wait=self.scheduler.waited(),
        )

    async def offload_idle(self, now: float | None = None) -> list[str]:
        """Offload every run idle for ``adapter_timeout_s`` (the sweeper calls this); returns their ids."""
        if self.adapter_timeout_s is None:
            return []
        now = time.monotonic() if now is None else now
        done = []
        for rec in list(self._runs.values()):
            if not rec.ready or now - rec.last_used < self.adapter_timeout_s:
                continue
            if self.scheduler.pending(rec.run_id) or not self._safe_resident(rec.run_id):
                continue
            run_id = rec.run_id
            try:
                await self.scheduler.run_exclusive(functools.partial(self.backend.offload, run_id))
                done.append(run_id)
                self._adapters["offloads"] += 1
            except NotFoundError:
                pass  # deleted meanwhile
        return done

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._sweeper
            self._sweeper = None
        await self.scheduler.close()
        if self.durable is not None:
            await self.durable.close()
        await asyncio.to_thread(self.backend.close)

    # --- internals ------------------------------------------------------------------------------------

    def _ensure_started(self) -> None:
        if self.sweep_interval_s is None:
            return
        loop = asyncio.get_running_loop()
        if self._sweeper is None or self._sweeper.done() or self._sweeper.get_loop() is not loop:
            self._sweeper = loop.create_task(self._sweep(), name="twinkle-offload-sweeper")

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval_s)
            try:
                await self.held_runs()
                await self.offload_idle()
            except Exception:
                log.exception("idle offload failed")

    async def _resolve(self, run_id: str, owner: str) -> _RunRecord:
        """The owner's run: live, or restored from its saved state on first use after a restart."""
        rec = self._runs.get(run_id)
        if rec is not None and self.leases is not None and run_id not in self._restoring \
                and not await asyncio.to_thread(self.leases.holds, run_id):
            await self._step_aside(run_id)
            raise self._moved(run_id)
        if rec is None and self.durable is not None:
            rec = await self._restore(run_id)
        if rec is None or rec.owner != owner:
            raise NotFoundError(f"training run {run_id!r} not found", field="run_id")
        return rec

    async def _restore(self, run_id: str) -> _RunRecord | None:
        """Bring a saved run back (once, however many requests ask at the same moment)."""
        self._ensure_started()
        if run_id in self._restoring:
            return await asyncio.shield(self._restoring[run_id])
        found = asyncio.get_running_loop().create_future()
        self._restoring[run_id] = found
        try:
            rec = await self._restore_saved(run_id)
            found.set_result(rec)
            return rec
        except BaseException as e:
            found.set_exception(e)
            found.exception()
            raise
        finally:
            del self._restoring[run_id]

    @staticmethod
    def _moved(run_id: str) -> RunMoved:
        return RunMoved(f"training run {run_id!r} is now served by another replica")

    async def held_runs(self) -> list[str]:
        """The runs this replica serves now; those another replica took meanwhile are dropped first (the
        sweeper calls this, so a copy nobody routes to any more does not hold memory)."""
        if self.leases is not None:
            for run_id, rec in list(self._runs.items()):
                if rec.ready and run_id not in self._restoring \
                        and not await asyncio.to_thread(self.leases.holds, run_id):
                    await self._step_aside(run_id)
        return sorted(self._runs)

    async def _step_aside(self, run_id: str) -> None:
        """Drop this replica's copy of a run another replica took: its waiting requests never ran here and
        fail with ``RunMoved`` (sent again by the caller); gradients accumulated here are lost, which the new
        replica reports as for a restart."""
        if self._runs.pop(run_id, None) is None:
            return
        self.scheduler.remove_run(run_id, self._moved(run_id))
        with contextlib.suppress(NotFoundError):
            await self.scheduler.run_exclusive(lambda: self.backend.delete_adapter(run_id))
        log.warning("run %s is now served by another replica; this replica dropped its copy", run_id)

    async def _restore_saved(self, run_id: str) -> _RunRecord | None:
        loaded = await asyncio.to_thread(self.durable.read, run_id)
        if loaded is not None and run_id not in self._runs and self.leases is not None:
            await asyncio.to_thread(self.leases.claim, run_id)
            loaded = await asyncio.to_thread(self.durable.read, run_id)  # what the last holder saved before
        if loaded is None or run_id in self._runs:
            return self._runs.get(run_id)
        saved, path = loaded
        rec = _RunRecord(run_id=run_id, owner=saved.owner, lora=saved.lora, resync=True)
        results = {saved.applied_seq: saved.result} if saved.applied_seq is not None and saved.result else None
        self._runs[run_id] = rec
        self.scheduler.add_run(run_id, next_seq=saved.next_seq, results=results, tenant=saved.owner)

        def load() -> None:
            self.backend.create_adapter(run_id, saved.lora)
            try:
                self.backend.load_state(run_id, path, include_optimizer=True)
            except BaseException:
                self.backend.delete_adapter(run_id)
                raise

        try:
            await self.scheduler.run_exclusive(load)
        except BaseException:
            self._runs.pop(run_id, None)
            self.scheduler.remove_run(run_id)
            raise
        rec.ready = True
        log.warning("run %s restored from its saved state at step %d (next seq_id %d)", run_id, saved.step,
                    saved.next_seq)
        return rec

    def _saving_after(self, rec: _RunRecord, seq_id: int | None, fn):
        """``fn`` (run on the model thread), then a snapshot of the run handed to the durable writer; the
        request is answered once the state is on disk."""
        if self.durable is None:
            return fn
        loop = asyncio.get_running_loop()

        def run_and_snapshot():
            out = fn()
            snap = self.backend.snapshot(rec.run_id)
            next_seq = seq_id + 1 if seq_id is not None else self.scheduler.expected(rec.run_id)
            saved = self._saved(rec, snap.step, next_seq, seq_id, out if isinstance(out, OptimStepOutput) else None)
            # Queued before this job's completion, so the save is registered before the caller resumes.
            loop.call_soon_threadsafe(self._start_save, rec.run_id, snap, saved)
            return out

        return run_and_snapshot

    def _start_save(self, run_id: str, snap, saved: SavedRun) -> None:
        self._saving[run_id] = asyncio.ensure_future(self.durable.save(run_id, snap, saved))

    async def _saved_to_disk(self, run_id: str) -> None:
        """Wait for the run's latest save (a failed write is logged: the step stands, only durability is lost)."""
        save = self._saving.get(run_id)
        if save is None:
            return
        try:
            await asyncio.shield(save)
        except RunMoved:
            # Another replica took the run before this step was saved: for the run's owner it never happened
            # (sent again, it reaches the new replica, which reports the gradients it needed as lost).
            await self._step_aside(run_id)
            raise
        except Exception:  # noqa: BLE001
            log.exception("could not save the state of run %s; it is not durable until its next step", run_id)
        finally:
            if self._saving.get(run_id) is save and save.done():
                del self._saving[run_id]

    @staticmethod
    def _saved(rec: _RunRecord, step: int, next_seq: int, applied_seq: int | None = None,
               result: OptimStepOutput | None = None) -> SavedRun:
        return SavedRun(run_id=rec.run_id, owner=rec.owner, lora=rec.lora, step=step, next_seq=next_seq,
                        applied_seq=applied_seq, result=result)

    def _check_in_sync(self, rec: _RunRecord, seq_id: int) -> None:
        """A restored run asks the front end which requests ran elsewhere before taking one ahead of it."""
        if not rec.resync or self.scheduler.knows(rec.run_id, seq_id):
            return
        expected = self.scheduler.expected(rec.run_id)
        if seq_id > expected:
            raise ResyncNeeded(f"run {rec.run_id!r} was restored at seq_id {expected}; seq_id {seq_id} is ahead "
                               "of it", expected=expected)
        rec.resync = False  # the next request in order came: nothing ran in between

    @staticmethod
    def _check_gradients(rec: _RunRecord, seq_id: int | None) -> None:
        """Refuse a step whose gradients a replica restart lost (on the model thread, in request order)."""
        lost = [s for s in rec.lost_gradients if seq_id is None or s < seq_id]
        if not lost:
            return
        rec.lost_gradients = [s for s in rec.lost_gradients if s not in lost]
        raise UserError(
            f"the gradients of forward_backward seq_id {', '.join(map(str, lost))} were lost when the model "
            "replica restarted (the run was restored at its last optim_step); run forward_backward again, then "
            "optim_step", field="seq_id", status=409)

    async def _submit(self, run_id: str, seq_id: int | None, fn, *, batch_key=None, payload=None, bulk=False):
        self._ensure_started()
        rec = self._runs.get(run_id)
        if rec is not None:
            rec.last_used = time.monotonic()
            if seq_id is not None:
                self._check_in_sync(rec, seq_id)
            if rec.ready:
                self._adapters["hits" if self._safe_resident(run_id) else "loads"] += 1
        try:
            return await self.scheduler.submit(run_id, seq_id, fn, batch_key=batch_key, payload=payload, bulk=bulk)
        finally:
            if rec is not None:
                rec.last_used = time.monotonic()

    def _run_fused(self, items: list[FusedItem]):
        return self.backend.forward_backward_many(items)

    def _safe_resident(self, run_id: str) -> bool:
        try:
            return self.backend.is_resident(run_id)
        except NotFoundError:
            return False

    def _info(self, rec: _RunRecord) -> RunInfo:
        step, resident = 0, True
        if rec.ready:
            with contextlib.suppress(NotFoundError):
                step = self.backend.run_step(rec.run_id)
                resident = self.backend.is_resident(rec.run_id)
        return RunInfo(run_id=rec.run_id, lora=rec.lora, step=step, resident=resident)
