"""Per-projection LoRA on megatron's fused, tensor-parallel linear layers, many adapters on one model.

Why per projection: megatron fuses q/k/v into ``linear_qkv`` and gate/up into ``linear_fc1``. A LoRA on the
fused layer (one A for q, k and v) is not the PEFT layout that the transformers backend, stock peft and vLLM
use, so an adapter trained here could not be loaded there. Each HF projection (``q_proj`` … ``lm_head``) gets
its own A and B, and their outputs are scattered into the fused layer's output layout.

Tensor parallelism, per kind of layer (x is the layer input, r the LoRA rank):

- **column-parallel** (``linear_qkv``, ``linear_fc1``, ``output_layer``): the input is replicated and the
  output is split by rows. A ``[r, in]`` is replicated; B ``[out/tp, r]`` holds this rank's rows. The LoRA
  input goes through megatron's copy-to-TP-region (identity forward, all-reduce of the input gradient
  backward), as the base layer's does. Each rank's gradient of the replicated A only covers its own rows of
  B, so those gradients are summed over the TP group before a step (:func:`replicated_a_gradients`).
- **row-parallel** (``linear_proj``, ``linear_fc2``): the input is split by columns and the output
  all-reduced. A ``[r, in/tp]`` holds this rank's columns; ``A x`` is all-reduced over TP (reduce-from-TP
  region) before the replicated B ``[out, r]``, whose gradient is then the same on every rank.

Every tensor is a slice of the adapter's full (HF-shaped) tensor along one dimension (``Shard``), so the
export to PEFT keys is a concatenation over TP ranks, and an adapter initialised from a seed is the same
whatever the layout: A is drawn for the full shape from a generator seeded by the run's seed and the
tensor's PEFT key (kaiming-uniform, as peft draws it), then sliced; B starts at zero.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class Shard:
    """How a local tensor is cut from its full one: along ``dim``, or replicated (``dim`` None)."""

    dim: int | None
    full_shape: tuple[int, ...]


@dataclass
class Projection:
    """One HF projection inside a megatron layer: its PEFT module path and local output size."""

    hf_module: str  # e.g. "model.layers.3.self_attn.q_proj" or "lm_head"
    group: str  # train_attn | train_mlp | train_unembed
    in_features: int  # full
    out_features: int  # full


@dataclass
class AdapterWeights:
    """One run's LoRA tensors on one layer: per projection (A, B) local tensors, plus dropout and scale."""

    a: list[torch.Tensor]
    b: list[torch.Tensor]
    scale: float
    dropout: float


class LoraLayer(torch.nn.Module):
    """Wraps one megatron linear (``base``); adds the active run's LoRA output to the base's output."""

    def __init__(self, base: torch.nn.Module, kind: str, projections: list[Projection],
                 compose: Callable[[list[torch.Tensor]], torch.Tensor], tp_rank: int, tp_size: int) -> None:
        torch.nn.Module.__init__(self)
        if kind not in ("column", "row"):
            raise ValueError(f"unknown parallel kind {kind!r}")
        self.base = base
        self.kind = kind
        self.projections = projections
        self.compose = compose
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.adapters: dict[str, AdapterWeights] = {}
        self.active: str | None = None

    def __getattr__(self, name: str):
        """Everything else is the wrapped layer's (megatron reads e.g. ``output_layer.weight`` of a tied model)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self._modules.get("base")
            if base is None:
                raise
            return getattr(base, name)

    # the megatron linear's interface: forward returns (output, bias)
    def forward(self, x: torch.Tensor, *args, **kwargs):
        out, bias = self.base(x, *args, **kwargs)
        adapter = self.adapters.get(self.active) if self.active is not None else None
        if adapter is None:
            return out, bias
        return out + self._delta(x, adapter).to(out.dtype), bias

    def _delta(self, x: torch.Tensor, w: AdapterWeights) -> torch.Tensor:
        from megatron.core.tensor_parallel.mappings import (
            copy_to_tensor_model_parallel_region,
            reduce_from_tensor_model_parallel_region,
        )

        if self.kind == "column":
            x = copy_to_tensor_model_parallel_region(x)
            x = torch.nn.functional.dropout(x, w.dropout, self.training) if w.dropout > 0 else x
            return self.compose([(x @ a.t()) @ b.t() * w.scale for a, b in zip(w.a, w.b)])
        x = torch.nn.functional.dropout(x, w.dropout, self.training) if w.dropout > 0 else x
        (a,), (b,) = w.a, w.b
        return reduce_from_tensor_model_parallel_region(x @ a.t()) @ b.t() * w.scale

    # sharding of this layer's tensors
    def shards(self, proj: Projection, rank: int) -> tuple[Shard, Shard]:
        """(A, B) shards of one projection: column layers split B's rows, row layers A's columns."""
        a_full, b_full = (rank, proj.in_features), (proj.out_features, rank)
        if self.kind == "column":
            return Shard(None, a_full), Shard(0, b_full)
        return Shard(1, a_full), Shard(None, b_full)

    def local(self, full: torch.Tensor, shard: Shard) -> torch.Tensor:
        if shard.dim is None or self.tp_size == 1:
            return full
        return full.chunk(self.tp_size, dim=shard.dim)[self.tp_rank]


def peft_keys(proj: Projection) -> tuple[str, str]:
    """The PEFT checkpoint keys of a projection's A and B (adapter name removed, as peft saves them)."""
    base = f"{PEFT_PREFIX}{proj.hf_module}"
    return f"{base}.lora_A.weight", f"{base}.lora_B.weight"


def initial_a(key: str, shape: tuple[int, int], seed: int) -> torch.Tensor:
    """A's full initial value: kaiming-uniform(a=sqrt(5)) like peft, from a stream of (seed, key) only."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    bound = 1.0 / math.sqrt(shape[1])  # kaiming_uniform_ with a=sqrt(5) gives U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    return (torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1).mul_(bound).to(torch.float32)


@dataclass
class LoraParam:
    """One local LoRA tensor of a run and where it belongs in the full PEFT tensor."""

    key: str
    tensor: torch.Tensor
    shard: Shard
    replicated_in_tp: bool  # same on every TP rank (its gradient needs a TP sum only if column-parallel A)
    tp_partial_grad: bool  # its gradient on each rank is partial (column-parallel A): sum over TP


@dataclass
class LoraModel:
    """The LoRA layers of one model stage, and the runs' tensors in them."""

    layers: list[LoraLayer] = field(default_factory=list)

    def attach(self, name: str, rank: int, alpha: float, dropout: float, groups: set[str], seed: int,
               device: torch.device, dtype: torch.dtype = torch.float32) -> dict[str, LoraParam]:
        """Create run ``name``'s adapter on every layer whose group it trains; its params by PEFT key."""
        params: dict[str, LoraParam] = {}
        for layer in self.layers:
            chosen = [p for p in layer.projections if p.group in groups]
            if not chosen:
                continue
            if len(chosen) != len(layer.projections):  # a fused layer trains all its projections or none
                raise ValueError(f"projections of one fused layer belong to different groups: {layer.projections}")
            a_list, b_list = [], []
            for proj in chosen:
                a_key, b_key = peft_keys(proj)
                a_shard, b_shard = layer.shards(proj, rank)
                a = layer.local(initial_a(a_key, a_shard.full_shape, seed), a_shard).to(device, dtype).clone()
                b = torch.zeros(layer.local(torch.empty(b_shard.full_shape, device="meta"), b_shard).shape,
                                device=device, dtype=dtype)
                a_list.append(a)
                b_list.append(b)
                column = layer.kind == "column"
                params[a_key] = LoraParam(a_key, a, a_shard, replicated_in_tp=column, tp_partial_grad=column)
                params[b_key] = LoraParam(b_key, b, b_shard, replicated_in_tp=not column, tp_partial_grad=False)
            layer.adapters[name] = AdapterWeights(a_list, b_list, scale=alpha / rank, dropout=dropout)
        return params

    def detach(self, name: str) -> None:
        for layer in self.layers:
            layer.adapters.pop(name, None)
            if layer.active == name:
                layer.active = None

    def activate(self, name: str | None) -> None:
        for layer in self.layers:
            layer.active = name

    def train(self, mode: bool) -> None:
        for layer in self.layers:
            layer.train(mode)

    def targets(self, groups: set[str]) -> list[str]:
        """HF module names (``q_proj``…) this stage trains for ``groups``, for adapter_config.json."""
        return sorted({p.hf_module.rsplit(".", 1)[-1] for layer in self.layers for p in layer.projections
                       if p.group in groups})


def replicated_a_gradients(params: Iterator[LoraParam]) -> list[torch.Tensor]:
    """The gradients that are partial on each TP rank (column-parallel A) and must be summed over TP."""
    return [p.tensor.grad for p in params if p.tp_partial_grad and p.tensor.grad is not None]


# ---------------------------------------------------------------------------------- wrapping a GPTModel


def _qkv_compose(nq_local: int, ng_local: int, head_dim: int) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    """q, k, v deltas into megatron's local ``linear_qkv`` rows: per query group, its q heads, then k, then v."""
    per_group = nq_local // ng_local

    def compose(parts: list[torch.Tensor]) -> torch.Tensor:
        q, k, v = parts
        lead = q.shape[:-1]
        q = q.reshape(*lead, ng_local, per_group * head_dim)
        k = k.reshape(*lead, ng_local, head_dim)
        v = v.reshape(*lead, ng_local, head_dim)
        return torch.cat([q, k, v], dim=-1).reshape(*lead, ng_local * (per_group + 2) * head_dim)

    return compose


def _concat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def wrap_model(model: torch.nn.Module, hf_config, tp_rank: int, tp_size: int) -> LoraModel:
    """Put a :class:`LoraLayer` around every LoRA-able linear of this stage of a megatron ``GPTModel``."""
    hidden = hf_config.hidden_size
    nq, ng = hf_config.num_attention_heads, hf_config.num_key_value_heads
    head_dim = getattr(hf_config, "head_dim", None) or hidden // nq
    ffn, vocab = hf_config.intermediate_size, hf_config.vocab_size
    lora = LoraModel()

    def wrap(parent: torch.nn.Module, attr: str, kind: str, projections: list[Projection], compose) -> None:
        layer = LoraLayer(getattr(parent, attr), kind, projections, compose, tp_rank, tp_size)
        setattr(parent, attr, layer)
        lora.layers.append(layer)

    decoder = getattr(model, "decoder", None)
    for block in (decoder.layers if decoder is not None else []):
        i = block.layer_number - 1  # megatron numbers layers globally from 1
        attn, mlp = block.self_attention, block.mlp
        at, mp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        wrap(attn, "linear_qkv", "column", [
            Projection(f"{at}.q_proj", "train_attn", hidden, nq * head_dim),
            Projection(f"{at}.k_proj", "train_attn", hidden, ng * head_dim),
            Projection(f"{at}.v_proj", "train_attn", hidden, ng * head_dim),
        ], _qkv_compose(nq // tp_size, ng // tp_size, head_dim))
        wrap(attn, "linear_proj", "row", [Projection(f"{at}.o_proj", "train_attn", nq * head_dim, hidden)], _concat)
        wrap(mlp, "linear_fc1", "column", [
            Projection(f"{mp}.gate_proj", "train_mlp", hidden, ffn),
            Projection(f"{mp}.up_proj", "train_mlp", hidden, ffn),
        ], _concat)
        wrap(mlp, "linear_fc2", "row", [Projection(f"{mp}.down_proj", "train_mlp", ffn, hidden)], _concat)
    if getattr(model, "post_process", False) and getattr(model, "output_layer", None) is not None:
        wrap(model, "output_layer", "column", [Projection("lm_head", "train_unembed", hidden, vocab)], _concat)
    return lora
