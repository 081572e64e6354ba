"""Multi-LoRA inference for the torch engine: many adapters resident, a different one per batch row.

Why not peft's mixed batches (``adapter_names=[...]``)? They work (verified with peft 0.21 / transformers 5),
but every forward registers and removes a hook on every LoRA layer and then loops over the adapters present
in every layer: per decode step that is ``layers x adapters x ~5`` small kernels plus Python. Here each target
``nn.Linear`` is wrapped once in :class:`LoRALinear`, which keeps all resident adapters stacked in slot
tensors ``A[slot] (r x in)``, ``B[slot] (out x r, scaling folded in)``; a forward is then

- no adapter rows in the batch: the base layer alone;
- every row on one adapter: two extra matmuls;
- mixed: gather ``A[slots]``/``B[slots]`` per row and two batched matmuls (the BGMV pattern of punica/vLLM),

whatever the number of distinct adapters. Slot 0 is all zeros: base-model rows add exactly 0, so they are
bit-identical to the plain model. The LoRA path runs in float32 when the base model is half precision (as
peft does by default), and its sum with the base output is cast back to the base dtype.

Adapters are read from stock PEFT checkpoints (``adapter_config.json`` + ``adapter_model.safetensors``/.bin)
with peft's own readers. Whatever this runtime cannot apply exactly is refused with a ``UserError``
(DoRA, ``modules_to_save``, embedding LoRA, trained base biases, non-Linear targets...), never half-applied.
Base-weight copies that PEFT stores beside the adapter (``...base_layer.weight`` when ``lm_head`` is a target)
are ignored: the base weights are the server's.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from twinkle.common.wire import UserError

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<part>lora_A|lora_B)\.(?P<kind>weight|bias)$")


@dataclass
class LoRAContext:
    """What the current forward pass applies: ``slots`` (LongTensor [batch]) or None for base-only;
    ``single`` is the one slot when every row shares it."""

    slots: Any = None
    single: int | None = None


def _lazy_torch():
    import torch

    return torch


def make_lora_linear_class():
    torch = _lazy_torch()
    nn = torch.nn
    F = torch.nn.functional

    class LoRALinear(nn.Module):
        """A base ``nn.Linear`` plus per-slot LoRA weights (see the module docstring)."""

        def __init__(self, base: nn.Linear, ctx: LoRAContext, num_slots: int) -> None:
            super().__init__()
            self.base = base
            self.in_features = base.in_features
            self.out_features = base.out_features
            self._ctx = ctx
            self.num_slots = num_slots
            self.rank = 0
            w = base.weight
            self.lora_dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
            self.A = None  # [slots, rank, in]
            self.B = None  # [slots, out, rank]  (scaled)
            self.bias = None  # [slots, out]  (scaled), only once an adapter with lora_bias is loaded
            self.active: set[int] = set()

        @property
        def weight(self):  # code that inspects layer.weight (dtype/device checks) sees the base weight
            return self.base.weight

        def _grow(self, rank: int) -> None:
            if rank <= self.rank:
                return
            dev = self.base.weight.device
            A = torch.zeros(self.num_slots, rank, self.in_features, dtype=self.lora_dtype, device=dev)
            B = torch.zeros(self.num_slots, self.out_features, rank, dtype=self.lora_dtype, device=dev)
            if self.A is not None:
                A[:, : self.rank] = self.A
                B[:, :, : self.rank] = self.B
            self.A, self.B, self.rank = A, B, rank

        def set_slot(self, slot: int, A, B, bias) -> None:
            r = A.shape[0]
            self._grow(r)
            self.A[slot].zero_()
            self.B[slot].zero_()
            self.A[slot, :r] = A.to(self.A)
            self.B[slot, :, :r] = B.to(self.B)
            if bias is not None:
                if self.bias is None:
                    self.bias = torch.zeros(self.num_slots, self.out_features, dtype=self.lora_dtype,
                                            device=self.A.device)
                self.bias[slot] = bias.to(self.bias)
            elif self.bias is not None:
                self.bias[slot].zero_()
            self.active.add(slot)

        def clear_slot(self, slot: int) -> None:
            if slot in self.active:
                self.A[slot].zero_()
                self.B[slot].zero_()
                if self.bias is not None:
                    self.bias[slot].zero_()
                self.active.discard(slot)

        def forward(self, x):
            out = self.base(x)
            ctx = self._ctx
            if ctx.slots is None or not self.active:
                return out
            xs = x.to(self.lora_dtype)
            if ctx.single is not None:
                s = ctx.single
                if s not in self.active:
                    return out
                delta = F.linear(F.linear(xs, self.A[s]), self.B[s], None if self.bias is None else self.bias[s])
            else:
                slots = ctx.slots
                shape = xs.shape
                x3 = xs.reshape(shape[0], -1, shape[-1])  # [batch, tokens, in]
                h = torch.bmm(x3, self.A[slots].transpose(1, 2))
                delta = torch.bmm(h, self.B[slots].transpose(1, 2))
                if self.bias is not None:
                    delta = delta + self.bias[slots][:, None, :]
                delta = delta.reshape(*shape[:-1], self.out_features)
            if out.dtype == delta.dtype:
                return out + delta
            return (out.to(delta.dtype) + delta).to(out.dtype)

        def extra_repr(self) -> str:
            return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, slots={sorted(self.active)}"

    return LoRALinear


@dataclass
class _SlotInfo:
    path: str
    modules: list[str] = field(default_factory=list)


class MultiLoRA:
    """Loads PEFT LoRA checkpoints into slots of a base model (in place) and selects slots per forward."""

    def __init__(self, model: Any, max_adapters: int) -> None:
        self.model = model
        self.ctx = LoRAContext()
        self.num_slots = max_adapters + 1  # slot 0 = base (all zeros)
        self._free = list(range(1, self.num_slots))
        self._slots: dict[int, _SlotInfo] = {}
        self._wrappers: dict[str, Any] = {}
        self._cls = make_lora_linear_class()

    @property
    def resident(self) -> int:
        return len(self._slots)

    # -- loading ---------------------------------------------------------------------------------------

    def load(self, path: str) -> int:
        """Load the checkpoint at ``path`` into a free slot; return the slot. ``UserError`` if it cannot be
        applied exactly."""
        torch = _lazy_torch()
        cfg = self._read_config(path)
        weights = self._read_weights(path)
        per_module: dict[str, dict[str, Any]] = {}
        for key, t in weights.items():
            if ".base_layer." in key:
                continue  # a copy of a base weight (lm_head / embeddings), not part of the adapter
            m = _KEY.match(key)
            if m is None:
                raise UserError(f"adapter checkpoint {path!r} holds a tensor this sampler cannot apply: {key!r}",
                                field="adapter_path")
            per_module.setdefault(m["module"], {})[f"{m['part']}.{m['kind']}"] = t
        if not per_module:
            raise UserError(f"adapter checkpoint {path!r} holds no LoRA weights", field="adapter_path")

        linear_names = self._linear_module_names()
        expected = self._expected_targets(cfg, linear_names)
        if expected is not None:  # the config's target_modules must describe exactly the weights present
            if not expected:
                raise UserError(f"adapter checkpoint {path!r}: target_modules {cfg.target_modules!r} match no "
                                "linear layer of this base model", field="adapter_path")
            extra = sorted(set(per_module) - expected)
            if extra:
                raise UserError(f"adapter checkpoint {path!r} has weights for modules outside its target_modules, "
                                f"e.g. {extra[:3]}", field="adapter_path")
        missing = sorted((expected or set()) - set(per_module))
        if missing:
            raise UserError(f"adapter checkpoint {path!r} lacks LoRA weights for {len(missing)} targeted modules, "
                            f"e.g. {missing[:3]}", field="adapter_path")

        prepared = []
        for name, parts in sorted(per_module.items()):
            if name not in linear_names:
                raise UserError(f"adapter checkpoint {path!r} targets {name!r}, which is not a linear layer of "
                                "this base model", field="adapter_path")
            if "lora_A.weight" not in parts or "lora_B.weight" not in parts:
                raise UserError(f"adapter checkpoint {path!r} has an incomplete LoRA pair for {name!r}",
                                field="adapter_path")
            if "lora_A.bias" in parts:
                raise UserError(f"adapter checkpoint {path!r}: a bias on lora_A is not supported", field="adapter_path")
            A, B = parts["lora_A.weight"], parts["lora_B.weight"]
            base = self._base_linear(name)
            r = A.shape[0]
            if A.dim() != 2 or B.dim() != 2 or A.shape[1] != base.in_features or B.shape != (base.out_features, r):
                raise UserError(
                    f"adapter checkpoint {path!r} does not fit the base model at {name!r}: lora_A {tuple(A.shape)}, "
                    f"lora_B {tuple(B.shape)}, layer {base.in_features}->{base.out_features}", field="adapter_path")
            cfg_r = self._pattern(cfg.rank_pattern, name, cfg.r)
            if cfg_r != r:
                raise UserError(f"adapter checkpoint {path!r}: {name!r} has rank {r} but its config says {cfg_r}",
                                field="adapter_path")
            alpha = self._pattern(cfg.alpha_pattern, name, cfg.lora_alpha)
            scale = alpha / math.sqrt(r) if getattr(cfg, "use_rslora", False) else alpha / r
            bias = parts.get("lora_B.bias")
            prepared.append((name, A.float(), B.float() * scale, None if bias is None else bias.float() * scale))

        if not self._free:
            raise RuntimeError("no free LoRA slot (the adapter cache should never ask for more than max_loras)")
        slot = self._free.pop(0)
        info = _SlotInfo(path)
        try:
            with torch.no_grad():
                for name, A, B, bias in prepared:
                    self._wrap(name).set_slot(slot, A, B, bias)
                    info.modules.append(name)
        except BaseException:
            for name in info.modules:
                self._wrappers[name].clear_slot(slot)
            self._free.insert(0, slot)
            raise
        self._slots[slot] = info
        return slot

    def unload(self, slot: int) -> None:
        info = self._slots.pop(slot, None)
        if info is None:
            return
        torch = _lazy_torch()
        with torch.no_grad():
            for name in info.modules:
                self._wrappers[name].clear_slot(slot)
        self._free.append(slot)

    # -- selecting -------------------------------------------------------------------------------------

    def select(self, slots: list[int], device: Any) -> None:
        """Set the rows' slots for the next forward passes (0 = base model)."""
        torch = _lazy_torch()
        distinct = set(slots)
        if distinct == {0} or not distinct:
            self.ctx.slots, self.ctx.single = None, None
        elif len(distinct) == 1:  # every row on one adapter: plain matmuls with that slot, no gather
            self.ctx.slots, self.ctx.single = True, next(iter(distinct))
        else:
            self.ctx.slots, self.ctx.single = torch.tensor(slots, dtype=torch.long, device=device), None

    def clear_selection(self) -> None:
        self.ctx.slots, self.ctx.single = None, None

    # -- internals -------------------------------------------------------------------------------------

    def _read_config(self, path: str):
        from peft import PeftConfig

        try:
            cfg = PeftConfig.from_pretrained(path)
        except Exception as e:  # noqa: BLE001
            raise UserError(f"adapter checkpoint {path!r} has an unreadable adapter_config.json: {e}",
                            field="adapter_path") from e
        kind = str(getattr(cfg.peft_type, "value", cfg.peft_type))
        if kind != "LORA":
            raise UserError(f"adapter checkpoint {path!r} is a {kind} adapter; only LoRA is served",
                            field="adapter_path")
        unsupported = {
            "use_dora": bool(getattr(cfg, "use_dora", False)),
            "modules_to_save": bool(getattr(cfg, "modules_to_save", None)),
            "trainable_token_indices": bool(getattr(cfg, "trainable_token_indices", None)),
            "layer_replication": bool(getattr(cfg, "layer_replication", None)),
            "fan_in_fan_out": bool(getattr(cfg, "fan_in_fan_out", False)),
            "bias": getattr(cfg, "bias", "none") not in (None, "none"),
            "target_parameters": bool(getattr(cfg, "target_parameters", None)),
        }
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise UserError(f"adapter checkpoint {path!r} uses LoRA features this sampler does not serve: {bad}",
                            field="adapter_path")
        return cfg

    def _read_weights(self, path: str) -> dict[str, Any]:
        from peft.utils import load_peft_weights

        try:
            return load_peft_weights(path, device="cpu")
        except Exception as e:  # noqa: BLE001
            raise UserError(f"adapter checkpoint {path!r} has unreadable weights: {type(e).__name__}: {e}",
                            field="adapter_path") from e

    @staticmethod
    def _pattern(patterns: dict | None, name: str, default):
        if patterns:
            for key, value in patterns.items():
                if re.match(rf"(.*\.)?({key})$", name):
                    return value
        return default

    def _linear_module_names(self) -> set[str]:
        torch = _lazy_torch()
        names = set(self._wrappers)
        for name, mod in self.model.named_modules():
            if type(mod) is torch.nn.Linear and name.rpartition(".")[0] not in self._wrappers:
                names.add(name)
        return names

    @staticmethod
    def _expected_targets(cfg, linear_names: set[str]) -> set[str] | None:
        """The linear layers the config targets, or None when that cannot be known from the config alone."""
        tm = getattr(cfg, "target_modules", None)
        if not tm or tm == "all-linear":
            return None
        try:
            from peft.tuners.tuners_utils import check_target_module_exists
        except ImportError:  # pragma: no cover - older peft
            return None
        out = set()
        for name in linear_names:
            hit = check_target_module_exists(cfg, name)
            if hit and type(hit).__name__ != "_ExcludedModule":
                out.add(name)
        return out

    def _base_linear(self, name: str):
        w = self._wrappers.get(name)
        return w.base if w is not None else self.model.get_submodule(name)

    def _wrap(self, name: str):
        w = self._wrappers.get(name)
        if w is not None:
            return w
        base = self.model.get_submodule(name)
        w = self._cls(base, self.ctx, self.num_slots)
        parent_name, _, child = name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        setattr(parent, child, w)
        self._wrappers[name] = w
        return w
