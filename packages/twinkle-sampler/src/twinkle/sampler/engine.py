"""The sampler engine interface, and ``make_engine`` that picks one by ``sampler_type``.

Contract every engine keeps:

- ``async generate(requests)`` takes :class:`~twinkle.common.wire.SampleRequest` s, validates each with
  :func:`twinkle.sampler.params.resolve_request` (a ``UserError`` naming the field, before any compute), and
  returns one :class:`~twinkle.common.wire.SampleOutput` per request, in order. Requests handed over together,
  or by concurrent callers, are run together (one batch / one engine step), never one by one. Compute never
  runs on the caller's event loop.
- Every sequence carries ``tokens``, ``logprobs`` (one per token: the log-probability of the sampled token
  under the *raw* model distribution, i.e. ``log_softmax`` of the logits before temperature/top-k/top-p) and
  ``stop_reason`` ``"stop"`` (EOS, a stop token or a stop string) or ``"length"`` (``max_tokens`` or the end of
  the context window). When a sequence stops on EOS or a stop token, that token is the last of ``tokens``;
  when it stops on a stop string, ``tokens`` ends with the token that completed the string.
- ``prompt_logprobs`` (when asked) is teacher-forced: entry *i* is ``log p(prompt[i] | prompt[:i])``, entry 0
  is ``None``.
- Adapters: ``adapter_path`` names a PEFT checkpoint directory; the engine's :class:`AdapterCache` loads it,
  keeps the ``max_loras`` most recently used versions resident, reloads evicted or re-saved ones, and never
  answers with another adapter or the base model instead (a checkpoint that cannot load is a ``UserError``).
- Determinism: ``temperature`` 0 is greedy argmax. With a ``seed``, sample *i* of a request draws its random
  numbers from its own stream derived from ``(seed, i)``, so the same request with the same seed gives the
  same tokens whatever else is in the batch (up to floating-point ties between batch shapes).
"""

from __future__ import annotations

import abc
from typing import Any, Callable, Sequence

from twinkle.common.models import served_model_name
from twinkle.common.wire import SampleOutput, SampleRequest, ServiceInfo

from .adapters import AdapterCache
from .params import DEFAULT_MAX_NUM_SAMPLES, Limits, ResolvedRequest, resolve_request

SAMPLER_TYPES = ("torch", "vllm")

# (request index, sample index, token, raw logprob): one sampled token, as soon as it is known
TokenSink = Callable[[int, int, int, float], None]


class SamplerEngine(abc.ABC):
    """Base class: the model's limits, the adapter cache, validation; subclasses implement ``generate``."""

    engine_type: str = "?"

    def __init__(self, model_id: str, *, max_loras: int, max_num_samples: int = DEFAULT_MAX_NUM_SAMPLES) -> None:
        self.model_id = model_id
        self.model_name = served_model_name(model_id)
        self.max_loras = max_loras
        self.max_num_samples = max_num_samples
        self.adapters: AdapterCache  # set by the subclass, which knows how to load into its model
        self.vocab_size: int
        self.max_context_length: int
        self.eos_token_ids: tuple[int, ...]

    @property
    def limits(self) -> Limits:
        return Limits(self.vocab_size, self.max_context_length, self.max_num_samples)

    def resolve(self, request: SampleRequest) -> ResolvedRequest:
        return resolve_request(request, self.limits)

    @abc.abstractmethod
    async def generate(self, requests: Sequence[SampleRequest], tokens: TokenSink | None = None
                       ) -> list[SampleOutput]:
        """Sample every request; one output per request, in order. Raises the first request's error.
        ``tokens(request_index, sample_index, token, logprob)`` is called on the caller's event loop as each token
        is sampled, where the engine can (the torch engine does; others report nothing before the end)."""

    def stats(self) -> dict[str, Any]:
        return {"adapters": dict(self.adapters.stats)}

    def info(self) -> ServiceInfo:
        """This engine as a sampler's ``ServiceInfo``. Adapters are counted, never named: info is served over
        HTTP, and an adapter's name or path belongs to another user's run."""
        return ServiceInfo(
            kind="sampler",
            model_name=self.model_name,
            model_id=self.model_id,
            backend=self.engine_type,
            max_context_length=self.max_context_length,
            vocab_size=self.vocab_size,
            dp_size=1,
            settings={"max_loras": self.max_loras, "max_num_samples": self.max_num_samples,
                      "resident_adapters": len(self.adapters.resident())},
        )

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release the engine's threads/processes."""


def make_engine(
    sampler_type: str,
    model_id: str,
    engine_args: dict[str, Any] | None = None,
    max_loras: int = 8,
    device: str | None = None,
) -> SamplerEngine:
    """Build the engine for ``sampler_type``. vLLM is imported only when ``sampler_type == "vllm"``."""
    engine_args = dict(engine_args or {})
    if sampler_type == "torch":
        from .torch_engine import TorchEngine

        return TorchEngine(model_id, engine_args=engine_args, max_loras=max_loras, device=device)
    if sampler_type == "vllm":
        from .vllm_engine import VLLMEngine

        return VLLMEngine(model_id, engine_args=engine_args, max_loras=max_loras, device=device)
    raise ValueError(f"sampler_type must be one of {SAMPLER_TYPES}, got {sampler_type!r}")
