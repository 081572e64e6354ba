"""Request validation and the sampling-parameter semantics both engines share.

``resolve_request`` turns a wire :class:`~twinkle.common.wire.SampleRequest` into a
:class:`ResolvedRequest` with every default filled in, or raises :class:`~twinkle.common.wire.UserError`
naming the field that is wrong. Both engines consume only ``ResolvedRequest``, so the torch engine and the
vLLM engine cannot disagree on what a request means.

Semantics (the Tinker ones, see README.md):

- ``temperature`` 0 (anything below ``GREEDY_EPS``, as in vLLM) is greedy argmax; it is never replaced by 1.0.
- ``top_k`` -1 (or 0, vLLM's spelling) is off, as is any value >= the vocabulary size.
- ``top_p`` in (0, 1]; 1 is off.
- ``stop``: ``None`` = stop at EOS; a string or a list of strings = stop strings (EOS still stops);
  a list of ints = stop token ids (EOS still stops); ``[]`` = nothing stops, not even EOS: exactly
  ``max_tokens`` tokens are produced (unless the context window ends first).
- ``max_tokens`` ``None`` = ``DEFAULT_MAX_TOKENS`` (256). Either way the number is capped by what is left of
  the context window after the prompt; a sequence cut there ends with ``"length"``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from twinkle.common.wire import SampleRequest, UserError

DEFAULT_MAX_TOKENS = 256
DEFAULT_MAX_NUM_SAMPLES = 128
# Temperatures below this are greedy (vLLM's _SAMPLING_EPS), so both engines agree on the boundary.
GREEDY_EPS = 1e-5


@dataclass(frozen=True)
class Limits:
    """What a request is checked against: the served model's vocabulary and context window."""

    vocab_size: int
    max_context_length: int
    max_num_samples: int = DEFAULT_MAX_NUM_SAMPLES


@dataclass(frozen=True)
class ResolvedRequest:
    """A validated request with every default resolved. ``top_k`` 0 means off."""

    prompt: tuple[int, ...]
    num_samples: int
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int | None
    stop_strings: tuple[str, ...]
    stop_token_ids: tuple[int, ...]
    ignore_eos: bool
    prompt_logprobs: bool
    adapter_path: str | None

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def resolve_request(req: SampleRequest, limits: Limits) -> ResolvedRequest:
    """Validate ``req`` against ``limits``; raise ``UserError(field=...)`` on the first mistake."""
    prompt = req.prompt
    if not isinstance(prompt, (list, tuple)) or len(prompt) == 0:
        raise UserError("the prompt must hold at least one token", field="prompt")
    vocab = limits.vocab_size
    for i, t in enumerate(prompt):
        if not _is_int(t) or t < 0 or t >= vocab:
            raise UserError(f"token id {t!r} is outside the vocabulary [0, {vocab})", field=f"prompt[{i}]")
    room = limits.max_context_length - len(prompt)
    if room < 1:
        raise UserError(
            f"the prompt has {len(prompt)} tokens; the model's context window is {limits.max_context_length} "
            "tokens and at least one must be left to sample",
            field="prompt",
        )

    n = req.num_samples
    if not _is_int(n) or n < 1 or n > limits.max_num_samples:
        raise UserError(f"must be an integer in [1, {limits.max_num_samples}], got {n!r}", field="num_samples")

    p = req.sampling_params
    if p.max_tokens is None:
        max_tokens = min(DEFAULT_MAX_TOKENS, room)
    else:
        if not _is_int(p.max_tokens) or p.max_tokens < 1:
            raise UserError(f"must be an integer >= 1, got {p.max_tokens!r}", field="sampling_params.max_tokens")
        max_tokens = min(p.max_tokens, room)

    t = p.temperature
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
        raise UserError(f"must be a finite number >= 0, got {t!r}", field="sampling_params.temperature")

    tp = p.top_p
    if isinstance(tp, bool) or not isinstance(tp, (int, float)) or not math.isfinite(tp) or not (0 < tp <= 1):
        raise UserError(f"must be in (0, 1], got {tp!r}", field="sampling_params.top_p")

    tk = p.top_k
    if not _is_int(tk) or tk < -1:
        raise UserError(f"must be -1 (off) or an integer >= 1, got {tk!r}", field="sampling_params.top_k")
    top_k = 0 if tk in (-1, 0) or tk >= vocab else tk

    seed = p.seed
    if seed is not None and not _is_int(seed):
        raise UserError(f"must be an integer, got {seed!r}", field="sampling_params.seed")

    stop_strings: tuple[str, ...] = ()
    stop_ids: tuple[int, ...] = ()
    ignore_eos = False
    stop = p.stop
    if stop is None:
        pass
    elif isinstance(stop, str):
        if stop == "":
            raise UserError("a stop string must not be empty", field="sampling_params.stop")
        stop_strings = (stop,)
    elif isinstance(stop, (list, tuple)):
        if len(stop) == 0:
            ignore_eos = True
        elif all(isinstance(s, str) for s in stop):
            for i, s in enumerate(stop):
                if s == "":
                    raise UserError("a stop string must not be empty", field=f"sampling_params.stop[{i}]")
            stop_strings = tuple(dict.fromkeys(stop))
        elif all(_is_int(s) for s in stop):
            for i, s in enumerate(stop):
                if s < 0 or s >= vocab:
                    raise UserError(
                        f"stop token id {s} is outside the vocabulary [0, {vocab})", field=f"sampling_params.stop[{i}]"
                    )
            stop_ids = tuple(dict.fromkeys(stop))
        else:
            raise UserError("must be all strings or all token ids, not a mix", field="sampling_params.stop")
    else:
        raise UserError(f"must be a string, a list of strings or a list of token ids, got {stop!r}",
                        field="sampling_params.stop")

    if req.adapter_path is not None and (not isinstance(req.adapter_path, str) or not req.adapter_path.strip()):
        raise UserError("must be a non-empty path or null", field="adapter_path")

    return ResolvedRequest(
        prompt=tuple(prompt),
        num_samples=n,
        max_tokens=max_tokens,
        temperature=float(t),
        top_k=top_k,
        top_p=float(tp),
        seed=seed,
        stop_strings=stop_strings,
        stop_token_ids=stop_ids,
        ignore_eos=ignore_eos,
        prompt_logprobs=bool(req.prompt_logprobs),
        adapter_path=req.adapter_path,
    )
