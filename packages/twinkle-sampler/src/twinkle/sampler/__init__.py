"""Twinkle Sampler service: sampling from a base model and its users' LoRA adapters.

Layout, the same in every component package: ``app`` (the Litestar HTTP surface), ``deployment`` (the Ray
Serve binding: ``SamplerManagement`` and ``build_application``), ``service`` (``SamplerService``, the logic),
and the engine: ``engine`` (its contract and ``make_engine``), ``torch_engine`` (transformers + peft, any
device, batched decode loop) and ``vllm_engine`` (GPU; imported only when selected). Importing this package
loads neither torch nor Ray. See README.md for the parameter semantics.
"""

from .adapters import AdapterCache, AdapterLease, fingerprint
from .app import create_sampler_app
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
    "create_sampler_app",
    "fingerprint",
    "make_engine",
    "resolve_request",
]
