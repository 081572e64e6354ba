"""HF causal LMs (Qwen2, Llama, Mistral without sliding window) <-> a megatron-core ``GPTModel``.

``transformer_config`` / ``build_model`` turn an HF config into this rank's pipeline stage of a ``GPTModel``
(megatron-core 0.16.1 local layer spec: no Transformer Engine, no fused kernels); ``load_hf_weights`` and
``export_hf_weights`` move weights between the full HF state dict and the tensor/pipeline shards;
``target_logprobs`` reads token logprobs off vocab-parallel logits.

Megatron's layout of one stage, TP shards in brackets:

- ``embedding.word_embeddings.weight`` (first stage): ``model.embed_tokens.weight`` [vocab rows split];
- ``decoder.layers.{i}`` (local ``i``; stage ``s`` holds HF layers ``s*L/pp .. (s+1)*L/pp - 1``):
  ``input_layernorm.weight``; ``self_attention.linear_qkv.{weight,bias}`` = q/k/v fused per query group
  [groups split, see :func:`merge_qkv`]; ``self_attention.linear_proj.weight`` = ``o_proj`` [columns split];
  ``pre_mlp_layernorm.weight`` = ``post_attention_layernorm``; ``mlp.linear_fc1.weight`` = [gate; up] of this
  rank's rows [rows split, see :func:`merge_gate_up`]; ``mlp.linear_fc2.weight`` = ``down_proj`` [columns split];
- ``decoder.final_layernorm.weight`` = ``model.norm.weight`` and ``output_layer.weight`` = ``lm_head.weight``
  [vocab rows split] (last stage). With tied embeddings and one stage the output layer reuses the embedding;
  with several stages the last one keeps its own copy of the embedding.

Vocabulary: nothing is padded. Megatron splits the vocab evenly over TP ranks, and padded rows would add
entries to the softmax, changing every logprob; so the HF vocab size must be divisible by ``tp_size``.

Positions: megatron's rotary embedding always uses positions ``0..T-1`` (``position_ids`` is ignored for
RoPE), and attention is causal. Right-padded batches are therefore exact on their real tokens; left padding
is not supported.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer import TransformerConfig

SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "Qwen2ForCausalLM": "qwen2",
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",  # Llama's layout; accepted only without a sliding window
}


class UnsupportedModel(ValueError):
    """The HF model (its architecture or a config attribute) or the parallel layout cannot be built here."""


# ----------------------------------------------------------------------------------------- config


def architecture(hf_config: Any) -> str:
    """The supported HF architecture of ``hf_config`` (from ``architectures``, else ``model_type``)."""
    archs = list(getattr(hf_config, "architectures", None) or [])
    if archs:
        if len(archs) != 1 or archs[0] not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModel(
                f"architectures={archs} is not supported; supported: {sorted(SUPPORTED_ARCHITECTURES)}")
        return archs[0]
    model_type = getattr(hf_config, "model_type", None)
    for arch, mt in SUPPORTED_ARCHITECTURES.items():
        if mt == model_type:
            return arch
    raise UnsupportedModel(f"model_type={model_type!r} is not supported; supported: {sorted(SUPPORTED_ARCHITECTURES)}")


def head_dim(hf_config: Any) -> int:
    return int(getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads)


def rope_theta(hf_config: Any) -> float:
    """RoPE base: ``rope_parameters["rope_theta"]`` (transformers 5) or ``rope_theta`` (older)."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    theta = params.get("rope_theta") if isinstance(params, Mapping) else None
    theta = theta if theta is not None else getattr(hf_config, "rope_theta", None)
    if theta is None:
        raise UnsupportedModel(f"no rope_theta in rope_parameters={params!r} nor in rope_theta")
    return float(theta)


def _has_qkv_bias(hf_config: Any) -> bool:
    return architecture(hf_config) == "Qwen2ForCausalLM"  # Qwen2: q/k/v biased, o_proj not


def _check_supported(hf_config: Any) -> None:
    arch = architecture(hf_config)
    act = getattr(hf_config, "hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModel(f"hidden_act={act!r} is not supported (only 'silu')")
    for attr in ("rope_parameters", "rope_scaling"):
        rope = getattr(hf_config, attr, None)
        if isinstance(rope, Mapping):
            kind = rope.get("rope_type", rope.get("type"))
            if kind not in (None, "default"):
                raise UnsupportedModel(f"{attr} with rope_type={kind!r} is not supported (only the default RoPE)")
            if rope.get("partial_rotary_factor", 1.0) not in (None, 1.0):
                raise UnsupportedModel(f"{attr}.partial_rotary_factor={rope['partial_rotary_factor']} is not supported")
        elif rope is not None:
            raise UnsupportedModel(f"{attr}={rope!r} is not supported")
    if getattr(hf_config, "partial_rotary_factor", None) not in (None, 1.0):
        raise UnsupportedModel(f"partial_rotary_factor={hf_config.partial_rotary_factor} is not supported")
    if arch == "Qwen2ForCausalLM" and getattr(hf_config, "use_sliding_window", False):
        raise UnsupportedModel("use_sliding_window=True (sliding-window attention) is not supported")
    if arch != "Qwen2ForCausalLM" and getattr(hf_config, "sliding_window", None) is not None:
        raise UnsupportedModel(f"sliding_window={hf_config.sliding_window} (sliding-window attention) is not supported")
    layer_types = getattr(hf_config, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        raise UnsupportedModel(f"layer_types={sorted(set(layer_types))} is not supported (only full_attention)")
    if arch != "Qwen2ForCausalLM" and getattr(hf_config, "attention_bias", False):
        raise UnsupportedModel("attention_bias=True is not supported (it puts a bias on o_proj)")
    if getattr(hf_config, "mlp_bias", False):
        raise UnsupportedModel("mlp_bias=True is not supported")
    for attr in ("num_experts", "num_local_experts", "n_routed_experts"):
        if getattr(hf_config, attr, None):
            raise UnsupportedModel(f"{attr}={getattr(hf_config, attr)} (mixture of experts) is not supported")
    for attr in ("qk_norm", "use_qk_norm"):
        if getattr(hf_config, attr, False):
            raise UnsupportedModel(f"{attr}=True is not supported")


def _check_layout(hf_config: Any, tp_size: int, pp_size: int) -> None:
    if tp_size < 1 or pp_size < 1:
        raise UnsupportedModel(f"tp_size={tp_size} and pp_size={pp_size} must be >= 1")
    for attr, size, name in (
        ("num_attention_heads", tp_size, "tp_size"),
        ("num_key_value_heads", tp_size, "tp_size"),
        ("intermediate_size", tp_size, "tp_size"),
        ("vocab_size", tp_size, "tp_size"),  # no vocab padding, see the module docstring
        ("num_hidden_layers", pp_size, "pp_size"),
    ):
        value = int(getattr(hf_config, attr))
        if value % size:
            raise UnsupportedModel(f"{attr}={value} is not divisible by {name}={size}")


def transformer_config(hf_config: Any, *, tp_size: int, pp_size: int,
                       params_dtype: torch.dtype = torch.float32) -> TransformerConfig:
    """Megatron's ``TransformerConfig`` for ``hf_config`` at this TP x PP layout.

    Parameters are allocated on CPU and left uninitialised (``perform_initialization=False``): every one of
    them is overwritten by :func:`load_hf_weights`. No fused kernels, no dropout, no sequence parallelism.
    Raises :class:`UnsupportedModel` for an unsupported model, or when heads, KV heads, FFN size or vocab are
    not divisible by ``tp_size`` or the layer count by ``pp_size``.
    """
    from megatron.core.transformer import TransformerConfig

    _check_supported(hf_config)
    _check_layout(hf_config, tp_size, pp_size)
    return TransformerConfig(
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        num_attention_heads=hf_config.num_attention_heads,
        num_query_groups=hf_config.num_key_value_heads,
        kv_channels=head_dim(hf_config),
        ffn_hidden_size=hf_config.intermediate_size,
        normalization="RMSNorm",
        layernorm_epsilon=float(hf_config.rms_norm_eps),
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=_has_qkv_bias(hf_config),
        init_method_std=float(getattr(hf_config, "initializer_range", 0.02)),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        use_cpu_initialization=True,
        perform_initialization=False,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        tensor_model_parallel_size=tp_size,
        pipeline_model_parallel_size=pp_size,
        sequence_parallel=False,
    )


def build_model(hf_config: Any, *, params_dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu") -> GPTModel:
    """This rank's pipeline stage of ``hf_config`` under the current ``megatron.core.parallel_state``.

    Frozen (``requires_grad`` False) and in eval mode; weights are garbage until :func:`load_hf_weights`.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    cfg = transformer_config(hf_config, tp_size=ps.get_tensor_model_parallel_world_size(),
                             pp_size=ps.get_pipeline_model_parallel_world_size(), params_dtype=params_dtype)
    model = GPTModel(
        cfg,
        get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=int(hf_config.vocab_size),
        max_sequence_length=int(getattr(hf_config, "max_position_embeddings", 0) or 4096),
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        parallel_output=True,  # logits stay split over the vocab: see target_logprobs
        share_embeddings_and_output_weights=bool(getattr(hf_config, "tie_word_embeddings", False)),
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=rope_theta(hf_config),
    )
    model.to(device)
    model.requires_grad_(False)
    model.eval()
    return model


# ----------------------------------------------------------------------------- sharding helpers
# They work on local TP shards along any dimension ``dim`` (0 for weights and biases, -1 for activations),
# so the LoRA code can use them on layer outputs as well as on weights.


def shard(t: torch.Tensor, tp_rank: int, tp_size: int, dim: int = 0) -> torch.Tensor:
    """This rank's contiguous slice of ``t`` along ``dim`` (which must divide evenly)."""
    if t.shape[dim] % tp_size:
        raise ValueError(f"size {t.shape[dim]} of dim {dim} is not divisible by tp_size={tp_size}")
    return t.chunk(tp_size, dim=dim)[tp_rank]


def shard_rows(t: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """Column-parallel layers (and the vocab-parallel embedding) split weight rows (output features)."""
    return shard(t, tp_rank, tp_size, 0)


def shard_cols(t: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """Row-parallel layers (``linear_proj``, ``linear_fc2``) split weight columns (input features)."""
    return shard(t, tp_rank, tp_size, 1)


def _qkv_sizes(hf_config: Any, tp_size: int) -> tuple[int, int, int]:
    """(local query groups, q rows per group, head dim) of one TP rank."""
    hd, nq, ng = head_dim(hf_config), hf_config.num_attention_heads, hf_config.num_key_value_heads
    return ng // tp_size, (nq // ng) * hd, hd


def split_qkv(rows: torch.Tensor, hf_config: Any, tp_size: int, dim: int = 0) -> tuple[torch.Tensor, ...]:
    """Split this rank's ``linear_qkv`` rows (along ``dim``) into its local (q, k, v) HF rows.

    Megatron orders them per query group g: [q heads of g (heads_per_group * head_dim), k of g (head_dim),
    v of g (head_dim)]; a TP rank holds ``num_key_value_heads / tp_size`` whole groups. The local q rows are
    then HF's ``shard_rows(q_proj, tp_rank, tp_size)``, and likewise for k and v.
    """
    groups, q_size, hd = _qkv_sizes(hf_config, tp_size)
    dim = dim % rows.dim()
    per_group = rows.unflatten(dim, (groups, q_size + 2 * hd))
    q, k, v = per_group.split([q_size, hd, hd], dim=dim + 1)
    return q.flatten(dim, dim + 1), k.flatten(dim, dim + 1), v.flatten(dim, dim + 1)


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hf_config: Any, tp_size: int,
              dim: int = 0) -> torch.Tensor:
    """Inverse of :func:`split_qkv`: this rank's q, k, v rows into its ``linear_qkv`` rows."""
    groups = _qkv_sizes(hf_config, tp_size)[0]
    dim = dim % q.dim()
    parts = [t.unflatten(dim, (groups, -1)) for t in (q, k, v)]
    return torch.cat(parts, dim=dim + 1).flatten(dim, dim + 1)


def split_gate_up(rows: torch.Tensor, dim: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's ``linear_fc1`` rows are [its gate_proj rows; its up_proj rows]."""
    gate, up = rows.chunk(2, dim=dim)
    return gate, up


def merge_gate_up(gate: torch.Tensor, up: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Inverse of :func:`split_gate_up`."""
    return torch.cat([gate, up], dim=dim)


def hf_layer_index(pp_rank: int, local_index: int, num_layers: int, pp_size: int) -> int:
    """The HF layer index of local decoder layer ``local_index`` of pipeline stage ``pp_rank`` (even split)."""
    per_stage = num_layers // pp_size
    if num_layers % pp_size or not (0 <= local_index < per_stage) or not (0 <= pp_rank < pp_size):
        raise ValueError(f"no local layer {local_index} on stage {pp_rank} of {num_layers} layers over {pp_size}")
    return pp_rank * per_stage + local_index


# ------------------------------------------------------------------------------ weight mapping


@dataclass(frozen=True)
class _Param:
    """One megatron parameter of this stage and the HF tensors it is made of."""

    name: str  # megatron name, local layer numbering
    hf: tuple[str, ...]
    kind: str  # replicated | rows | cols | qkv | gate_up
    export: bool = True  # False: a copy whose HF tensor another stage exports (tied output layer)


def _hf_shapes(hf_config: Any) -> dict[str, tuple[int, ...]]:
    """Every HF tensor of the model with its full shape, in HF's state-dict order (tied ``lm_head`` left out)."""
    h, f, v, hd = hf_config.hidden_size, hf_config.intermediate_size, hf_config.vocab_size, head_dim(hf_config)
    nq, ng = hf_config.num_attention_heads, hf_config.num_key_value_heads
    bias = _has_qkv_bias(hf_config)
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for i in range(hf_config.num_hidden_layers):
        p = f"model.layers.{i}."
        for proj, rows in (("q_proj", nq * hd), ("k_proj", ng * hd), ("v_proj", ng * hd)):
            shapes[f"{p}self_attn.{proj}.weight"] = (rows, h)
            if bias:
                shapes[f"{p}self_attn.{proj}.bias"] = (rows,)
        shapes[f"{p}self_attn.o_proj.weight"] = (h, nq * hd)
        shapes[f"{p}mlp.gate_proj.weight"] = (f, h)
        shapes[f"{p}mlp.up_proj.weight"] = (f, h)
        shapes[f"{p}mlp.down_proj.weight"] = (h, f)
        shapes[f"{p}input_layernorm.weight"] = (h,)
        shapes[f"{p}post_attention_layernorm.weight"] = (h,)
    shapes["model.norm.weight"] = (h,)
    if not _tied(hf_config):
        shapes["lm_head.weight"] = (v, h)
    return shapes


def _tied(hf_config: Any) -> bool:
    return bool(getattr(hf_config, "tie_word_embeddings", False))


def _stage_params(hf_config: Any, pp_rank: int, pp_size: int) -> list[_Param]:
    """The parameters of pipeline stage ``pp_rank``, in HF order."""
    first, last = pp_rank == 0, pp_rank == pp_size - 1
    params: list[_Param] = []
    if first:
        params.append(_Param("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "rows"))
    num_layers = hf_config.num_hidden_layers
    for local in range(num_layers // pp_size):
        m, p = f"decoder.layers.{local}.", f"model.layers.{hf_layer_index(pp_rank, local, num_layers, pp_size)}."
        attn = f"{p}self_attn."
        params.append(_Param(f"{m}self_attention.linear_qkv.weight",
                             tuple(f"{attn}{x}_proj.weight" for x in "qkv"), "qkv"))
        if _has_qkv_bias(hf_config):
            params.append(_Param(f"{m}self_attention.linear_qkv.bias",
                                 tuple(f"{attn}{x}_proj.bias" for x in "qkv"), "qkv"))
        params += [
            _Param(f"{m}self_attention.linear_proj.weight", (f"{attn}o_proj.weight",), "cols"),
            _Param(f"{m}mlp.linear_fc1.weight", (f"{p}mlp.gate_proj.weight", f"{p}mlp.up_proj.weight"), "gate_up"),
            _Param(f"{m}mlp.linear_fc2.weight", (f"{p}mlp.down_proj.weight",), "cols"),
            _Param(f"{m}input_layernorm.weight", (f"{p}input_layernorm.weight",), "replicated"),
            _Param(f"{m}pre_mlp_layernorm.weight", (f"{p}post_attention_layernorm.weight",), "replicated"),
        ]
    if last:
        params.append(_Param("decoder.final_layernorm.weight", ("model.norm.weight",), "replicated"))
        if not _tied(hf_config):
            params.append(_Param("output_layer.weight", ("lm_head.weight",), "rows"))
        elif not first:  # tied over several stages: the last stage's own copy of the embedding
            params.append(_Param("output_layer.weight", ("model.embed_tokens.weight",), "rows", export=False))
    return params


def _to_local(p: _Param, full: Sequence[torch.Tensor], hf_config: Any, tp_rank: int, tp_size: int) -> torch.Tensor:
    if p.kind == "replicated":
        return full[0]
    if p.kind == "rows":
        return shard_rows(full[0], tp_rank, tp_size)
    if p.kind == "cols":
        return shard_cols(full[0], tp_rank, tp_size)
    local = [shard_rows(t, tp_rank, tp_size) for t in full]
    if p.kind == "qkv":
        return merge_qkv(*local, hf_config, tp_size)
    return merge_gate_up(*local)


def _to_full(p: _Param, shards: Sequence[torch.Tensor], hf_config: Any, tp_size: int) -> list[torch.Tensor]:
    """The HF tensors of ``p`` from its local tensors on every TP rank (in rank order)."""
    if p.kind == "replicated":
        return [shards[0]]
    if p.kind in ("rows", "cols"):
        return [torch.cat(list(shards), dim=0 if p.kind == "rows" else 1)]
    parts = [split_qkv(s, hf_config, tp_size) if p.kind == "qkv" else split_gate_up(s) for s in shards]
    return [torch.cat([part[j] for part in parts], dim=0) for j in range(len(p.hf))]


def _named_params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    # A LoRA wrapper keeps the megatron layer as ``.base``: the names are the unwrapped ones.
    return {name.replace(".base.", "."): p for name, p in model.named_parameters()}


def _layout() -> tuple[int, int, int, int]:
    from megatron.core import parallel_state as ps

    return (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size(),
            ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size())


def _check_hf_state(hf_state: Mapping[str, torch.Tensor], hf_config: Any) -> None:
    shapes = _hf_shapes(hf_config)
    optional = {"lm_head.weight"} if _tied(hf_config) else set()
    keys = {k for k in hf_state if not k.endswith("rotary_emb.inv_freq")}  # older checkpoints saved it
    missing, unexpected = sorted(set(shapes) - keys), sorted(keys - set(shapes) - optional)
    if missing or unexpected:
        raise ValueError(f"HF state dict does not match the config: missing keys {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}, unexpected keys {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}")
    wrong = [f"{k}: {tuple(hf_state[k].shape)} != {s}" for k, s in shapes.items() if tuple(hf_state[k].shape) != s]
    if wrong:
        raise ValueError(f"HF state dict shapes do not match the config: {wrong[:8]}")
    if "lm_head.weight" in optional & keys and not torch.equal(hf_state["lm_head.weight"],
                                                               hf_state["model.embed_tokens.weight"]):
        raise ValueError("tie_word_embeddings=True but lm_head.weight differs from model.embed_tokens.weight")


def load_hf_weights(model: torch.nn.Module, hf_state: Mapping[str, torch.Tensor], hf_config: Any) -> None:
    """Copy this rank's shard of the full HF state dict ``hf_state`` into ``model`` (built by :func:`build_model`).

    The TP and PP ranks come from the current ``megatron.core.parallel_state``. Raises ``ValueError`` on
    missing or unexpected HF keys, or on shapes that do not match ``hf_config``; ``RuntimeError`` if a model
    parameter would be left unset.
    """
    _check_hf_state(hf_state, hf_config)
    tp_rank, tp_size, pp_rank, pp_size = _layout()
    params = _named_params(model)
    todo = _stage_params(hf_config, pp_rank, pp_size)
    unset = sorted(set(params) - {p.name for p in todo})
    absent = sorted({p.name for p in todo} - set(params))
    if unset or absent:
        raise RuntimeError(f"model does not have the expected layout: unmapped parameters {unset}, "
                           f"missing parameters {absent}")
    with torch.no_grad():
        for p in todo:
            local = _to_local(p, [hf_state[k] for k in p.hf], hf_config, tp_rank, tp_size)
            target = params[p.name]
            if local.shape != target.shape:
                raise ValueError(f"{p.name}: shard of {list(p.hf)} has shape {tuple(local.shape)}, "
                                 f"the model's is {tuple(target.shape)}")
            target.copy_(local)


def export_hf_weights(model: torch.nn.Module, hf_config: Any) -> dict[str, torch.Tensor] | None:
    """The full HF state dict (CPU tensors), on the rank that is TP rank 0 and PP rank 0; ``None`` elsewhere.

    Collective: every TP and PP rank of this model replica must call it. TP shards are all-gathered on the
    model's device (so gloo and nccl both work), then every stage's TP rank 0 sends its tensors to stage 0.
    With tied embeddings ``lm_head.weight`` is the same tensor as ``model.embed_tokens.weight``, as in HF's
    own ``state_dict()``.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    tp_rank, tp_size, pp_rank, pp_size = _layout()
    params = _named_params(model)
    full: dict[str, torch.Tensor] = {}
    for p in _stage_params(hf_config, pp_rank, pp_size):
        if not p.export:
            continue
        local = params[p.name].detach().contiguous()
        shards = [local]
        if tp_size > 1:
            shards = [torch.empty_like(local) for _ in range(tp_size)]
            dist.all_gather(shards, local, group=ps.get_tensor_model_parallel_group())
        if tp_rank == 0:
            full.update(zip(p.hf, _to_full(p, shards, hf_config, tp_size)))
    if tp_rank != 0:
        return None
    if pp_size > 1:
        some = next(iter(params.values()))
        group = ps.get_pipeline_model_parallel_group()
        ranks = dist.get_process_group_ranks(group)
        for stage in range(1, pp_size):  # the same key order on the sender and on stage 0
            for p in _stage_params(hf_config, stage, pp_size):
                for key in p.hf if p.export else ():
                    if pp_rank == stage:
                        dist.send(full.pop(key).contiguous(), dst=ranks[0], group=group)
                    elif pp_rank == 0:
                        full[key] = torch.empty(_hf_shapes(hf_config)[key], dtype=some.dtype, device=some.device)
                        dist.recv(full[key], src=ranks[stage], group=group)
        if pp_rank != 0:
            return None
    out = {k: full[k].cpu() for k in _hf_shapes(hf_config)}
    if _tied(hf_config):
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


# ------------------------------------------------------------------------------------ logprobs


def target_logprobs(logits_local_vocab: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) per position, fp32 ``[B, T]``, from this TP rank's vocab slice of the logits ``[B, T, V/tp]``.

    Correct at any TP size (the softmax normaliser is reduced over the TP group) and differentiable. Every TP
    rank must call it. Careful: megatron's ``vocab_parallel_cross_entropy`` works in place, so an fp32
    ``logits_local_vocab`` is overwritten (pass a clone if the logits are needed afterwards).
    """
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    return -vocab_parallel_cross_entropy(logits_local_vocab.float(), targets)
