"""Request resolution and the sampling-parameter semantics both engines share.

``resolve_request`` turns a wire :class:`~twinkle.common.wire.SampleRequest` into a
:class:`ResolvedRequest` with every default filled in, or raises :class:`~twinkle.common.wire.UserError`
naming the field that is wrong. The engine-independent rules (ranges, counts, stop-string bounds) are
``twinkle.common.limits.check_sampling``'s; this module adds what only the engine knows: the vocabulary and
the context window. Both engines consume only ``ResolvedRequest``, so the torch engine and the vLLM engine
cannot disagree on what a request means.

Semantics (the Tinker ones, see README.md):

- ``temperature`` 0 (anything below ``GREEDY_EPS``, as in vLLM) is greedy argmax; it is never replaced by 1.0.
- ``top_k`` -1 is off, as is any value >= the vocabulary size.
- ``top_p`` in (0, 1]; 1 is off.
- ``stop``: ``None`` = stop at EOS; a string or a list of strings = stop strings (EOS still stops);
  a list of ints = stop token ids (EOS still stops); ``[]`` = nothing stops, not even EOS: exactly
  ``max_tokens`` tokens are produced (unless the context window ends first).
- ``max_tokens`` ``None`` = ``DEFAULT_MAX_TOKENS`` (256). Either way the number is capped by what is left of
  the context window after the prompt; a sequence cut there ends with ``"length"``.

:class:`StopStrings` finds the stop string a newly sampled token completes, with work bounded by the longest
stop string and independent of how many there are.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import msgspec

from twinkle.common.limits import DEFAULT_LIMITS, DEFAULT_MAX_TOKENS, RequestLimits, check_sampling
from twinkle.common.wire import SampleRequest, UserError

__all__ = ["DEFAULT_MAX_NUM_SAMPLES", "DEFAULT_MAX_TOKENS", "GREEDY_EPS", "Limits", "ResolvedRequest",
           "StopStrings", "resolve_request"]

DEFAULT_MAX_NUM_SAMPLES = DEFAULT_LIMITS.max_num_samples
# Temperatures below this are greedy (vLLM's _SAMPLING_EPS), so both engines agree on the boundary.
GREEDY_EPS = 1e-5


@dataclass(frozen=True)
class Limits:
    """What a request is checked against: the served model's vocabulary and context window, this engine's
    ``max_num_samples`` (it replaces ``request.max_num_samples``) and the request limits."""

    vocab_size: int
    max_context_length: int
    max_num_samples: int = DEFAULT_MAX_NUM_SAMPLES
    request: RequestLimits = field(default=DEFAULT_LIMITS)

    def effective(self) -> RequestLimits:
        if self.request.max_num_samples == self.max_num_samples:
            return self.request
        return msgspec.structs.replace(self.request, max_num_samples=self.max_num_samples)


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
    topk_prompt: int = 0
    topk_sample: int = 0
    target_prompt: tuple[tuple[int, ...], ...] | None = None
    alt_k: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    @property
    def needs_prompt_distribution(self) -> bool:
        """Whether the model's distribution at every prompt position is needed (not only the last)."""
        return self.prompt_logprobs or self.topk_prompt > 0 or self.target_prompt is not None or self.alt_k > 0


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def resolve_request(req: SampleRequest, limits: Limits) -> ResolvedRequest:
    """Validate ``req`` against ``limits``; raise ``UserError(field=...)`` on the first mistake.

    Prompt and vocabulary checks come first (only the engine can make them), then ``check_sampling``."""
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
    p = check_sampling(req.sampling_params, num_samples=n, limits=limits.effective())
    max_tokens = min(DEFAULT_MAX_TOKENS if p.max_tokens is None else p.max_tokens, room)
    t, tp = p.temperature, p.top_p
    top_k = 0 if p.top_k == -1 or p.top_k >= vocab else p.top_k
    seed = p.seed

    stop_strings: tuple[str, ...] = ()
    stop_ids: tuple[int, ...] = ()
    ignore_eos = False
    stop = p.stop
    if isinstance(stop, str):
        stop_strings = (stop,)
    elif isinstance(stop, (list, tuple)) and not stop:
        ignore_eos = True
    elif isinstance(stop, (list, tuple)) and isinstance(stop[0], str):
        stop_strings = tuple(dict.fromkeys(stop))  # type: ignore[arg-type]
    elif isinstance(stop, (list, tuple)):
        for i, s in enumerate(stop):
            if s >= vocab:  # type: ignore[operator]
                raise UserError(
                    f"stop token id {s} is outside the vocabulary [0, {vocab})", field=f"sampling_params.stop[{i}]"
                )
        stop_ids = tuple(dict.fromkeys(stop))  # type: ignore[arg-type]

    if req.adapter_path is not None and (not isinstance(req.adapter_path, str) or not req.adapter_path.strip()):
        raise UserError("must be a non-empty path or null", field="adapter_path")
    request_limits = limits.effective()
    ks = {name: _k(getattr(req, name), request_limits.max_logprobs_k, name)
          for name in ("topk_prompt_logprobs", "topk_sample_logprobs", "prompt_alt_tokens_k")}
    target = _target_ids(req.target_prompt_logprobs, len(prompt), vocab, request_limits)

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
        topk_prompt=ks["topk_prompt_logprobs"],
        topk_sample=ks["topk_sample_logprobs"],
        target_prompt=target,
        alt_k=ks["prompt_alt_tokens_k"],
    )


def _k(value: object, most: int, field: str) -> int:
    if not _is_int(value) or not 0 <= value <= most:  # type: ignore[operator]
        raise UserError(f"must be an integer in [0, {most}] (max_logprobs_k), got {value!r}", field=field)
    return value  # type: ignore[return-value]


def _target_ids(rows: object, prompt_len: int, vocab: int, limits: RequestLimits
                ) -> tuple[tuple[int, ...], ...] | None:
    """``target_prompt_logprobs``: ``[len(prompt) - 1][K]`` ids in [-1, vocab) (-1 asks nothing)."""
    field = "target_prompt_logprobs"
    if rows is None:
        return None
    if not isinstance(rows, (list, tuple)) or len(rows) != prompt_len - 1:
        got = len(rows) if isinstance(rows, (list, tuple)) else type(rows).__name__
        raise UserError(f"needs one row per prompt position after the first ({prompt_len - 1}), got {got}",
                        field=field)
    width = len(rows[0]) if rows else 0
    if width > limits.max_target_logprobs_k or width * len(rows) > limits.max_tensor_elements:
        raise UserError(f"{len(rows)} × {width} ids; at most {limits.max_target_logprobs_k} per row "
                        f"(max_target_logprobs_k) and {limits.max_tensor_elements} in all", field=field)
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, (list, tuple)) or len(row) != width:
            raise UserError(f"every row must have {width} ids", field=f"{field}[{i}]")
        for t in row:
            if not _is_int(t) or not -1 <= t < vocab:
                raise UserError(f"token id {t!r} is outside [-1, {vocab}) (-1 asks nothing)", field=f"{field}[{i}]")
        out.append(tuple(row))
    return tuple(out)


class StopStrings:
    """The stop strings of one request, matched incrementally as tokens are sampled.

    ``completed_by_last(tokens, decode)`` says whether the newest token completed a stop string. It decodes
    only the last ``window`` tokens (enough to hold the longest stop string: every token decodes to at least
    one character), twice: with and without the newest token. A stop string completed now must end in the
    characters the newest token added (earlier ones were checked at earlier steps, and decoding stops at the
    first hit), so only those end positions are probed, each once per distinct stop-string length, by a set
    lookup. Work per step: two decodes of at most ``window`` tokens plus (new characters × distinct lengths)
    lookups, whatever the number of stop strings.
    """

    def __init__(self, stops: Iterable[str]) -> None:
        self._stops = frozenset(stops)
        self._lengths = sorted({len(s) for s in self._stops})
        self.window = (self._lengths[-1] + 4) if self._lengths else 0

    def __bool__(self) -> bool:
        return bool(self._stops)

    def completed_by_last(self, tokens: Sequence[int], decode: Callable[[Sequence[int]], str]) -> bool:
        if not self._stops or not tokens:
            return False
        tail = tokens[-self.window:]
        text = decode(tail)
        before = decode(tail[:-1]) if len(tail) > 1 else ""
        start = _shared_prefix(before, text)
        for end in range(max(start, 0) + 1, len(text) + 1):
            for n in self._lengths:
                if n > end:
                    break
                if text[end - n:end] in self._stops:
                    return True
        return False


def _shared_prefix(before: str, text: str) -> int:
    """How many leading characters ``text`` keeps from ``before``. Usually all of them; a byte-level tokenizer
    may rewrite the last few (an incomplete UTF-8 sequence completed by the new token)."""
    for cut in range(0, min(len(before), 8) + 1):
        if text.startswith(before[:len(before) - cut]):
            return len(before) - cut
    return 0
