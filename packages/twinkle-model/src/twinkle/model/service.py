"""``ModelService``: the async API of the Model service, shared by the Ray Serve deployment and the HTTP routes.

It owns who may touch which run, the per-owner adapter quota, idle offloading, and the ordering of each run's
requests; the backend owns the tensors. Every model operation goes through the :class:`Scheduler` (ordered by
``seq_id``, de-duplicated, executed on one dedicated thread), so this object never blocks its event loop.

Ownership: ``owner`` is an opaque principal id given by the gateway. A run owned by somebody else answers
exactly like a run that does not exist (``NotFoundError``), so run ids cannot be probed.

Quota (``adapter_limit_per_owner``, the YAML's ``per_token_adapter_limit``): creating one more run than the
limit is a ``UserError`` with status **400**, not 429. The Tinker SDK retries 429 automatically, but this
limit does not clear by waiting: the user must delete a run. Offloaded runs still count.

Idle offload (``adapter_timeout_s``, the YAML's ``adapter_timeout``): a sweeper task offloads runs idle that
long (see ``TransformersBackend`` for where the state goes); the next request restores them transparently.
Unlike upstream, idleness never deletes anything: an idle user never loses work. ``delete_run`` is explicit.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from dataclasses import dataclass, field

from twinkle.common.models import tokenizer_id
from twinkle.common.wire import (
    AdamParams,
    CheckpointInfo,
    ForwardBackwardInput,
    ForwardBackwardOutput,
    LoraConfig,
    NotFoundError,
    OptimStepOutput,
    RunInfo,
    ServiceHealth,
    ServiceInfo,
    UserError,
)

from .backend import FusedItem, TrainingBackend, validate_lora
from .scheduler import Scheduler

log = logging.getLogger(__name__)


@dataclass
class _RunRecord:
    run_id: str
    owner: str
    lora: LoraConfig
    last_used: float = field(default_factory=time.monotonic)
    ready: bool = False  # the adapter exists in the backend


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
    ) -> None:
        """``fuse_batches``: run different users' concurrent forward_backward requests in one pass (faster with
        several users; equal to separate passes only up to float rounding). ``adapter_timeout_s`` None or <= 0
        disables offloading. ``sweep_interval_s`` defaults to a tenth of the timeout, between 1 s and 60 s.
        ``max_tokens_per_datum`` (the YAML's ``max_length``) and ``token_budget`` go to the backend built here."""
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
        self.sweep_interval_s = sweep_interval_s
        self.scheduler = Scheduler(
            gap_timeout_s=gap_timeout_s,
            result_cache=result_cache,
            batcher=self._run_fused if fuse_batches else None,
            max_batch=max_fused,
        )
        self._runs: dict[str, _RunRecord] = {}
        self._sweeper: asyncio.Task | None = None
        self._started = time.time()

    # --- runs -----------------------------------------------------------------------------------------

    async def create_run(self, run_id: str, owner: str, lora: LoraConfig, *, first_seq_id: int = 1) -> RunInfo:
        """Create a training run with a fresh adapter. Its requests are expected from ``first_seq_id`` on."""
        self._ensure_started()
        validate_lora(lora)
        if not isinstance(run_id, str) or not run_id:
            raise UserError("run_id must be a non-empty string", field="run_id")
        if run_id in self._runs:
            raise UserError(f"training run {run_id!r} already exists", field="run_id", status=409)
        held = sum(1 for r in self._runs.values() if r.owner == owner)
        if held >= self.adapter_limit_per_owner:
            raise UserError(
                f"adapter limit reached: this API key already holds {held} training runs on this model "
                f"(per_token_adapter_limit = {self.adapter_limit_per_owner}); delete a run before creating another"
            )
        rec = _RunRecord(run_id=run_id, owner=owner, lora=lora)
        self._runs[run_id] = rec  # reserved synchronously: the quota check above cannot race
        self.scheduler.add_run(run_id, next_seq=first_seq_id)
        try:
            rec.lora = await self.scheduler.run_exclusive(lambda: self.backend.create_adapter(run_id, lora))
        except BaseException:
            self._runs.pop(run_id, None)
            self.scheduler.remove_run(run_id)
            raise
        rec.ready = True
        return self._info(rec)

    async def delete_run(self, run_id: str, owner: str) -> None:
        self._ensure_started()
        rec = self._get(run_id, owner)
        del self._runs[run_id]
        self.scheduler.remove_run(run_id)
        if rec.ready:
            await self.scheduler.run_exclusive(lambda: self.backend.delete_adapter(run_id))

    async def run_info(self, run_id: str, owner: str) -> RunInfo:
        return self._info(self._get(run_id, owner))

    async def next_seq_id(self, run_id: str, owner: str) -> int:
        """The ``seq_id`` a client attaching to this run should number its next request with."""
        self._get(run_id, owner)
        return self.scheduler.next_seq(run_id)

    async def list_runs(self, owner: str) -> list[RunInfo]:
        return [self._info(r) for r in sorted(self._runs.values(), key=lambda r: r.run_id) if r.owner == owner]

    # --- training -------------------------------------------------------------------------------------

    async def forward_backward(
        self,
        run_id: str,
        owner: str,
        seq_id: int | None,
        inp: ForwardBackwardInput,
        forward_only: bool = False,
    ) -> ForwardBackwardOutput:
        self._get(run_id, owner)
        fusable = self.fuse_batches and not forward_only and self.backend.can_fuse(run_id)
        return await self._submit(
            run_id,
            seq_id,
            lambda: self.backend.forward_backward(run_id, inp, forward_only),
            batch_key="fb" if fusable else None,
            payload=FusedItem(run_id, inp),
        )

    async def optim_step(self, run_id: str, owner: str, seq_id: int | None, params: AdamParams) -> OptimStepOutput:
        self._get(run_id, owner)
        return await self._submit(run_id, seq_id, lambda: self.backend.optim_step(run_id, params))

    # --- checkpoints ----------------------------------------------------------------------------------

    async def save_state(
        self, run_id: str, owner: str, seq_id: int | None, path: str, include_optimizer: bool = True
    ) -> CheckpointInfo:
        self._get(run_id, owner)
        return await self._submit(run_id, seq_id, lambda: self.backend.save_state(run_id, path, include_optimizer))

    async def save_sampler_weights(self, run_id: str, owner: str, seq_id: int | None, path: str) -> CheckpointInfo:
        self._get(run_id, owner)
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
            try:
                await self._submit(run_id, seq_id, lambda: self.backend.load_state(run_id, path, include_optimizer))
            except BaseException:
                with contextlib.suppress(Exception):
                    await self.delete_run(run_id, owner)
                raise
        else:
            self._get(run_id, owner)
            await self._submit(run_id, seq_id, lambda: self.backend.load_state(run_id, path, include_optimizer))
        return self._info(self._get(run_id, owner))

    # --- service --------------------------------------------------------------------------------------

    async def skip(self, run_id: str, owner: str, seq_id: int, reason: str) -> None:
        """Use up ``seq_id`` for a request a front end refused before it reached the service (undecodable,
        oversize...). Later requests of the run must not wait for it; a repeat of it gets ``reason``."""
        self._get(run_id, owner)

        def refuse() -> None:
            raise UserError(reason, field="seq_id")

        try:
            await self._submit(run_id, seq_id, refuse)
        except UserError:
            pass

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
                await self.offload_idle()
            except Exception:
                log.exception("idle offload failed")

    def _get(self, run_id: str, owner: str) -> _RunRecord:
        rec = self._runs.get(run_id)
        if rec is None or rec.owner != owner:
            raise NotFoundError(f"training run {run_id!r} not found", field="run_id")
        return rec

    async def _submit(self, run_id: str, seq_id: int | None, fn, *, batch_key=None, payload=None):
        self._ensure_started()
        rec = self._runs.get(run_id)
        if rec is not None:
            rec.last_used = time.monotonic()
        try:
            return await self.scheduler.submit(run_id, seq_id, fn, batch_key=batch_key, payload=payload)
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
