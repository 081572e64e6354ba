"""Native bodies ↔ control-plane records: checkpoint and run views, future views, LoRA settings, URIs.

Pure functions, except ``resolve_uri`` (a visibility check against the store).
"""

from __future__ import annotations

import time
from typing import Any

from twinkle.common.native import SAVE_KINDS
from twinkle.common.wire import LoraConfig, UserError

from ..core import ControlPlane, iso
from ..core.checkpoints import parse_uri
from ..core.futures import result_value
from ..core.state import CheckpointRecord, FutureRecord, RunRecord
from . import protocol as P

SCHEME = "twinkle://"


def checkpoint_out(c: CheckpointRecord) -> P.CheckpointOut:
    return P.CheckpointOut(uri=f"{SCHEME}{c.run_id}/{c.kind}/{c.name}", run_id=c.run_id, kind=c.kind,
                           name=c.name, created_at=iso(c.created) or "", size_bytes=c.size_bytes,
                           base_model=c.base_model, expires_at=iso(c.expires_at), public=c.public)


def run_out(run: RunRecord, latest: dict[tuple[str, str], CheckpointRecord], *, model_prefix: str | None,
            step: int | None = None, loaded: bool | None = None) -> P.TrainingRunOut:
    last = latest.get((run.id, "weights"))
    last_sampler = latest.get((run.id, "sampler_weights"))
    return P.TrainingRunOut(
        run_id=run.id, base_model=run.base_model, lora=run.lora, created_at=iso(run.created) or "",
        last_request_at=iso(run.last_request) or "", protocol=run.protocol, session_id=run.session_id,
        user_metadata=run.user_metadata, model_prefix=model_prefix, step=step, loaded=loaded,
        last_checkpoint=checkpoint_out(last) if last else None,
        last_sampler_checkpoint=checkpoint_out(last_sampler) if last_sampler else None,
    )


def future_out(record: FutureRecord) -> P.FutureOut:
    end = record.finished or time.time()
    out = P.FutureOut(request_id=record.request_id, status=record.status, kind=record.kind,
                      elapsed_s=round(max(0.0, end - record.created), 3))
    if record.status == "done":
        out.result = result_value(record)
    elif record.status == "failed":
        out.error = P.FutureError(detail=record.error or "request failed", category=record.category or "server")
    return out


def lora_config(cfg: P.LoraIn) -> LoraConfig:
    alpha = LoraConfig().alpha if cfg.alpha is None else cfg.alpha
    return LoraConfig(rank=cfg.rank, alpha=alpha, seed=cfg.seed, train_attn=cfg.train_attn, train_mlp=cfg.train_mlp,
                      train_unembed=cfg.train_unembed, dropout=cfg.dropout)


def checkpoint_kinds(kind: str | None) -> tuple[str, ...]:
    """``?kind=`` of a checkpoint query: state|sampler (or the stored names), any/absent for both."""
    if kind in (None, "", "any"):
        return ("weights", "sampler_weights")
    mapped = SAVE_KINDS.get(kind, kind)
    if mapped not in ("weights", "sampler_weights"):
        raise UserError(f"kind {kind!r} must be state, sampler, weights, sampler_weights or any", field="kind")
    return (mapped,)


async def resolve_uri(plane: ControlPlane, owner: str, uri: Any, *, field: str,
                      kinds: tuple[str, ...] = ("weights", "sampler_weights")) -> CheckpointRecord:
    """The checkpoint a ``twinkle://`` (or ``tinker://``) URI names, if the caller may read it."""
    if not isinstance(uri, str) or not uri.startswith((SCHEME, "tinker://")):
        raise UserError(f"{uri!r} is not a checkpoint URI; expected {SCHEME}<run_id>/{kinds[0]}/<name> "
                        "(server file paths are not accepted)", field=field)
    return await plane.visible_checkpoint(owner, parse_uri(uri, field=field, kinds=kinds), field=field)
