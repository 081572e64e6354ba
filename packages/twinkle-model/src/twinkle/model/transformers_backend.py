"""The ``transformers`` backend: one frozen base model, one peft LoRA adapter and one AdamW per training run.

How adapters stay isolated on a shared model (the property the whole service rests on):

- Each run's adapter is a named peft adapter (``run_<n>``; run ids may contain characters a module name may
  not). Before every op the run's adapter is made the active one and **only its parameters require grad**, so a
  backward pass can only write the active run's ``.grad`` tensors; other runs' accumulated gradients stay as
  they were. (peft's ``set_adapter`` toggles ``requires_grad`` too; we set it explicitly for every adapter
  instead of relying on that side effect.)
- Each run has its own ``torch.optim.AdamW`` over exactly its parameters; its hyper-parameters are written into
  the param group on each ``optim_step`` call (Tinker sends them per call).
- LoRA dropout draws from a per-run RNG stream: the global generator is swapped to the run's saved state for
  the op and swapped back after (``torch.random.fork_rng``), so other runs' ops never shift it. Runs without
  dropout use no randomness at all (peft uses ``nn.Identity``).
- Initialisation is deterministic: the adapter is created under ``torch.manual_seed(lora.seed)`` inside a
  forked RNG (peft initialises on the CPU before moving to the device, so the init is device independent).
  A run created with ``seed=None`` gets a random seed, recorded in its config.
- The base model carries a rank-1 placeholder adapter that is never active. peft cannot hold a model with zero
  adapters, and runs come and go (deletion, offloading), so the placeholder keeps that edge case away.

Float-op order: a run's op sees the same tensors in the same shapes whatever else is loaded, so on one device
with one thread count the results are bit-identical to training that run alone. Fused passes (several runs'
rows in one batch, each block of rows through its own adapter, see ``_segmented_lora``) change batch shapes
and are only equal up to rounding; they are used only when the service enables fusion, and only for runs
without dropout.

Offloading: on CUDA an idle adapter's state (weights, gradients, AdamW moments, RNG) moves to CPU memory; on a
CPU device it is spilled to a safetensors file in ``spill_dir`` (moving CPU tensors to CPU memory would free
nothing). Either way the adapter is removed from the live model and rebuilt bit-exactly on its next op.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import secrets

import msgspec
import torch
import torch.nn.functional as F
from safetensors import safe_open
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

from . import checkpoints as ckpt
from .adapters import (
    TARGET_GROUPS,
    AdapterBackend,
    AdapterRun,
    lora_targets,
    pad_requests,
    peft_config,
    per_datum_outputs,
    read_checkpoint,
    saved_adapter_config,
    write_checkpoint,
)
from .backend import BackendInfo, FusedItem, run_slices, validate_adam, validate_lora
from .batching import micro_batches, target_logprobs
from .losses import ValidatedRequest, loss_metrics, validate_request

log = logging.getLogger(__name__)

_PLACEHOLDER = "twinkle_placeholder"


def read_checkpoint_lora(path: str) -> LoraConfig:
    """The LoRA config of a checkpoint: from twinkle_state.json, or derived from a plain PEFT adapter_config.json."""
    path = ckpt.require_checkpoint(path)
    doc = ckpt.read_state_file(path)
    if doc is not None:
        try:
            return msgspec.convert(doc["lora"], LoraConfig)
        except (KeyError, msgspec.ValidationError) as e:
            raise UserError(f"the checkpoint's {ckpt.STATE_FILE} has no valid LoRA config", field="path") from e
    # A plain PEFT adapter (e.g. sampler weights): derive the groups from its target modules.
    cfg = ckpt.read_adapter_config(path)
    targets = cfg.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    groups = {g: any(m in targets for m in mods) for g, mods in TARGET_GROUPS.items()}
    unknown = sorted(set(targets) - {m for mods in TARGET_GROUPS.values() for m in mods})
    if unknown or not any(groups.values()):
        raise UserError(f"adapter targets {targets} do not map onto attn/mlp/unembed groups", field="path")
    with safe_open(os.path.join(path, ckpt.ADAPTER_WEIGHTS), framework="pt") as f:
        if not list(f.keys()):
            raise UserError("the checkpoint holds no adapter weights", field="path")
    return LoraConfig(
        rank=int(cfg.get("r", 8)),
        alpha=float(cfg.get("lora_alpha", 8)),
        dropout=float(cfg.get("lora_dropout", 0.0) or 0.0),
        seed=0,
        **groups,
    )


@contextlib.contextmanager
def _segmented_lora(peft_model, segments: list[tuple[str, int]]) -> Iterator[None]:
    """For one forward pass, make every LoRA linear apply adapter ``name`` to its contiguous block of ``n``
    batch rows, for each ``(name, n)`` in ``segments``.

    Why not peft's own mixed-adapter batches (``adapter_names=``): peft refuses them in training mode and
    implements them with fancy indexing (``x[idx]``, ``result[idx] += ...``), whose backward materialises a
    full-size zero tensor per adapter and layer; on CPU that made a fused pass slower than separate ones.
    Contiguous blocks allow views (``split``) and one ``cat`` per layer instead."""
    from peft.tuners.lora import Linear as LoraLinear

    patched = [m for m in peft_model.modules() if isinstance(m, LoraLinear)]
    for m in patched:
        m.forward = functools.partial(_segmented_forward, m, segments)
    try:
        yield
    finally:
        for m in patched:
            del m.forward


def _segmented_forward(layer, segments: list[tuple[str, int]], x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    result = layer.base_layer(x, *args, **kwargs)
    parts = []
    for (name, _), xk in zip(segments, x.split([n for _, n in segments], dim=0)):
        if name in layer.lora_A:
            lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
            parts.append((lora_b(lora_a(xk.to(lora_a.weight.dtype))) * layer.scaling[name]).to(result.dtype))
        else:  # this run does not target this module
            parts.append(result.new_zeros(xk.shape[:-1] + result.shape[-1:]))
    return result + torch.cat(parts, dim=0)


class TransformersBackend(AdapterBackend):
    def __init__(
        self,
        model_id: str,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        spill_dir: str | None = None,
        offload_to: str = "auto",
        rank: int = 0,
        max_fused_tokens: int | None = None,
        token_budget: int | None = None,
        logits_chunk: int = 1024,
        max_tokens_per_datum: int | None = None,
        model=None,
    ) -> None:
        """``device``: None picks ``cuda`` when available, else ``cpu``. ``offload_to``: ``auto`` (CPU memory on
        CUDA, disk on CPU), ``cpu`` or ``disk``. ``rank`` only salts dropout streams in data parallelism.
        ``model``: an already loaded causal LM (tests, benchmarks); it is wrapped in place.
        ``max_fused_tokens``: the largest padded batch (rows x longest row) a fused pass may form; default 65536
        on CUDA, 2048 on CPU. ``token_budget``: the largest padded micro-batch (rows x longest row) one pass of a
        request may take — larger requests run as several passes with the same result; default 65536 on CUDA,
        8192 on CPU. ``logits_chunk``: tokens whose full-vocabulary logits may exist at once.
        ``max_tokens_per_datum``: a datum longer than this (or than the model's context) is refused."""
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        self.model_id = model_id
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        self._init_adapters(dev, spill_dir=spill_dir, offload_to=offload_to)
        self.rank = rank
        # Measured on a 2-core CPU: fusing 4x(2x64) tokens gains ~15%, 4x(8x128) loses ~20% (cache misses).
        self.max_fused_tokens = max_fused_tokens or (65536 if self.device.type == "cuda" else 2048)
        self.token_budget = token_budget or (65536 if self.device.type == "cuda" else 8192)
        if logits_chunk < 1:
            raise ValueError("logits_chunk must be >= 1")
        self.logits_chunk = logits_chunk
        base = model if model is not None else load_causal_lm(model_id, dtype=dtype)
        base.to(self.device)
        base.eval()
        for p in base.parameters():
            p.requires_grad_(False)
        cfg = base.config
        self.vocab_size = int(base.get_output_embeddings().weight.shape[0])
        self.max_length = int(getattr(cfg, "max_position_embeddings", 0) or 0) or None
        if max_tokens_per_datum is not None:
            self.max_length = min(self.max_length or max_tokens_per_datum, max_tokens_per_datum)
        # Chunked unembedding is exact for models whose logits are plain lm_head(hidden) (Llama/Qwen family).
        self._plain_head = not any(getattr(cfg, a, None) for a in ("final_logit_softcapping", "logit_scale"))
        linear_names = {n.rsplit(".", 1)[-1] for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
        self._available = {g: [m for m in mods if m in linear_names] for g, mods in TARGET_GROUPS.items()}
        first = next((m for mods in self._available.values() for m in mods), None)
        if first is None:
            raise ValueError(f"{model_id}: none of the LoRA target modules {TARGET_GROUPS} exist in this model")
        placeholder = PeftLoraConfig(r=1, lora_alpha=1, target_modules=[first], task_type="CAUSAL_LM")
        with torch.random.fork_rng(devices=self._rng_devices()):
            torch.manual_seed(0)
            self.peft = get_peft_model(base, placeholder, adapter_name=_PLACEHOLDER)
        for p in self.peft.parameters():
            p.requires_grad_(False)
        self._grad_sync = None  # set by distributed.ModelWorker: all-reduces gradients across ranks

    # --- adapters -------------------------------------------------------------------------------------

    def create_adapter(self, run_id: str, lora: LoraConfig) -> LoraConfig:
        validate_lora(lora)
        if run_id in self._runs:
            raise UserError(f"training run {run_id!r} already exists", field="run_id", status=409)
        if lora.seed is None:
            lora = msgspec.structs.replace(lora, seed=secrets.randbits(62))
        if not self._targets(lora):
            raise UserError(
                "this base model has no module for the requested LoRA groups "
                f"(attn: {self._available['train_attn']}, mlp: {self._available['train_mlp']}, "
                f"unembed: {self._available['train_unembed']})",
                field="lora.train_attn",
            )
        self._new_run(run_id, lora, stream_salt=self.rank)
        return lora

    def _targets(self, lora: LoraConfig) -> list[str]:
        """The model's module names that ``lora``'s groups train."""
        return lora_targets(lora, self._available)

    def _rng_devices(self) -> list:
        return [self.device] if self.device.type == "cuda" else []

    def _attach(self, run: AdapterRun) -> None:
        """Insert the run's adapter into the live model (seeded init) and give it a fresh optimizer."""
        with torch.random.fork_rng(devices=self._rng_devices()):  # manual_seed also reseeds CUDA
            torch.manual_seed(run.lora.seed)
            self.peft.add_adapter(run.name, peft_config(run.lora, self._targets(run.lora)))
        marker = f".{run.name}."
        run.params = {}
        for pname, p in self.peft.named_parameters():
            if marker in pname:
                p.requires_grad_(False)
                run.params[pname.replace(marker, ".")] = p
        run.optimizer = self._new_optimizer(run)
        run.resident = True

    def _detach(self, run: AdapterRun) -> None:
        self.peft.base_model.set_adapter(_PLACEHOLDER)
        self.peft.delete_adapter(run.name)
        run.params = {}
        run.optimizer = None
        run.resident = False

    def _activate(self, runs: list[AdapterRun]) -> None:
        """Only these runs' parameters require grad; the first one is peft's active adapter."""
        self.peft.base_model.set_adapter(runs[0].name)
        active = {r.run_id for r in runs}
        for run in self._runs.values():
            flag = run.run_id in active
            for p in run.params.values():
                p.requires_grad_(flag)

    # --- the training step ----------------------------------------------------------------------------

    def forward_backward_slices(self, run_id: str, inp: ForwardBackwardInput, forward_only: bool = False):
        req = validate_request(inp, vocab_size=self.vocab_size, max_length=self.max_length)
        self._resident(run_id)
        return self._forward_backward(run_id, req, forward_only)

    def _forward_backward(self, run_id: str, req: ValidatedRequest, forward_only: bool):
        """A generator: one micro-batch per slice. Each slice activates the run and its RNG stream itself and
        leaves the model in eval mode, so other runs' work may go in between with bit-identical results."""
        run = self._resident(run_id)
        dropout = run.lora.dropout > 0 and not forward_only
        lengths = req.lengths
        lp_all = torch.zeros((len(lengths), max(lengths)), dtype=torch.float32)
        loss_all = torch.zeros_like(lp_all)
        # 1. Micro-batches of whole datums within the token budget (one pass for most requests).
        for index, rows in enumerate(micro_batches(lengths, self.token_budget)):
            if index:
                yield  # another run's work may go here
                run = self._resident(run_id)
            # 2. Only this run's adapter is active and trainable; dropout only when training and configured.
            self._activate([run])
            self.peft.train(dropout)
            with self._run_rng(run, dropout), torch.set_grad_enabled(not forward_only):
                part = req.subset(rows)
                ids, valid, inputs = self._pad([part])
                # 3. Logprob of each target token under the current adapter.
                lp = self._target_logprobs(ids, valid, inputs["target_tokens"])
                # 4. The named loss per token; padding contributes nothing (and gets no gradient).
                per_token = req.spec.fn(lp, inputs, req.config) * valid
                # 5. SUM over tokens and datums, as Tinker defines every loss; grads accumulate until optim_step.
                if not forward_only:
                    per_token.sum().backward()
            self.peft.eval()
            width = ids.shape[1]
            lp_all[rows, :width] = lp.detach().float().cpu()
            loss_all[rows, :width] = per_token.detach().float().cpu()
        _, valid_all, inputs_all = self._pad([req], device=torch.device("cpu"))
        metrics = loss_metrics(req.spec, req.config, lp_all, inputs_all, loss_all, valid_all)
        return ForwardBackwardOutput(loss_fn_outputs=per_datum_outputs(lp_all, loss_all, lengths), metrics=metrics)

    def optim_step(self, run_id: str, params: AdamParams) -> OptimStepOutput:
        validate_adam(params)
        run = self._resident(run_id)
        weights = list(run.params.values())
        # 1. Data parallelism: sum every rank's accumulated gradient (losses are sums, so this equals the
        #    gradient of the whole global batch). A no-op in one process.
        if self._grad_sync is not None:
            self._grad_sync(weights)
        grads = [p.grad for p in weights if p.grad is not None]
        # 2. Global norm of this adapter's gradient; clip to grad_clip_norm when it is > 0.
        if not grads:
            grad_norm = 0.0
        elif params.grad_clip_norm > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(weights, params.grad_clip_norm))
        else:
            grad_norm = float(torch.nn.utils.get_total_norm(grads))
        if grads and not torch.isfinite(torch.tensor(grad_norm)):
            run.optimizer.zero_grad(set_to_none=True)
            raise UserError("the accumulated gradient is not finite; the step was skipped and gradients cleared")
        # 3. AdamW with this call's hyper-parameters (decoupled weight decay), then clear the accumulator.
        for group in run.optimizer.param_groups:
            group["lr"] = params.learning_rate
            group["betas"] = (params.beta1, params.beta2)
            group["eps"] = params.eps
            group["weight_decay"] = params.weight_decay
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        run.step += 1
        return OptimStepOutput(
            metrics={"grad_norm:mean": grad_norm, "learning_rate:mean": params.learning_rate, "step:max": run.step}
        )

    # --- fused passes ---------------------------------------------------------------------------------

    def can_fuse(self, run_id: str) -> bool:
        run = self._runs.get(run_id)
        return run is not None and run.lora.dropout == 0

    def forward_backward_many(self, items: list[FusedItem]) -> list[ForwardBackwardOutput | Exception]:
        """Several runs' forward_backward in ONE forward and ONE backward pass (a mixed-adapter batch).

        Each row of the batch goes through its own run's LoRA weights; the summed loss of all items is
        backpropagated once, and since every adapter only sees its own rows, each run's gradient is the one
        its request alone would give (up to float rounding). A single valid item takes the ordinary path,
        bit-identical to an unfused op."""
        results: list[ForwardBackwardOutput | Exception | None] = [None] * len(items)
        ready: list[tuple[int, AdapterRun, ValidatedRequest]] = []
        for i, item in enumerate(items):
            try:
                run = self._resident(item.run_id)
                if run.lora.dropout > 0:
                    raise ValueError(f"run {item.run_id!r} uses dropout and cannot join a fused pass")
                req = validate_request(item.inp, vocab_size=self.vocab_size, max_length=self.max_length)
                ready.append((i, run, req))
            except Exception as e:  # noqa: BLE001 - this item fails alone
                results[i] = e
        for group in self._fusion_groups(ready):
            if len(group) == 1:
                i, run, req = group[0]
                results[i] = self._capture(lambda: run_slices(self._forward_backward(run.run_id, req, False)))
                continue
            try:
                for (i, _, _), out in zip(group, self._fused(group)):
                    results[i] = out
            except Exception as e:  # noqa: BLE001 - the pass failed for all its items
                for i, _, _ in group:
                    results[i] = e
        return results  # type: ignore[return-value]

    def _fusion_groups(self, ready: list) -> list[list]:
        """Greedy groups whose padded batch stays within ``max_fused_tokens`` (bigger batches stop paying off:
        on a CPU, cache misses make one 4x(8x128) pass slower than four separate ones)."""
        groups: list[list] = []
        rows = width = 0
        for entry in ready:
            req = entry[2]
            r, w = rows + len(req.tokens), max(width, max(req.lengths))
            if groups and r * w <= self.max_fused_tokens:
                groups[-1].append(entry)
                rows, width = r, w
            else:
                groups.append([entry])
                rows, width = len(req.tokens), max(req.lengths)
        return groups

    @staticmethod
    def _capture(fn):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001
            return e

    def _fused(self, ready: list[tuple[int, AdapterRun, ValidatedRequest]]) -> list[ForwardBackwardOutput]:
        reqs = [req for _, _, req in ready]
        ids, valid, inputs = self._pad(reqs)
        segments = [(run.name, len(req.tokens)) for _, run, req in ready]  # contiguous rows per item
        self._activate([run for _, run, _ in ready])
        self.peft.eval()  # no dropout in fused passes
        with _segmented_lora(self.peft, segments):
            lp = self._full_target_logprobs(ids, valid, inputs["target_tokens"])
        total = lp.new_zeros(())
        per_item = []
        row = 0
        for _, _, req in ready:
            rows = slice(row, row + len(req.tokens))
            row = rows.stop
            item_inputs = {name: t[rows] for name, t in inputs.items()}
            per_token = req.spec.fn(lp[rows], item_inputs, req.config) * valid[rows]
            total = total + per_token.sum()
            per_item.append((rows, item_inputs, per_token))
        total.backward()
        outs = []
        for (rows, item_inputs, per_token), req in zip(per_item, reqs):
            metrics = loss_metrics(req.spec, req.config, lp[rows].detach(), item_inputs, per_token.detach(), valid[rows])
            outs.append(
                ForwardBackwardOutput(
                    loss_fn_outputs=per_datum_outputs(lp[rows], per_token, req.lengths), metrics=metrics
                )
            )
        return outs

    # --- tensors in and out ---------------------------------------------------------------------------

    def _pad(self, reqs: list[ValidatedRequest], device: torch.device | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        return pad_requests(reqs, device or self.device)

    def _target_logprobs(self, ids: torch.Tensor, valid: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self._plain_head:
            causal = self.peft.get_base_model()
            return target_logprobs(causal.get_decoder(), causal.get_output_embeddings(), ids, valid, targets,
                                   logits_chunk=self.logits_chunk)
        return self._full_target_logprobs(ids, valid, targets)

    def _full_target_logprobs(self, ids: torch.Tensor, valid: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Through the model's own forward (full logits): fused passes, whose per-row LoRA blocks need the
        [B, T, H] layout, and models whose logits are not plain lm_head(hidden)."""
        out = self.peft(input_ids=ids, attention_mask=valid.to(torch.int64), use_cache=False)
        logits = out.logits.float()
        lp = -F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)
        # Padding positions: zero value, no gradient, whatever the pad token predicted.
        return torch.where(valid > 0, lp, torch.zeros_like(lp))

    # --- checkpoints ----------------------------------------------------------------------------------

    def snapshot(self, run_id: str, include_optimizer: bool = True) -> ckpt.RunSnapshot:
        run = self._resident(run_id)
        cfg = saved_adapter_config(run.lora, self._targets(run.lora), self.model_id)
        return ckpt.RunSnapshot(step=run.step, lora=run.lora, model=self.model_id, adapter_config=cfg,
                                tensors=self._export(run, optimizer=include_optimizer, grads=False),
                                has_optimizer=include_optimizer)

    def save_state(self, run_id: str, path: str, include_optimizer: bool = True) -> CheckpointInfo:
        return write_checkpoint(path, self.snapshot(run_id, include_optimizer), state_file=True)

    def save_sampler_weights(self, run_id: str, path: str) -> CheckpointInfo:
        return write_checkpoint(path, self.snapshot(run_id, include_optimizer=False), state_file=False)

    def load_state(self, run_id: str, path: str, include_optimizer: bool) -> None:
        run = self._resident(run_id)
        state, step = read_checkpoint(path, include_optimizer)
        self._import(run, state, optimizer=include_optimizer, grads=False)
        run.step = step

    def read_checkpoint_lora(self, path: str) -> LoraConfig:
        return read_checkpoint_lora(path)

    # --- description ----------------------------------------------------------------------------------

    def describe(self) -> BackendInfo:
        return BackendInfo(
            model_name=served_model_name(self.model_id),
            model_id=self.model_id,
            backend="transformers",
            max_context_length=self.max_length or 0,
            vocab_size=self.vocab_size,
            dp_size=1,
            token_budget=self.token_budget,
        )
