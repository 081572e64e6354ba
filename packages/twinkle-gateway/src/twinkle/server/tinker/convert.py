"""Tinker request bodies → our wire types, and stored results → what the client expects.

Pure functions (no I/O): every check raises ``UserError`` naming the field, so the service can report it
before anything runs.
"""

from __future__ import annotations

import math
import secrets
from datetime import datetime, timezone
from typing import Any

import msgspec

from twinkle.common.limits import (DEFAULT_LIMITS, RequestLimits, check_adam, check_lora, check_sampling,
                                   check_tensor_shape)
from twinkle.common.wire import (
    AdamParams,
    Datum,
    ForwardBackwardInput,
    ForwardBackwardOutput,
    LoraConfig,
    SampleOutput,
    SamplingParams,
    TensorData,
    UserError,
)

from ..core import iso
from ..core.checkpoints import CHECKPOINT_TYPE
from ..core.state import CheckpointRecord, RunRecord
from . import proto
from .proto import ElementBudget
from . import protocol as P

encode_json = msgspec.json.encode
builtins = msgspec.to_builtins


def default_name() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(3)


def str_metadata(md: dict[str, Any] | None) -> dict[str, str] | None:
    """``user_metadata`` as the SDK types it (string values)."""
    if not md:
        return None
    return {str(k): v if isinstance(v, str) else msgspec.json.encode(v).decode() for k, v in md.items()}


def lora_config(cfg: P.LoraConfigIn | None, limits: RequestLimits = DEFAULT_LIMITS) -> LoraConfig:
    cfg = cfg or P.LoraConfigIn()
    flags = {k: (True if getattr(cfg, k) is None else getattr(cfg, k)) for k in ("train_attn", "train_mlp",
                                                                               "train_unembed")}
    lora = LoraConfig(rank=32 if cfg.rank is None else cfg.rank, seed=cfg.seed, **flags)
    return check_lora(lora, "lora_config", limits=limits)


def check_optimizer(cfg: P.OptimizerConfigIn | None) -> None:
    if cfg is not None and cfg.type not in (None, "adamw", "adam"):
        raise UserError(f"optimizer {cfg.type!r} is not supported; this server trains with adamw",
                        field="optimizer_config.type")


def adam_params(req: P.OptimStepRequest) -> AdamParams:
    given = [(name, p) for name, p in (("adam_params", req.adam_params), ("optimizer_params", req.optimizer_params),
                                       ("optim_params", req.optim_params)) if p is not None]
    if len(given) != 1:
        raise UserError("give exactly one of adam_params, optimizer_params and optim_params", field="adam_params")
    field, p = given[0]
    if p.type not in (None, "adam", "adamw"):
        raise UserError(f"optimizer {p.type!r} is not supported; this server trains with adamw",
                        field=f"{field}.type")
    defaults = AdamParams()
    values = {k: getattr(defaults, k) if getattr(p, k) is None else float(getattr(p, k))
              for k in ("learning_rate", "beta1", "beta2", "eps", "weight_decay", "grad_clip_norm")}
    return check_adam(AdamParams(**values), field)


def input_tokens(mi: P.ModelInputIn, field: str) -> list[int]:
    tokens: list[int] = []
    for j, chunk in enumerate(mi.chunks):
        kind = chunk.type or "encoded_text"
        if kind != "encoded_text":
            raise UserError(f"{kind} chunks are not supported; this server's models take text tokens only",
                            field=f"{field}.chunks[{j}]")
        if chunk.tokens is None:
            raise UserError("an encoded_text chunk needs tokens", field=f"{field}.chunks[{j}].tokens")
        tokens.extend(chunk.tokens)
    return tokens


def tensor_from_json(td: P.TensorDataIn, where: str, budget: ElementBudget) -> TensorData:
    budget.take(td.shape, where, data_len=len(td.data))
    dtype = td.dtype or ("int64" if all(isinstance(x, int) for x in td.data) else "float32")
    if dtype not in ("int64", "float32"):
        raise UserError(f"dtype must be int64 or float32, got {dtype!r}", field=where)
    data: list = [int(x) for x in td.data] if dtype == "int64" else [float(x) for x in td.data]
    if td.sparse_crow_indices is not None or td.sparse_col_indices is not None:
        shape = td.shape or []
        crow, cols = td.sparse_crow_indices or [], td.sparse_col_indices or []
        if (len(shape) != 2 or len(crow) != shape[0] + 1 or len(cols) != len(data) or crow[0] != 0
                or crow[-1] != len(data) or any(a > b for a, b in zip(crow, crow[1:]))):
            raise UserError("inconsistent sparse CSR tensor (shape, crow and col indices)", field=where)
        dense: list = [0 if dtype == "int64" else 0.0] * (shape[0] * shape[1])
        for r in range(shape[0]):
            for k in range(crow[r], crow[r + 1]):
                if not 0 <= cols[k] < shape[1]:
                    raise UserError("sparse CSR column index out of range", field=where)
                dense[r * shape[1] + cols[k]] = data[k]
        return TensorData(data=dense, dtype=dtype, shape=list(shape))
    return TensorData(data=data, dtype=dtype, shape=td.shape)


def input_from_json(fbi: P.ForwardBackwardInputIn, limits: RequestLimits = DEFAULT_LIMITS) -> ForwardBackwardInput:
    """A JSON (pre-0.25 SDK) forward/backward input as our wire type, bounded while it is converted."""
    if len(fbi.data) > limits.max_datums:
        raise UserError(f"{len(fbi.data)} datums; the limit is {limits.max_datums} (max_datums)", field="data")
    budget = ElementBudget(limits)
    data = []
    for i, d in enumerate(fbi.data):
        tokens = input_tokens(d.model_input, f"data[{i}].model_input")
        inputs = {name: tensor_from_json(td, f"data[{i}].loss_fn_inputs.{name}", budget)
                  for name, td in (d.loss_fn_inputs or {}).items()}
        data.append(Datum(model_input=tokens, loss_fn_inputs=inputs))
    return ForwardBackwardInput(data=data, loss_fn=fbi.loss_fn or "cross_entropy", loss_fn_config=fbi.loss_fn_config)


def sampling_params(sp: P.SamplingParamsIn | None, num_samples: int, limits: RequestLimits = DEFAULT_LIMITS
                    ) -> SamplingParams:
    """The SDK's sampling params (nulls meaning defaults) as ours, checked with ``num_samples``."""
    sp = sp or P.SamplingParamsIn()
    params = SamplingParams(max_tokens=sp.max_tokens, temperature=1.0 if sp.temperature is None else sp.temperature,
                            top_k=-1 if sp.top_k is None else sp.top_k, top_p=1.0 if sp.top_p is None else sp.top_p,
                            seed=sp.seed, stop=sp.stop)
    return check_sampling(params, num_samples=num_samples, limits=limits)


def prompt_logprobs_last_n(req: P.SampleRequestIn, prompt_len: int) -> int | None:
    last_n = req.prompt_logprobs_last_n
    if last_n is not None:
        if not req.prompt_logprobs:
            raise UserError("needs prompt_logprobs=True", field="prompt_logprobs_last_n")
        if not 1 <= last_n <= prompt_len - 1:
            raise UserError(f"must be between 1 and len(prompt) - 1 = {prompt_len - 1}",
                            field="prompt_logprobs_last_n")
    return last_n


def target_prompt_ids(td: P.TensorDataIn | None, prompt_len: int, limits: RequestLimits) -> list[list[int]] | None:
    """``target_prompt_logprobs``: an int64 ``[len(prompt) - 1, K]`` tensor of ids (-1 asks nothing), dense or
    sparse CSR (unlisted cells ask nothing), as rows; bounded by its shape before it is expanded."""
    field = "target_prompt_logprobs"
    if td is None:
        return None
    shape = td.shape
    if not isinstance(shape, list) or len(shape) != 2 or shape[0] != prompt_len - 1:
        raise UserError(f"expected shape [len(prompt) - 1, K] = [{prompt_len - 1}, K], got {shape!r}", field=field)
    check_tensor_shape(shape, limits, field)
    rows, width = shape
    if any(not isinstance(x, int) or isinstance(x, bool) for x in td.data):
        raise UserError("token ids must be integers", field=field)
    if td.sparse_crow_indices is None and td.sparse_col_indices is None:
        if len(td.data) != rows * width:
            raise UserError(f"shape {shape} holds {rows * width} ids but data has {len(td.data)}", field=field)
        return [list(td.data[r * width:(r + 1) * width]) for r in range(rows)]
    crow, cols = td.sparse_crow_indices or [], td.sparse_col_indices or []
    if (len(crow) != rows + 1 or len(cols) != len(td.data) or (crow and (crow[0] != 0 or crow[-1] != len(td.data)))
            or any(a > b for a, b in zip(crow, crow[1:])) or any(not 0 <= c < width for c in cols)):
        raise UserError("inconsistent sparse CSR tensor (shape, crow and col indices)", field=field)
    dense = [[-1] * width for _ in range(rows)]
    for r in range(rows):
        for k in range(crow[r], crow[r + 1]):
            dense[r][cols[k]] = td.data[k]  # type: ignore[assignment]
    return dense


# =================================================================================== result rendering


def render_result(kind: str, value: Any, proto_ok: bool) -> tuple[bytes, str]:
    """A finished result as the client expects it: protobuf for forward/backward and sample results when the
    client accepts it (0.18+), JSON otherwise (older SDKs)."""
    if kind in ("forward_backward", "forward"):
        if proto_ok:
            return proto.encode_forward_backward_output(value), "application/x-protobuf"
        return encode_json(value), "application/json"
    if kind == "sample":
        if proto_ok:
            return proto.encode_sample_output(value), "application/x-protobuf"
        return encode_json({**_without_nulls(builtins(value)), "type": "sample"}), "application/json"
    return encode_json(value), "application/json"


def _without_nulls(sample: dict[str, Any]) -> dict[str, Any]:
    """A JSON sample result for pre-0.18 SDKs: the 0.38 extras (which they never ask for) left out."""
    out = {k: v for k, v in sample.items() if v is not None or k == "prompt_logprobs"}
    out["sequences"] = [{k: v for k, v in seq.items() if k != "topk" or v is not None} for seq in out["sequences"]]
    return out


def checkpoint_out(c: CheckpointRecord) -> P.CheckpointOut:
    return P.CheckpointOut(
        checkpoint_id=c.checkpoint_id, checkpoint_type=CHECKPOINT_TYPE[c.kind], time=iso(c.created) or "",
        tinker_path=f"tinker://{c.run_id}/{c.kind}/{c.name}", size_bytes=c.size_bytes, public=c.public,
        user_metadata=c.user_metadata, expires_at=iso(c.expires_at),
    )


def run_out(run: RunRecord, latest: dict[tuple[str, str], CheckpointRecord]) -> P.TrainingRunOut:
    last = latest.get((run.id, "weights"))
    last_sampler = latest.get((run.id, "sampler_weights"))
    return P.TrainingRunOut(
        training_run_id=run.id, base_model=run.base_model, model_owner=run.owner, is_lora=True,
        last_request_time=iso(run.last_request) or "", corrupted=run.corrupted, lora_rank=run.lora.get("rank"),
        last_checkpoint=checkpoint_out(last) if last else None,
        last_sampler_checkpoint=checkpoint_out(last_sampler) if last_sampler else None,
        user_metadata=str_metadata(run.user_metadata),
    )
