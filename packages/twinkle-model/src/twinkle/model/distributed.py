"""Data parallelism: one ``ModelWorker`` per rank, driven by ``DataParallelBackend``.

Why it is exact: every loss is a SUM over datums. Each rank computes the summed loss of its shard of the batch
and accumulates that gradient locally; at ``optim_step`` the ranks all-reduce their accumulated gradients with
SUM, which yields exactly the gradient of the whole global batch (up to float summation order), and then take
the same AdamW step on identical weights. So ``dp_size`` W gives the update of ``dp_size`` 1 on the same global
batch. (Averaging, as a mean-loss trainer would do, would silently divide the learning signal by W.)

Layout:

- :class:`ModelWorker` is a plain class (no Ray import) wrapping a ``TransformersBackend`` on one device, with a
  ``torch.distributed`` process group (gloo on CPU, nccl on CUDA). Its methods take and return picklable
  msgspec structs, so any worker of ``twinkle.common.workers`` hosts it: pinned Ray actors (or the replica
  itself, for one CPU worker) in a deployment, local spawned processes (``ProcessWorker``) in tests.
- :class:`DataParallelBackend` implements ``TrainingBackend`` on top of a list of *rank handles*: anything with
  ``submit(method_name, *args) -> concurrent.futures.Future`` (every worker of ``twinkle.common.workers``).
  It validates requests once (so error fields name the global datum index), splits the datums contiguously
  (shard sizes differ by at most one, earlier ranks get the extra), calls every rank concurrently, and
  gathers per-datum outputs back in the original order.
  Metrics merge like the Tinker SDK merges chunks: ``:sum`` adds, ``:min``/``:max`` reduce, ``:mean`` is
  weighted by each shard's number of datums.
- Collectives happen only inside ``optim_step`` (every rank always takes part), never in forward/backward, so a
  rank with an empty shard simply returns nothing. Saving is done by rank 0 (all ranks hold the same weights);
  loading, offloading and creating run on every rank. Checkpoint paths must be on a filesystem all ranks see.
- Model-parallel backends reuse the driver: each rank reports its ``Placement`` (its data-parallel replica,
  whether it returns that replica's results, whether saves gather every rank's slices). Every rank of a
  replica gets the replica's shard; the megatron backend's ranks are ``megatron.worker.MegatronWorker``.
"""

from __future__ import annotations

import concurrent.futures
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec
from twinkle.common.wire import (
    AdamParams,
    CheckpointInfo,
    ForwardBackwardInput,
    ForwardBackwardOutput,
    LoraConfig,
    NotFoundError,
    OptimStepOutput,
)

from .backend import BackendInfo, FusedItem, TrainingBackend, validate_adam, validate_lora
from .checkpoints import RunSnapshot
from .losses import merge_metrics, validate_request


def shard_sizes(n: int, world_size: int) -> list[int]:
    """Contiguous split of n datums over world_size ranks; sizes differ by at most one."""
    base, extra = divmod(n, world_size)
    return [base + (1 if r < extra else 0) for r in range(world_size)]


def split(seq: Sequence, world_size: int) -> list[list]:
    out, start = [], 0
    for size in shard_sizes(len(seq), world_size):
        out.append(list(seq[start : start + size]))
        start += size
    return out


def allreduce_gradients(params: list, group=None) -> None:
    """SUM-all-reduce an adapter's gradients across ``group`` (default: every rank), in one flat buffer.

    Ranks must agree on which tensors take part: if any rank has a gradient, every rank materialises zeros for
    missing ones (a rank whose shards were empty); if none has, nothing is reduced and the step sees no grads."""
    import torch
    import torch.distributed as dist

    if not params or dist.get_world_size(group) == 1:
        return
    flag = torch.tensor([1.0 if any(p.grad is not None for p in params) else 0.0], device=params[0].device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    if flag.item() == 0:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    all_reduce_flat([p.grad for p in params], group)


def all_reduce_flat(tensors: list, group=None) -> None:
    """SUM-all-reduce tensors in place over ``group`` through one flat buffer."""
    import torch
    import torch.distributed as dist

    if not tensors or dist.get_world_size(group) == 1:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset: offset + t.numel()].view_as(t))
        offset += t.numel()


@dataclass(frozen=True)
class Placement:
    """Where a rank sits in its backend's layout, as the driver needs it.

    ``dp_rank``: the data-parallel replica it belongs to (its ranks all receive that replica's shard);
    ``returns_output``: the one rank per replica whose forward results are the shard's (the others return
    empty outputs); ``collective_saves``: a checkpoint or snapshot needs every rank (model-parallel slices are
    gathered), not just rank 0."""

    dp_rank: int
    dp_size: int
    returns_output: bool = True
    collective_saves: bool = False


def start_process_group(rank: int, world_size: int, master_addr: str, master_port: int, device: str | None,
                        timeout_s: float):
    """This process's device (``cuda`` picked when available and none given) and, for a group of several
    ranks, its ``torch.distributed`` membership (nccl on CUDA, gloo on CPU)."""
    import datetime

    import torch
    import torch.distributed as dist

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if dev.type == "cuda" else "gloo",
            init_method=f"tcp://{master_addr}:{master_port}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    return dev


class ModelWorker:
    """Rank ``rank`` of ``world_size``: one device, one base model, the adapters' shard of every batch."""

    collective_saves = False

    def __init__(
        self,
        model_id: str,
        rank: int,
        world_size: int,
        master_addr: str,
        master_port: int,
        device: str | None = None,
        *,
        spill_dir: str | None = None,
        timeout_s: float = 1800.0,
        max_tokens_per_datum: int | None = None,
    ) -> None:
        from .transformers_backend import TransformersBackend

        dev = start_process_group(rank, world_size, master_addr, master_port, device, timeout_s)
        self.rank, self.world_size = rank, world_size
        self.backend = TransformersBackend(model_id, device=dev, rank=rank, spill_dir=spill_dir,
                                           max_tokens_per_datum=max_tokens_per_datum)
        if world_size > 1:
            self.backend._grad_sync = allreduce_gradients

    def placement(self) -> Placement:
        return Placement(dp_rank=self.rank, dp_size=self.world_size)

    def describe(self) -> BackendInfo:
        info = self.backend.describe()
        return BackendInfo(**{**info.__dict__, "dp_size": self.world_size})

    def create_adapter(self, run_id: str, lora: LoraConfig) -> LoraConfig:
        return self.backend.create_adapter(run_id, lora)

    def delete_adapter(self, run_id: str) -> None:
        self.backend.delete_adapter(run_id)

    def forward_backward(self, run_id: str, inp: ForwardBackwardInput, forward_only: bool) -> ForwardBackwardOutput:
        if not inp.data:  # this rank's shard is empty (fewer datums than ranks)
            return ForwardBackwardOutput(loss_fn_outputs=[], metrics={})
        return self.backend.forward_backward(run_id, inp, forward_only)

    def forward_backward_many(self, items: list[FusedItem]) -> list[ForwardBackwardOutput | Exception]:
        results: list[Any] = [ForwardBackwardOutput(loss_fn_outputs=[], metrics={}) for _ in items]
        live = [i for i, it in enumerate(items) if it.inp.data]
        for i, out in zip(live, self.backend.forward_backward_many([items[i] for i in live])):
            results[i] = out
        return results

    def optim_step(self, run_id: str, params: AdamParams) -> OptimStepOutput:
        return self.backend.optim_step(run_id, params)

    def _saves(self) -> bool:
        return self.collective_saves or self.rank == 0

    def save_state(self, run_id: str, path: str, include_optimizer: bool) -> CheckpointInfo | None:
        return self.backend.save_state(run_id, path, include_optimizer) if self._saves() else None

    def snapshot(self, run_id: str, include_optimizer: bool) -> RunSnapshot | None:
        return self.backend.snapshot(run_id, include_optimizer) if self._saves() else None

    def save_sampler_weights(self, run_id: str, path: str) -> CheckpointInfo | None:
        return self.backend.save_sampler_weights(run_id, path) if self._saves() else None

    def load_state(self, run_id: str, path: str, include_optimizer: bool) -> None:
        self.backend.load_state(run_id, path, include_optimizer)

    def offload(self, run_id: str) -> None:
        self.backend.offload(run_id)

    def ensure_resident(self, run_id: str) -> None:
        self.backend.ensure_resident(run_id)

    def adapter_weights(self, run_id: str) -> dict[str, list[float]]:
        """A run's LoRA weights (this rank's slices) as plain lists (tests compare ranks)."""
        run = self.backend._resident(run_id)
        return {k: p.detach().cpu().reshape(-1).tolist() for k, p in run.params.items()}

    def close(self) -> None:
        import torch.distributed as dist

        self.backend.close()
        if dist.is_initialized():
            dist.destroy_process_group()


class RankHandle(Protocol):
    def submit(self, method: str, *args: Any) -> concurrent.futures.Future: ...


class DataParallelBackend(TrainingBackend):
    """Fans every op out to the ranks; see the module docstring for the rules."""

    def __init__(self, ranks: Sequence[RankHandle], *, model_id: str | None = None) -> None:
        if not ranks:
            raise ValueError("DataParallelBackend needs at least one rank")
        self.ranks = list(ranks)
        self.world_size = len(self.ranks)
        self._placements: list[Placement] = [h.submit("placement").result() for h in self.ranks]
        self.dp_size = self._placements[0].dp_size
        self._collective_saves = self._placements[0].collective_saves
        self._info: BackendInfo = self.ranks[0].submit("describe").result()
        self.model_id = model_id or self._info.model_id
        self._runs: dict[str, dict] = {}  # run_id -> {"lora", "step", "resident"}: answered without the ranks

    # fan-out helpers
    def _all(self, method: str, *shared: Any, per_rank: list[tuple] | None = None) -> list:
        """Call ``method`` on every rank at once (same args, or ``per_rank[r]``) and wait for all of them."""
        futures = [h.submit(method, *(per_rank[r] if per_rank is not None else shared)) for r, h in enumerate(self.ranks)]
        results, first_error = [], None
        for f in futures:  # wait for every rank, even after a failure, so none is left mid-collective
            try:
                results.append(f.result())
            except Exception as e:  # noqa: BLE001
                results.append(None)
                first_error = first_error or e
        if first_error is not None:
            raise first_error
        return results

    def _run(self, run_id: str) -> dict:
        st = self._runs.get(run_id)
        if st is None:
            raise NotFoundError(f"training run {run_id!r} not found", field="run_id")
        return st

    # adapters
    def create_adapter(self, run_id: str, lora: LoraConfig) -> LoraConfig:
        validate_lora(lora)
        if lora.seed is None:  # every rank must initialise identically
            lora = msgspec.structs.replace(lora, seed=secrets.randbits(62))
        try:
            self._all("create_adapter", run_id, lora)
        except Exception:
            for h in self.ranks:  # undo on ranks where it worked
                try:
                    h.submit("delete_adapter", run_id).result()
                except Exception:  # noqa: BLE001, S110
                    pass
            raise
        self._runs[run_id] = {"lora": lora, "step": 0, "resident": True}
        return lora

    def delete_adapter(self, run_id: str) -> None:
        self._run(run_id)
        self._all("delete_adapter", run_id)
        del self._runs[run_id]

    def has_run(self, run_id: str) -> bool:
        return run_id in self._runs

    def run_step(self, run_id: str) -> int:
        return self._run(run_id)["step"]

    def is_resident(self, run_id: str) -> bool:
        return self._run(run_id)["resident"]

    def can_fuse(self, run_id: str) -> bool:
        st = self._runs.get(run_id)
        return st is not None and st["lora"].dropout == 0

    # training
    def forward_backward(
        self, run_id: str, inp: ForwardBackwardInput, forward_only: bool = False
    ) -> ForwardBackwardOutput:
        self._run(run_id)
        validate_request(inp, vocab_size=self._info.vocab_size, max_length=self._info.max_context_length or None)
        shards = [msgspec.structs.replace(inp, data=s) for s in split(inp.data, self.dp_size)]
        outs = self._all("forward_backward", per_rank=[(run_id, shards[p.dp_rank], forward_only)
                                                       for p in self._placements])
        self._run(run_id)["resident"] = True
        return _gather(self._replica_outputs(outs), shards)

    def _replica_outputs(self, outs: list) -> list:
        """Each data-parallel replica's result, in replica order (from the rank that returns it)."""
        by_replica = {p.dp_rank: out for p, out in zip(self._placements, outs) if p.returns_output}
        return [by_replica[r] for r in range(self.dp_size)]

    def _saving(self, method: str, *args: Any) -> Any:
        """A save or snapshot: rank 0 alone, or every rank when the slices are gathered; rank 0's result."""
        if self._collective_saves:
            return self._all(method, *args)[0]
        return self.ranks[0].submit(method, *args).result()

    def forward_backward_many(self, items: list[FusedItem]) -> list[ForwardBackwardOutput | Exception]:
        results: list[Any] = [None] * len(items)
        valid: list[int] = []
        for i, it in enumerate(items):
            try:
                self._run(it.run_id)
                validate_request(
                    it.inp, vocab_size=self._info.vocab_size, max_length=self._info.max_context_length or None
                )
                valid.append(i)
            except Exception as e:  # noqa: BLE001
                results[i] = e
        if not valid:
            return results
        shards = {i: [msgspec.structs.replace(items[i].inp, data=s) for s in split(items[i].inp.data, self.dp_size)]
                  for i in valid}
        per_rank = [([FusedItem(items[i].run_id, shards[i][p.dp_rank]) for i in valid],) for p in self._placements]
        try:
            outs = self._all("forward_backward_many", per_rank=per_rank)
        except Exception as e:  # noqa: BLE001
            for i in valid:
                results[i] = e
            return results
        for k, i in enumerate(valid):
            rank_outs = self._replica_outputs([outs[r][k] for r in range(self.world_size)])
            err = next((o for o in rank_outs if isinstance(o, Exception)), None)
            results[i] = err if err is not None else _gather(rank_outs, shards[i])
            self._runs[items[i].run_id]["resident"] = True
        return results

    def optim_step(self, run_id: str, params: AdamParams) -> OptimStepOutput:
        st = self._run(run_id)
        validate_adam(params)
        outs = self._all("optim_step", run_id, params)
        st["step"] += 1
        st["resident"] = True
        return outs[0]

    # checkpoints
    def snapshot(self, run_id: str, include_optimizer: bool = True) -> RunSnapshot:
        """Rank 0's copy: ranks hold equal weights and moments (gradients are all-reduced before each step)."""
        self._run(run_id)
        snap = self._saving("snapshot", run_id, include_optimizer)
        self._run(run_id)["resident"] = True
        return snap

    def save_state(self, run_id: str, path: str, include_optimizer: bool = True) -> CheckpointInfo:
        self._run(run_id)
        info = self._saving("save_state", run_id, path, include_optimizer)
        self._run(run_id)["resident"] = True
        return info

    def save_sampler_weights(self, run_id: str, path: str) -> CheckpointInfo:
        self._run(run_id)
        info = self._saving("save_sampler_weights", run_id, path)
        self._run(run_id)["resident"] = True
        return info

    def load_state(self, run_id: str, path: str, include_optimizer: bool) -> None:
        st = self._run(run_id)
        from .checkpoints import read_state_file, require_checkpoint

        doc = read_state_file(require_checkpoint(path))
        self._all("load_state", run_id, path, include_optimizer)
        st["step"] = int(doc["step"]) if doc else 0
        st["resident"] = True

    def read_checkpoint_lora(self, path: str) -> LoraConfig:
        from .transformers_backend import read_checkpoint_lora

        return read_checkpoint_lora(path)

    # residency
    def offload(self, run_id: str) -> None:
        st = self._run(run_id)
        self._all("offload", run_id)
        st["resident"] = False

    def ensure_resident(self, run_id: str) -> None:
        st = self._run(run_id)
        self._all("ensure_resident", run_id)
        st["resident"] = True

    def describe(self) -> BackendInfo:
        return BackendInfo(**{**self._info.__dict__, "dp_size": self.dp_size})

    def close(self) -> None:
        for h in self.ranks:
            close = getattr(h, "close", None)
            if close is not None:
                close()


def _gather(outs: list[ForwardBackwardOutput], shards: list[ForwardBackwardInput]) -> ForwardBackwardOutput:
    """Per-datum outputs back in the original order (rank order = datum order); metrics merged."""
    return ForwardBackwardOutput(
        loss_fn_outputs=[o for out in outs for o in out.loss_fn_outputs],
        metrics=merge_metrics([(out.metrics, len(s.data)) for out, s in zip(outs, shards) if s.data]),
    )
