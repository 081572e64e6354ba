"""Server-side losses, exactly as the Tinker protocol defines them (tinker-protocol.md §6.6).

Why the server computes losses at all: a shared GPU process must never run client code, and every rank of a
data-parallel group has to agree on the same computation. Clients therefore *name* a loss and send its
per-token inputs in each ``Datum``; this module turns that into a per-token loss tensor.

Notation, per token: ``lp`` is the logprob of ``target_tokens`` under the current adapter (it carries the
gradient), ``q`` the sampler's ``logprobs`` input, ``A`` the ``advantages`` input, ``r = exp(lp - q)``.

=======================  =========================================================  ==============================
loss_fn                  per-token loss                                             loss_fn_config (defaults)
=======================  =========================================================  ==============================
cross_entropy            ``-w * lp``  (``weights`` optional, default 1; any sign)    none
importance_sampling      ``-r * A``                                                 none
ppo                      ``-min(r * A, clip(r, lo, hi) * A)``                       clip_low_threshold 0.8,
                                                                                    clip_high_threshold 1.2
cispo                    ``-sg(clip(r, lo, hi)) * lp * A``                          clip_low_threshold 0.0,
                                                                                    clip_high_threshold 4.0
dro                      ``-(lp * A - beta/2 * (lp - q)**2)``                       beta 0.05
gspo                     ``-m * min(s_t * A, clip(s_t, lo, hi) * A)`` with          clip_low_threshold 0.9997,
                         ``s_t = sg(s) * exp(lp - sg(lp))`` and                     clip_high_threshold 1.0004
                         ``s = exp(sum(m * (lp - q)) / sum(m))`` per datum
stable_reinforce         ``-sg(r) * 1[lo <= r <= hi] * lp * A``                     clip_low_threshold 0.5,
                                                                                    clip_high_threshold 2.0
=======================  =========================================================  ==============================

``sg`` is stop-gradient, ``m`` the ``sequence_ratio_mask`` input (1 over sampled tokens). Every loss is
**summed** over tokens and datums: no normalisation, as Tinker specifies; callers who want a mean scale their
weights or advantages.

Choices where the public definition leaves a gap (documented here and in the README):

- ``dro``: Tinker documents ``beta`` but not its default; we use 0.05, the value of the docs' example.
- ``gspo``: Tinker only names the loss and its ``sequence_ratio_mask`` input. We implement the token form of
  GSPO from the paper (Zheng et al. 2025, arXiv:2507.18071, "GSPO-token"): the ratio of a datum is the
  length-normalised sequence ratio ``s`` (geometric mean of the token ratios over the masked tokens); each
  token sees ``s`` as its value and its own logprob's gradient, clipped PPO-style. The default clip range
  is the paper's (left 3e-4, right 4e-4, i.e. thresholds 0.9997 / 1.0004). Summed like every other loss, so
  the paper's ``1/|y|`` factor is the caller's to apply (through the advantages). A datum whose mask is all
  zeros has ``s = 1`` and contributes nothing.
- ``stable_reinforce``: Tinker documents what the loss needs (sampling with ``record_stability_info``, datums
  whose provenance names the sampled sequences, advantages only on sampled tokens) but not its formula. Ours
  is importance-weighted REINFORCE with a trust band: a token whose ratio lies in ``[lo, hi]`` contributes
  ``-r * A * lp`` with the ratio as a constant weight (so its gradient is the unbiased off-policy policy
  gradient ``-r * A * grad lp``); a token outside the band contributes nothing, because there the sampler and
  the learner disagree too much (stale asynchronous samples, or different numerics) for the token to be
  trusted; the share of such tokens is ``clip_fraction:mean``. It is stable where ``importance_sampling`` is
  not because no token's weight can exceed ``hi``, and, unlike PPO's clip, masking does not keep pushing a
  token that already left the band. ``q`` here is what the server's sampler recorded for the sampled
  sequence, not a value the client sends: the Tinker front end substitutes it from the recorded stability
  information (``twinkle.server.tinker.stability``).

Metrics: every loss reports ``loss:sum``. The RL losses add ``ratio:mean|min|max`` over the tokens that carry
learning signal (``advantages != 0``; for gspo, the masked tokens, reporting the sequence ratio) and, where
they clip, ``clip_fraction:mean`` (the share of those tokens whose ratio lies outside ``[lo, hi]``). Every key
is ``name:reduction`` because the Tinker SDK splits on the colon when it merges chunk results.

Validation: :func:`validate_request` turns a request into tensors and raises :class:`UserError` naming the
field at fault (``loss_fn``, ``loss_fn_config.<key>``, ``data[i].loss_fn_inputs.<name>``, ...) with expected
and received sizes, before any compute starts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from twinkle.common.limits import check_train_input
from twinkle.common.wire import Datum, ForwardBackwardInput, TensorData, UserError

Tensor = torch.Tensor

# A loss takes the current logprobs ``lp`` ([..., N], with grad), the named inputs (same shape, float32 except
# target_tokens) and the resolved config, and returns the per-token loss, same shape as ``lp``.
LossFn = Callable[[Tensor, Mapping[str, Tensor], Mapping[str, float]], Tensor]


def _sg(x: Tensor) -> Tensor:
    return x.detach()


def cross_entropy(lp: Tensor, inputs: Mapping[str, Tensor], cfg: Mapping[str, float]) -> Tensor:
    """``-w * lp``. Negative weights are legal: the SDK's client-side custom loss sends ``-dL/dlp`` here."""
    w = inputs.get("weights")
    return -lp if w is None else -w * lp


def importance_sampling(lp: Tensor, inputs: Mapping[str, Tensor], cfg: Mapping[str, float]) -> Tensor:
    """``-r * A``: the unclipped off-policy policy gradient (r = exp(lp - q))."""
    ratio = torch.exp(lp - inputs["logprobs"])
    return -ratio * inputs["advantages"]


def ppo(lp: Tensor, inputs: Mapping[str, Tensor], cfg: Mapping[str, float]) -> Tensor:
    """``-min(r * A, clip(r, lo, hi) * A)``: PPO's pessimistic clipped surrogate."""
    adv = inputs["advantages"]
    ratio = torch.exp(lp - inputs["logprobs"])
    clipped = torch.clamp(ratio, cfg["clip_low_threshold"], cfg["clip_high_threshold"])
    return -torch.minimum(ratio * adv, clipped * adv)


def cispo(lp: Tensor, inputs: Mapping[str, Tensor], cfg: Mapping[str, float]) -> Tensor:
    """``-sg(clip(r, lo, hi)) * lp * A``: the clipped ratio only weights the REINFORCE term, so every token keeps
    its gradient (MiniMax-M1's CISPO)."""
    ratio = torch.exp(lp - inputs["logprobs"])
    weight = _sg(torch.clamp(ratio, cfg["clip_low_threshold"], cfg["clip_high_threshold"]))
    return -weight * lp * inputs["advantages"]


def dro(lp: Tensor, inputs: Mapping[str, Tensor], cfg: Mapping[str, float]) -> Tensor:
    """``-(lp * A - beta/2 * (lp - q)^2)``: a policy gradient with a quadratic penalty for leaving the sampler."""
    diff = lp - inputs["logprobs"]
    return -(lp * inputs["advantages"] - 0.5 * cfg["beta"] * diff * diff)


def gspo_sequence_ratio(lp: Tensor, q: Tensor, mask: Tensor) -> Tensor:
    """Per datum (last dim = tokens): ``exp(sum(m * (lp - q)) / sum(m))``, 1 where the mask is empty."""
    n = mask.sum(dim=-1)
    log_ratio = (mask * (lp - q)).sum(dim=-1) / torch.clamp(n, min=1.0)
    return torch.exp(torch.where(n > 0, log_ratio, torch.zeros_like(log_ratio)))


def gspo(lp: Tensor, inputs: Mapping[str, Tensor], cfg: Mapping[str, float]) -> Tensor:
    """GSPO-token: every masked token sees the sequence ratio ``s`` as value and its own logprob as gradient."""
    mask = inputs["sequence_ratio_mask"]
    adv = inputs["advantages"]
    seq = _sg(gspo_sequence_ratio(lp, inputs["logprobs"], mask)).unsqueeze(-1)
    token_ratio = seq * torch.exp(lp - _sg(lp))
    clipped = torch.clamp(token_ratio, cfg["clip_low_threshold"], cfg["clip_high_threshold"])
    return -mask * torch.minimum(token_ratio * adv, clipped * adv)


def stable_reinforce(lp: Tensor, inputs: Mapping[str, Tensor], cfg: Mapping[str, float]) -> Tensor:
    """``-sg(r) * 1[lo <= r <= hi] * lp * A``: off-policy REINFORCE whose tokens outside the trust band drop out."""
    ratio = _sg(torch.exp(lp - inputs["logprobs"]))
    trusted = (ratio >= cfg["clip_low_threshold"]) & (ratio <= cfg["clip_high_threshold"])
    return -torch.where(trusted, ratio, torch.zeros_like(ratio)) * lp * inputs["advantages"]


@dataclass(frozen=True)
class LossSpec:
    name: str
    fn: LossFn
    required: tuple[str, ...]
    optional: tuple[str, ...] = ()
    defaults: Mapping[str, float] = field(default_factory=dict)
    clips: bool = False  # has clip_low/high thresholds (-> clip_fraction metric)
    rl: bool = False  # uses logprobs/advantages (-> ratio metrics)

    @property
    def inputs(self) -> tuple[str, ...]:
        return self.required + self.optional


_RL = ("target_tokens", "logprobs", "advantages")
LOSSES: dict[str, LossSpec] = {
    s.name: s
    for s in (
        LossSpec("cross_entropy", cross_entropy, ("target_tokens",), ("weights",)),
        LossSpec("importance_sampling", importance_sampling, _RL, rl=True),
        LossSpec(
            "ppo", ppo, _RL, defaults={"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}, clips=True, rl=True
        ),
        LossSpec(
            "cispo", cispo, _RL, defaults={"clip_low_threshold": 0.0, "clip_high_threshold": 4.0}, clips=True, rl=True
        ),
        LossSpec("dro", dro, _RL, defaults={"beta": 0.05}, rl=True),
        LossSpec(
            "gspo",
            gspo,
            _RL + ("sequence_ratio_mask",),
            defaults={"clip_low_threshold": 1.0 - 3e-4, "clip_high_threshold": 1.0 + 4e-4},
            clips=True,
            rl=True,
        ),
        LossSpec(
            "stable_reinforce",
            stable_reinforce,
            _RL,
            defaults={"clip_low_threshold": 0.5, "clip_high_threshold": 2.0},
            clips=True,
            rl=True,
        ),
    )
}

_INT_INPUTS = {"target_tokens"}


# --- validation -----------------------------------------------------------------------------------------


@dataclass
class ValidatedRequest:
    """A request that passed validation: per-datum 1-D tensors on the CPU, the loss and its full config."""

    spec: LossSpec
    config: dict[str, float]
    tokens: list[Tensor]  # model_input per datum, int64 [N_i]
    inputs: list[dict[str, Tensor]]  # per datum: name -> [N_i] (int64 target_tokens, float32 otherwise)

    @property
    def lengths(self) -> list[int]:
        return [len(t) for t in self.tokens]

    def subset(self, rows: list[int]) -> "ValidatedRequest":
        """The same request over datums ``rows`` only (a micro-batch)."""
        return ValidatedRequest(spec=self.spec, config=self.config, tokens=[self.tokens[i] for i in rows],
                                inputs=[self.inputs[i] for i in rows])


def resolve_loss(loss_fn: str, loss_fn_config: Mapping[str, object] | None) -> tuple[LossSpec, dict[str, float]]:
    spec = LOSSES.get(loss_fn)
    if spec is None:
        raise UserError(f"unknown loss {loss_fn!r}; supported: {', '.join(sorted(LOSSES))}", field="loss_fn")
    cfg = dict(spec.defaults)
    for key, value in (loss_fn_config or {}).items():
        where = f"loss_fn_config.{key}"
        if key not in spec.defaults:
            allowed = ", ".join(sorted(spec.defaults)) or "none"
            raise UserError(f"loss {loss_fn!r} takes no option {key!r} (allowed: {allowed})", field=where)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise UserError(f"expected a finite number, got {value!r}", field=where)
        cfg[key] = float(value)
    if spec.clips and cfg["clip_low_threshold"] > cfg["clip_high_threshold"]:
        raise UserError(
            f"clip_low_threshold {cfg['clip_low_threshold']} is above clip_high_threshold {cfg['clip_high_threshold']}",
            field="loss_fn_config.clip_low_threshold",
        )
    if spec.clips and cfg["clip_low_threshold"] < 0:
        raise UserError("a ratio threshold cannot be negative", field="loss_fn_config.clip_low_threshold")
    return spec, cfg


def _tensor_from(td: TensorData, *, name: str, n: int, where: str) -> Tensor:
    shape = td.resolved_shape()  # sizes and values were checked by check_train_input
    if len(shape) != 1:
        raise UserError(f"expected a 1-D tensor of length {n} (one per model_input token), got shape {shape}", field=where)
    if shape[0] != n:
        raise UserError(
            f"expected length {n} (one per model_input token), got length {shape[0]}", field=where
        )
    if name in _INT_INPUTS:
        if td.dtype != "int64":
            raise UserError(f"expected dtype int64, got {td.dtype}", field=where)
        return torch.tensor(td.data, dtype=torch.int64)
    return torch.tensor(td.data, dtype=torch.float32)


def validate_request(
    inp: ForwardBackwardInput, *, vocab_size: int, max_length: int | None = None, allow_empty: bool = False
) -> ValidatedRequest:
    """Check a forward/backward request completely and convert it to tensors, or raise ``UserError``: the
    request's bounds and value ranges (``check_train_input``), then what only the engine knows (its loss
    functions, vocabulary and the per-token layout of loss inputs)."""
    check_train_input(inp, max_tokens_per_datum=max_length)
    spec, cfg = resolve_loss(inp.loss_fn, inp.loss_fn_config)
    if not inp.data and not allow_empty:
        raise UserError("at least one datum is required", field="data")
    tokens: list[Tensor] = []
    inputs: list[dict[str, Tensor]] = []
    for i, datum in enumerate(inp.data):
        tokens.append(_validate_tokens(datum, i, vocab_size=vocab_size, max_length=max_length))
        n = len(datum.model_input)
        d: dict[str, Tensor] = {}
        for name in spec.required:
            if name not in datum.loss_fn_inputs:
                raise UserError(
                    f"loss {spec.name!r} needs input {name!r} (length {n}); got inputs "
                    f"{sorted(datum.loss_fn_inputs) or 'none'}",
                    field=f"data[{i}].loss_fn_inputs.{name}",
                )
        for name, td in datum.loss_fn_inputs.items():
            where = f"data[{i}].loss_fn_inputs.{name}"
            if name not in spec.inputs:
                raise UserError(
                    f"loss {spec.name!r} takes no input {name!r} (accepted: {', '.join(spec.inputs)})", field=where
                )
            d[name] = _tensor_from(td, name=name, n=n, where=where)
        tt = d["target_tokens"]
        if n and (int(tt.min()) < 0 or int(tt.max()) >= vocab_size):
            bad = next(int(x) for x in tt.tolist() if x < 0 or x >= vocab_size)
            raise UserError(
                f"token id {bad} is outside the model's vocabulary [0, {vocab_size})",
                field=f"data[{i}].loss_fn_inputs.target_tokens",
            )
        inputs.append(d)
    return ValidatedRequest(spec=spec, config=cfg, tokens=tokens, inputs=inputs)


def _validate_tokens(datum: Datum, i: int, *, vocab_size: int, max_length: int | None) -> Tensor:
    where = f"data[{i}].model_input"
    n = len(datum.model_input)
    if n == 0:
        raise UserError("model_input is empty", field=where)
    t = torch.tensor(datum.model_input, dtype=torch.int64)
    if int(t.min()) < 0 or int(t.max()) >= vocab_size:
        bad = next(int(x) for x in datum.model_input if x < 0 or x >= vocab_size)
        raise UserError(f"token id {bad} is outside the model's vocabulary [0, {vocab_size})", field=where)
    return t


# --- metrics --------------------------------------------------------------------------------------------


@torch.no_grad()
def loss_metrics(
    spec: LossSpec, cfg: Mapping[str, float], lp: Tensor, inputs: Mapping[str, Tensor], per_token: Tensor, valid: Tensor
) -> dict[str, float]:
    """Batch metrics of one request. ``valid`` masks real (non-padding) tokens; all tensors share a shape."""
    metrics = {"loss:sum": float((per_token * valid).sum())}
    if not spec.rl:
        return metrics
    if spec.name == "gspo":
        mask = inputs["sequence_ratio_mask"] * valid
        seq = gspo_sequence_ratio(lp, inputs["logprobs"], mask).unsqueeze(-1).expand_as(lp)
        active = mask != 0
        ratio = seq
    else:
        active = (inputs["advantages"] != 0) & (valid != 0)
        ratio = torch.exp(lp - inputs["logprobs"])
    if not bool(active.any()):
        return metrics
    r = ratio[active]
    metrics["ratio:mean"] = float(r.mean())
    metrics["ratio:min"] = float(r.min())
    metrics["ratio:max"] = float(r.max())
    if spec.clips:
        outside = (r < cfg["clip_low_threshold"]) | (r > cfg["clip_high_threshold"])
        metrics["clip_fraction:mean"] = float(outside.float().mean())
    return metrics


REDUCTIONS = ("sum", "mean", "min", "max")


def merge_metrics(parts: list[tuple[dict[str, float], int]]) -> dict[str, float]:
    """Merge metrics of shards/chunks as the Tinker SDK does: ``sum|min|max`` reduce, ``mean`` is weighted by
    each part's number of datums. ``parts`` is ``[(metrics, num_datums), ...]``."""
    out: dict[str, float] = {}
    weights: dict[str, float] = {}
    for metrics, n in parts:
        for key, value in metrics.items():
            _, reduction = key.rsplit(":", 1)
            if key not in out:
                out[key] = value if reduction != "mean" else value * n
                weights[key] = n
                continue
            if reduction == "sum":
                out[key] += value
            elif reduction == "min":
                out[key] = min(out[key], value)
            elif reduction == "max":
                out[key] = max(out[key], value)
            elif reduction == "mean":
                out[key] += value * n
                weights[key] += n
    for key in out:
        if key.endswith(":mean"):
            out[key] = out[key] / weights[key] if weights[key] else 0.0
    return out
