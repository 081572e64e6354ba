"""What every torch backend does the same way for its runs' LoRA adapters (``AdapterBackend``).

A backend keeps one ``AdapterRun`` per training run: its LoRA tensors by checkpoint key (peft parameters, or a
megatron rank's slices of them), its AdamW, step counter and random streams, and whether it is on the live
model. This module owns the parts that do not depend on how an adapter sits in the model:

- the run registry and the lookups every op starts with (an unknown run is ``NotFoundError``);
- per-run random streams for dropout: the process's generator is swapped to the run's state for the op and
  swapped back (``torch.random.fork_rng``), so other runs' ops never shift it;
- a run's state as CPU tensors under one set of keys (``w:`` weights, ``g:`` gradients, ``m:``/``v:``/``s:``
  AdamW moments and step, ``rng:``), shared by checkpoints, snapshots and offloading, and written back
  exactly (a key or shape mismatch is a ``UserError`` naming ``path``);
- residency: an idle run's state moves to CPU memory (CUDA) or a spill file (CPU) and its adapter leaves the
  live model; the next op brings it back bit-exactly.

A subclass puts a run's adapter into the live model (``_attach``: fills ``run.params`` with fresh tensors,
seeded from ``run.lora.seed``) and takes it out (``_detach``).
"""

from __future__ import annotations

import abc
import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file, save_file
from twinkle.common.wire import CheckpointInfo, LoraConfig, NotFoundError, TensorData, UserError

from . import checkpoints as ckpt
from .backend import TrainingBackend, run_slices
from .losses import ValidatedRequest


# Module names per LoRA group, in the Llama/Qwen family's (PEFT) naming, which both backends' checkpoints use.
TARGET_GROUPS: dict[str, tuple[str, ...]] = {
    "train_attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "train_mlp": ("gate_proj", "up_proj", "down_proj"),
    "train_unembed": ("lm_head",),
}


def lora_targets(lora: LoraConfig, available: dict[str, list[str]] | None = None) -> list[str]:
    """The module names ``lora``'s groups train (of those ``available`` per group, if given)."""
    groups = available or TARGET_GROUPS
    return [m for g, mods in groups.items() if getattr(lora, g) for m in mods]


def peft_config(lora: LoraConfig, targets: list[str]):
    """``lora`` as a ``peft.LoraConfig`` over ``targets``."""
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(targets),
                          bias="none", task_type="CAUSAL_LM")


def saved_adapter_config(lora: LoraConfig, targets: list[str], model_id: str):
    """The ``adapter_config.json`` a checkpoint carries: for inference, naming the served base model."""
    from twinkle.common.models import served_model_name

    cfg = peft_config(lora, targets)
    cfg.inference_mode = True
    cfg.base_model_name_or_path = served_model_name(model_id)
    return cfg


@dataclass
class AdapterRun:
    run_id: str
    name: str  # the adapter's name in the live model (run ids may hold characters a module name may not)
    lora: LoraConfig
    step: int = 0
    params: dict[str, torch.Tensor] = field(default_factory=dict)  # checkpoint key -> this process's tensor
    optimizer: torch.optim.AdamW | None = None
    rng_cpu: torch.Tensor | None = None
    rng_cuda: torch.Tensor | None = None
    resident: bool = True
    parked: dict[str, torch.Tensor] | str | None = None  # offloaded state: CPU tensors, or a spill file path


class AdapterBackend(TrainingBackend):
    """The shared half of a torch backend; see the module docstring. Call ``_init_adapters`` first."""

    device: torch.device

    def _init_adapters(self, device: torch.device, *, spill_dir: str | None, offload_to: str = "auto") -> None:
        """``offload_to``: ``auto`` (CPU memory on CUDA, disk on CPU: moving CPU tensors to CPU memory would free
        nothing), ``cpu`` or ``disk``."""
        if offload_to not in ("auto", "cpu", "disk"):
            raise ValueError(f"offload_to must be auto, cpu or disk, got {offload_to!r}")
        self.device = device
        self.offload_to = ("cpu" if device.type == "cuda" else "disk") if offload_to == "auto" else offload_to
        self._spill_dir, self._own_spill_dir = spill_dir, spill_dir is None
        self._runs: dict[str, AdapterRun] = {}
        self._counter = 0

    @abc.abstractmethod
    def _attach(self, run: AdapterRun) -> None:
        """Insert the run's adapter into the live model with its seeded initial values; set ``run.params``,
        a fresh ``run.optimizer`` (``_new_optimizer``) and ``run.resident``."""

    @abc.abstractmethod
    def _detach(self, run: AdapterRun) -> None:
        """Remove the run's adapter from the live model; clear ``run.params`` and ``run.optimizer``."""

    # --- the registry -----------------------------------------------------------------------------------

    def _new_run(self, run_id: str, lora: LoraConfig, stream_salt: int) -> AdapterRun:
        """A run named ``run_<n>``, attached, with random streams seeded from its seed and ``stream_salt``."""
        self._counter += 1
        run = AdapterRun(run_id=run_id, name=f"run_{self._counter}", lora=lora)
        self._attach(run)
        seed = (lora.seed * 1_000_003 + stream_salt) % 2**63
        run.rng_cpu = torch.Generator().manual_seed(seed).get_state()
        if self.device.type == "cuda":
            with torch.random.fork_rng(devices=[self.device]):
                torch.cuda.manual_seed(seed)
                run.rng_cuda = torch.cuda.get_rng_state(self.device)
        self._runs[run_id] = run
        return run

    def _new_optimizer(self, run: AdapterRun) -> torch.optim.AdamW:
        # Placeholder hyper-parameters: optim_step writes the caller's before every step. A pipeline stage may
        # hold none of a run's tensors; its optimizer then has an empty one.
        params = list(run.params.values()) or [torch.zeros(0, device=self.device)]
        return torch.optim.AdamW(params, lr=0.0, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0)

    def delete_adapter(self, run_id: str) -> None:
        run = self._get(run_id)
        if run.resident:
            self._detach(run)
        if isinstance(run.parked, str):
            with contextlib.suppress(OSError):
                os.remove(run.parked)
        del self._runs[run_id]

    def has_run(self, run_id: str) -> bool:
        return run_id in self._runs

    def run_step(self, run_id: str) -> int:
        return self._get(run_id).step

    def is_resident(self, run_id: str) -> bool:
        return self._get(run_id).resident

    def _get(self, run_id: str) -> AdapterRun:
        run = self._runs.get(run_id)
        if run is None:
            raise NotFoundError(f"training run {run_id!r} not found", field="run_id")
        return run

    def _resident(self, run_id: str) -> AdapterRun:
        run = self._get(run_id)
        if not run.resident:
            self._restore(run)
        return run

    @contextlib.contextmanager
    def _run_rng(self, run: AdapterRun, enabled: bool) -> Iterator[None]:
        """Give dropout the run's own random stream (and put the process's stream back afterwards)."""
        if not enabled:
            yield
            return
        cuda = self.device.type == "cuda"
        with torch.random.fork_rng(devices=[self.device] if cuda else []):
            torch.set_rng_state(run.rng_cpu)
            if cuda:
                torch.cuda.set_rng_state(run.rng_cuda, self.device)
            yield
            run.rng_cpu = torch.get_rng_state()
            if cuda:
                run.rng_cuda = torch.cuda.get_rng_state(self.device)

    def forward_backward(self, run_id: str, inp, forward_only: bool = False):
        return run_slices(self.forward_backward_slices(run_id, inp, forward_only))

    # --- state export / import (checkpoints and offloading share one format) -------------------------

    def _export(self, run: AdapterRun, *, optimizer: bool, grads: bool) -> dict[str, torch.Tensor]:
        """Copy a run's state to CPU tensors under the module docstring's keys."""
        out: dict[str, torch.Tensor] = {}
        for key, p in run.params.items():
            out[f"w:{key}"] = p.detach().to("cpu", copy=True).contiguous()
            if grads and p.grad is not None:
                out[f"g:{key}"] = p.grad.detach().to("cpu", copy=True).contiguous()
            st = run.optimizer.state.get(p) if optimizer else None
            if st:
                out[f"m:{key}"] = st["exp_avg"].detach().to("cpu", copy=True).contiguous()
                out[f"v:{key}"] = st["exp_avg_sq"].detach().to("cpu", copy=True).contiguous()
                out[f"s:{key}"] = torch.as_tensor(st["step"]).detach().to("cpu", copy=True).reshape(1)
        if optimizer:
            out["rng:cpu"] = run.rng_cpu.clone()
            if run.rng_cuda is not None:
                out["rng:cuda"] = run.rng_cuda.clone()
        return out

    def _import(self, run: AdapterRun, state: dict[str, torch.Tensor], *, optimizer: bool, grads: bool) -> None:
        """Write exported state into a resident run (exact copies). Raises UserError on a key/shape mismatch."""
        expected, got = set(run.params), {k[2:] for k in state if k.startswith("w:")}
        if got != expected:
            missing, extra = sorted(expected - got), sorted(got - expected)
            raise UserError(
                "checkpoint does not match this run's LoRA config (rank / target modules): "
                f"{len(missing)} weights missing{' e.g. ' + missing[0] if missing else ''}, "
                f"{len(extra)} unexpected{' e.g. ' + extra[0] if extra else ''}",
                field="path",
            )
        for key, p in run.params.items():
            w = state[f"w:{key}"]
            if tuple(w.shape) != tuple(p.shape):
                raise UserError(f"checkpoint weight {key} has shape {list(w.shape)}, this run needs "
                                f"{list(p.shape)} (different LoRA rank?)", field="path")
        run.optimizer = self._new_optimizer(run)
        with torch.no_grad():
            for key, p in run.params.items():
                p.copy_(state[f"w:{key}"])
                g = state.get(f"g:{key}") if grads else None
                p.grad = None if g is None else g.to(device=p.device, dtype=p.dtype).clone()
                if optimizer and f"m:{key}" in state:
                    run.optimizer.state[p] = {
                        "step": state[f"s:{key}"].reshape(()).clone(),
                        "exp_avg": state[f"m:{key}"].to(p.device).clone(),
                        "exp_avg_sq": state[f"v:{key}"].to(p.device).clone(),
                    }
        if optimizer and "rng:cpu" in state:
            run.rng_cpu = state["rng:cpu"].clone()
            if "rng:cuda" in state and self.device.type == "cuda":
                run.rng_cuda = state["rng:cuda"].clone()

    # --- residency ------------------------------------------------------------------------------------

    def offload(self, run_id: str) -> None:
        run = self._get(run_id)
        if not run.resident:
            return
        state = self._export(run, optimizer=True, grads=True)
        if self.offload_to == "disk":
            path = os.path.join(self._spill(), f"{run.name}.safetensors")
            save_file(state, path)
            run.parked = path
        else:
            run.parked = {k: v.pin_memory() if self.device.type == "cuda" else v for k, v in state.items()}
        self._detach(run)

    def ensure_resident(self, run_id: str) -> None:
        self._resident(run_id)

    def _restore(self, run: AdapterRun) -> None:
        state = load_file(run.parked) if isinstance(run.parked, str) else run.parked
        self._attach(run)
        self._import(run, state, optimizer=True, grads=True)
        if isinstance(run.parked, str):
            with contextlib.suppress(OSError):
                os.remove(run.parked)
        run.parked = None

    def _spill(self) -> str:
        if self._spill_dir is None:
            self._spill_dir = tempfile.mkdtemp(prefix="twinkle-spill-")
        os.makedirs(self._spill_dir, exist_ok=True)
        return self._spill_dir

    def close(self) -> None:
        if self._own_spill_dir and self._spill_dir:
            shutil.rmtree(self._spill_dir, ignore_errors=True)
            self._spill_dir = None


# --- checkpoint files -------------------------------------------------------------------------------------


def write_checkpoint(path: str, snap: ckpt.RunSnapshot, *, state_file: bool) -> CheckpointInfo:
    """Write a state checkpoint (``state_file``) or sampler weights; what was written."""
    ckpt.write_snapshot(path, snap, state_file=state_file)
    return CheckpointInfo(path=os.path.abspath(path), size_bytes=ckpt.directory_size(path), step=snap.step)


def read_checkpoint(path: str, include_optimizer: bool) -> tuple[dict[str, torch.Tensor], int]:
    """A checkpoint's full tensors under the export keys, and its step (0 for plain PEFT weights)."""
    path = ckpt.require_checkpoint(path)
    doc = ckpt.read_state_file(path)
    state = {f"w:{k}": v for k, v in load_file(os.path.join(path, ckpt.ADAPTER_WEIGHTS)).items()}
    if include_optimizer:
        opt_file = os.path.join(path, ckpt.OPTIMIZER_STATE)
        if not os.path.isfile(opt_file):
            raise UserError("the checkpoint was saved without optimizer state; load it without the optimizer",
                            field="include_optimizer")
        state.update(load_file(opt_file))
    return state, int(doc["step"]) if doc else 0


# --- tensors in and out ----------------------------------------------------------------------------------


def pad_requests(reqs: list[ValidatedRequest], device: torch.device
                 ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Right-pad the datums of one or more requests into [B, T] tensors on ``device``: token ids, a validity
    mask, and every loss input any request uses (rows of a request that lacks one hold zeros, never read:
    each request's loss only sees its own rows)."""
    lengths = [n for r in reqs for n in r.lengths]
    b, t = len(lengths), max(lengths)
    ids = torch.zeros((b, t), dtype=torch.int64)
    valid = torch.zeros((b, t), dtype=torch.float32)
    names = {name for r in reqs for d in r.inputs for name in d}
    inputs = {name: torch.zeros((b, t), dtype=torch.int64 if name == "target_tokens" else torch.float32)
              for name in names}
    row = 0
    for r in reqs:
        for tok, d in zip(r.tokens, r.inputs):
            n = len(tok)
            ids[row, :n] = tok
            valid[row, :n] = 1.0
            for name, v in d.items():
                inputs[name][row, :n] = v
            row += 1
    return ids.to(device), valid.to(device), {k: v.to(device) for k, v in inputs.items()}


def per_datum_outputs(lp: torch.Tensor, per_token: torch.Tensor, lengths: list[int]) -> list[dict[str, TensorData]]:
    """Each datum's ``logprobs`` and ``elementwise_loss``, cut to its length."""
    lp_rows = lp.detach().float().cpu().tolist()
    loss_rows = per_token.detach().float().cpu().tolist()
    return [
        {
            "logprobs": TensorData(data=lp_rows[i][:n], dtype="float32", shape=[n]),
            "elementwise_loss": TensorData(data=loss_rows[i][:n], dtype="float32", shape=[n]),
        }
        for i, n in enumerate(lengths)
    ]
