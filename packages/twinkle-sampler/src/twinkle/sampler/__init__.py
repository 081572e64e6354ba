"""Twinkle Sampler service: sampling from a base model and its users' LoRA adapters.

Engines: ``torch`` (transformers + peft, any device, batched decode loop) and ``vllm`` (GPU; imported only
when selected). See README.md for the parameter semantics.
"""

from .adapters import AdapterCache, AdapterLease, fingerprint
from .engine import SAMPLER_TYPES, SamplerEngine, make_engine
from .params import DEFAULT_MAX_TOKENS, Limits, ResolvedRequest, resolve_request
from .service import SamplerService

__all__ = [
    "AdapterCache",
    "AdapterLease",
    "DEFAULT_MAX_TOKENS",
    "Limits",
    "ResolvedRequest",
    "SAMPLER_TYPES",
    "SamplerEngine",
    "SamplerService",
    "fingerprint",
    "make_engine",
    "resolve_request",
]
