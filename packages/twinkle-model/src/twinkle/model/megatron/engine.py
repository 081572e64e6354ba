"""``MegatronEngine``: one rank of a megatron-core model with many runs' LoRA adapters on it.

It is the per-rank half of the megatron backend (``worker.py`` starts it, ``distributed.DataParallelBackend``
drives the ranks); it obeys the ``TrainingBackend`` contract of ``backend.py`` for the requests its rank sees:

- Every rank of a data-parallel replica (its TP x PP group) receives the same shard of datums and runs the
  same op; the megatron schedule does the forward and backward passes (pipeline stages exchange activations),
  so collectives always line up. The last pipeline stage holds logits split over the vocabulary; a target's
  logprob comes from vocab-parallel cross-entropy, and the loss is one of ``losses.py``'s, summed.
- ``optim_step`` sums the adapter's gradients over the data-parallel group, then sums the gradients that are
  partial per TP rank (``lora.replicated_a_gradients``), takes the global gradient norm over the model-parallel
  group (each TP-replicated tensor counted once), clips, and steps a per-run AdamW on this rank's slices
  (AdamW is elementwise, so slices step exactly as the full tensors would).
- Checkpoints are gathered: every rank of the model-parallel group sends its slices to the group's first
  rank, which assembles full PEFT tensors (same keys and files as the transformers backend, optimizer
  moments included) and writes them; loading slices the full tensors again. So a checkpoint moves between
  backends and between parallel layouts.
- Isolation, determinism and offloading are those of ``TransformersBackend``: only the active run's LoRA
  tensors require grad, dropout draws from the run's own stream (the same on every TP/PP rank of a replica,
  as a replicated input must be dropped identically), an idle run's slices move off the live model.
"""

from __future__ import annotations

import secrets

import msgspec
import torch
import torch.distributed as dist
from twinkle.common.models import load_causal_lm, served_model_name
from twinkle.common.wire import (
    AdamParams,
    CheckpointInfo,
    ForwardBackwardInput,
    ForwardBackwardOutput,
    LoraConfig,
    OptimStepOutput,
    UserError,
)

from .. import checkpoints as ckpt
from ..adapters import (
    TARGET_GROUPS,
    AdapterBackend,
    AdapterRun,
    lora_targets,
    pad_requests,
    per_datum_outputs,
    read_checkpoint,
    saved_adapter_config,
    write_checkpoint,
)
from ..backend import BackendInfo, validate_adam, validate_lora
from ..batching import micro_batches
from ..distributed import all_reduce_flat, allreduce_gradients
from ..losses import ValidatedRequest, loss_metrics, validate_request
from .lora import LoraParam, replicated_a_gradients, wrap_model

class MegatronEngine(AdapterBackend):
    def __init__(self, model_id: str, *, device: torch.device, spill_dir: str | None = None,
                 max_tokens_per_datum: int | None = None, token_budget: int | None = None) -> None:
        """Build this rank's stage of ``model_id`` under the current ``megatron.core.parallel_state``."""
        from megatron.core import parallel_state as ps

        from . import bridge

        self.model_id = model_id
        self._init_adapters(device, spill_dir=spill_dir)
        self.tp_rank, self.tp_size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
        self.pp_rank, self.pp_size = ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size()
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.last_stage = ps.is_pipeline_last_stage()
        hf = load_causal_lm(model_id)
        self.hf_config = hf.config
        self.model = bridge.build_model(hf.config, device=device)
        bridge.load_hf_weights(self.model, hf.state_dict(), hf.config)
        del hf
        self.lora = wrap_model(self.model, self.hf_config, self.tp_rank, self.tp_size)
        self.vocab_size = int(self.hf_config.vocab_size)
        self.max_length = int(getattr(self.hf_config, "max_position_embeddings", 0) or 0) or None
        if max_tokens_per_datum is not None:
            self.max_length = min(self.max_length or max_tokens_per_datum, max_tokens_per_datum)
        # The last stage holds a micro-batch's logits over its vocabulary slice at once (vocab-parallel
        # cross-entropy needs them whole): bound them to 2 GiB on CUDA, 512 MiB on CPU.
        logits_bytes = 2**31 if device.type == "cuda" else 2**29
        per_token = 4 * (self.vocab_size // self.tp_size)
        self.token_budget = min(token_budget or (65536 if device.type == "cuda" else 8192),
                                max(1, logits_bytes // per_token))
        self._layout: dict[str, dict[str, LoraParam]] = {}  # run name -> where each of its tensors sits

    # --- adapters -------------------------------------------------------------------------------------

    def create_adapter(self, run_id: str, lora: LoraConfig) -> LoraConfig:
        validate_lora(lora)
        if run_id in self._runs:
            raise UserError(f"training run {run_id!r} already exists", field="run_id", status=409)
        if not any(getattr(lora, g) for g in TARGET_GROUPS):
            raise UserError("the LoRA config trains no module group", field="lora.train_attn")
        if lora.seed is None:  # the driver fills it in so that every rank agrees; a lone engine does it here
            lora = msgspec.structs.replace(lora, seed=secrets.randbits(62))
        self._new_run(run_id, lora, stream_salt=self.dp_rank)  # one stream per replica, shared by its TP/PP ranks
        return lora

    def _attach(self, run: AdapterRun) -> None:
        groups = {g for g in TARGET_GROUPS if getattr(run.lora, g)}
        layout = self.lora.attach(run.name, run.lora.rank, run.lora.alpha, run.lora.dropout, groups,
                                  run.lora.seed, self.device)
        self._layout[run.name] = layout
        run.params = {key: p.tensor for key, p in layout.items()}
        for t in run.params.values():
            t.requires_grad_(False)
        run.optimizer = self._new_optimizer(run)
        run.resident = True

    def _detach(self, run: AdapterRun) -> None:
        self.lora.detach(run.name)
        self._layout.pop(run.name, None)
        run.params, run.optimizer, run.resident = {}, None, False

    def _activate(self, run: AdapterRun) -> None:
        self.lora.activate(run.name)
        for other in self._runs.values():
            for t in other.params.values():
                t.requires_grad_(other is run)

    # --- the training step ----------------------------------------------------------------------------

    def forward_backward_slices(self, run_id: str, inp: ForwardBackwardInput, forward_only: bool = False):
        req = validate_request(inp, vocab_size=self.vocab_size, max_length=self.max_length)
        self._resident(run_id)
        return self._forward_backward(run_id, req, forward_only)

    def _forward_backward(self, run_id: str, req: ValidatedRequest, forward_only: bool):
        """A generator, one micro-batch per slice (see ``TransformersBackend._forward_backward``). Only the
        last pipeline stage sees logprobs; the other stages return an empty output."""
        run = self._resident(run_id)
        dropout = run.lora.dropout > 0 and not forward_only
        lengths = req.lengths
        lp_all = torch.zeros((len(lengths), max(lengths)), dtype=torch.float32)
        loss_all = torch.zeros_like(lp_all)
        for index, rows in enumerate(micro_batches(lengths, self.token_budget)):
            if index:
                yield
                run = self._resident(run_id)
            # 1. Only this run's adapter is active and trainable; dropout only when training and configured.
            self._activate(run)
            self.lora.train(dropout)
            with self._run_rng(run, dropout):
                part = req.subset(rows)
                ids, valid, inputs = pad_requests([part], self.device)
                # 2. Forward (and backward) through every stage; the last one computes the named loss.
                lp, per_token = self._pass(ids, valid, inputs, part, forward_only)
            self.lora.train(False)
            if self.last_stage:
                width = ids.shape[1]
                lp_all[rows, :width] = lp.float().cpu()
                loss_all[rows, :width] = per_token.float().cpu()
        if not self.last_stage:
            return ForwardBackwardOutput(loss_fn_outputs=[], metrics={})
        _, valid_all, inputs_all = pad_requests([req], torch.device("cpu"))
        metrics = loss_metrics(req.spec, req.config, lp_all, inputs_all, loss_all, valid_all)
        return ForwardBackwardOutput(loss_fn_outputs=per_datum_outputs(lp_all, loss_all, lengths), metrics=metrics)

    def _pass(self, ids: torch.Tensor, valid: torch.Tensor, inputs: dict[str, torch.Tensor],
              req: ValidatedRequest, forward_only: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """One micro-batch through megatron's schedule: (logprobs, per-token loss) on the last stage."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from .bridge import target_logprobs

        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)

        def loss(output: torch.Tensor):
            lp = torch.where(valid > 0, target_logprobs(output, inputs["target_tokens"]), torch.zeros_like(valid))
            per_token = req.spec.fn(lp, inputs, req.config) * valid
            return per_token.sum(), {"lp": lp.detach(), "per_token": per_token.detach()}

        def step(batch_iter, model):
            next(batch_iter)
            return model(ids, positions, attention_mask=None), loss

        with torch.set_grad_enabled(not forward_only):
            store = get_forward_backward_func()(
                forward_step_func=step, data_iterator=iter([None]), model=[self.model], num_microbatches=1,
                seq_length=ids.shape[1], micro_batch_size=ids.shape[0], forward_only=forward_only)
        if not self.last_stage:
            return None, None
        return store[0]["lp"], store[0]["per_token"]

    def optim_step(self, run_id: str, params: AdamParams) -> OptimStepOutput:
        from megatron.core import parallel_state as ps

        validate_adam(params)
        run = self._resident(run_id)
        tensors, layout = list(run.params.values()), self._layout[run.name]
        # 1. Sum every replica's gradient (losses are sums, so this is the global batch's gradient); then
        #    the partial ones of this replica's TP ranks. Every rank takes part, with or without gradients.
        allreduce_gradients(tensors, ps.get_data_parallel_group())
        if self.tp_size > 1:
            all_reduce_flat(replicated_a_gradients(layout.values()), ps.get_tensor_model_parallel_group())
        # 2. The global norm: each slice once, each TP-replicated tensor once (from TP rank 0).
        sq = torch.zeros((), dtype=torch.float64, device=self.device)
        for p in layout.values():
            if p.tensor.grad is not None and (not p.replicated_in_tp or self.tp_rank == 0):
                sq += p.tensor.grad.double().pow(2).sum()
        if self.tp_size * self.pp_size > 1:
            dist.all_reduce(sq, group=ps.get_model_parallel_group())
        grad_norm = float(sq.sqrt())
        has_grads = any(t.grad is not None for t in tensors)
        if has_grads and not torch.isfinite(torch.tensor(grad_norm)):
            run.optimizer.zero_grad(set_to_none=True)
            raise UserError("the accumulated gradient is not finite; the step was skipped and gradients cleared")
        if has_grads and 0 < params.grad_clip_norm < grad_norm:  # as torch.nn.utils.clip_grad_norm_ scales
            coef = params.grad_clip_norm / (grad_norm + 1e-6)
            for t in tensors:
                if t.grad is not None:
                    t.grad.mul_(coef)
        # 3. AdamW with this call's hyper-parameters, then clear the accumulator.
        for group in run.optimizer.param_groups:
            group.update(lr=params.learning_rate, betas=(params.beta1, params.beta2), eps=params.eps,
                         weight_decay=params.weight_decay)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        run.step += 1
        return OptimStepOutput(metrics={"grad_norm:mean": grad_norm if has_grads else 0.0,
                                        "learning_rate:mean": params.learning_rate, "step:max": run.step})

    # --- state: this rank's slices, and full tensors gathered over the model-parallel group -------------

    def _gather_full(self, run: AdapterRun, *, optimizer: bool) -> dict[str, torch.Tensor] | None:
        """Full PEFT tensors on the model-parallel group's first rank (None on the others). Collective."""
        from megatron.core import parallel_state as ps

        local = self._export(run, optimizer=optimizer, grads=False)
        dims = {key: p.shard.dim for key, p in self._layout[run.name].items()}
        mine = {k: (self.tp_rank, dims.get(k[2:]), v) for k, v in local.items()
                if dims.get(k[2:]) is not None or self.tp_rank == 0}  # replicated tensors from TP rank 0 only
        if self.tp_size * self.pp_size == 1:
            return {k: v for k, (_, _, v) in mine.items()}
        group = ps.get_model_parallel_group()
        first = dist.get_global_rank(group, 0)
        parts: list | None = [None] * dist.get_world_size(group) if dist.get_rank() == first else None
        dist.gather_object(mine, parts, dst=first, group=group)
        if parts is None:
            return None
        pieces: dict[str, list[tuple[int, int | None, torch.Tensor]]] = {}
        for part in parts:
            for k, entry in part.items():
                pieces.setdefault(k, []).append(entry)
        full: dict[str, torch.Tensor] = {}
        for k, entries in pieces.items():
            entries.sort(key=lambda e: e[0])
            dim = entries[0][1]
            if k.startswith("s:") or k.startswith("rng:") or dim is None:
                full[k] = entries[0][2]
            else:
                full[k] = torch.cat([e[2] for e in entries], dim=dim).contiguous()
        return full

    def _slice_full(self, run: AdapterRun, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's slices of full tensors (keys as ``_export``): its own weights, and any weight of
        this stage it lacks (for ``_import`` to report); other stages' tensors are left out."""
        out = {}
        for k, v in full.items():
            kind, _, key = k.partition(":")
            p = self._layout[run.name].get(key)
            if kind == "rng" or (p is None and kind == "w" and not self._on_other_stage(key)):
                out[k] = v
            elif p is not None:
                whole = kind == "s" or p.shard.dim is None or self.tp_size == 1
                out[k] = v if whole else v.chunk(self.tp_size, dim=p.shard.dim)[self.tp_rank]
        return out

    def _on_other_stage(self, key: str) -> bool:
        """Whether a PEFT key belongs to a layer of another pipeline stage."""
        if self.pp_size == 1:
            return False
        if ".lm_head." in key:
            return not self.last_stage
        layers_per_stage = self.hf_config.num_hidden_layers // self.pp_size
        try:
            index = int(key.split(".layers.", 1)[1].split(".", 1)[0])
        except (IndexError, ValueError):
            return False
        return index // layers_per_stage != self.pp_rank

    # --- checkpoints ----------------------------------------------------------------------------------

    def snapshot(self, run_id: str, include_optimizer: bool = True) -> ckpt.RunSnapshot | None:
        """The run's full state on the model-parallel group's first rank, None on the others. Collective."""
        run = self._resident(run_id)
        tensors = self._gather_full(run, optimizer=include_optimizer)
        if tensors is None:
            return None
        return ckpt.RunSnapshot(step=run.step, lora=run.lora, model=self.model_id,
                                adapter_config=saved_adapter_config(run.lora, lora_targets(run.lora), self.model_id),
                                tensors=tensors,
                                has_optimizer=include_optimizer)

    def save_state(self, run_id: str, path: str, include_optimizer: bool = True) -> CheckpointInfo | None:
        snap = self.snapshot(run_id, include_optimizer)
        # every replica holds the same state: one writes it
        return write_checkpoint(path, snap, state_file=True) if snap is not None and self.dp_rank == 0 else None

    def save_sampler_weights(self, run_id: str, path: str) -> CheckpointInfo | None:
        snap = self.snapshot(run_id, include_optimizer=False)
        return write_checkpoint(path, snap, state_file=False) if snap is not None and self.dp_rank == 0 else None

    def load_state(self, run_id: str, path: str, include_optimizer: bool) -> None:
        run = self._resident(run_id)
        full, step = read_checkpoint(path, include_optimizer)
        self._import(run, self._slice_full(run, full), optimizer=include_optimizer, grads=False)
        run.step = step

    def read_checkpoint_lora(self, path: str) -> LoraConfig:
        from ..transformers_backend import read_checkpoint_lora

        return read_checkpoint_lora(path)

    # --- description ----------------------------------------------------------------------------------

    def describe(self) -> BackendInfo:
        return BackendInfo(model_name=served_model_name(self.model_id), model_id=self.model_id, backend="megatron",
                           max_context_length=self.max_length or 0, vocab_size=self.vocab_size,
                           dp_size=self.dp_size, token_budget=self.token_budget)
