"""The OpenAI-compatible surface (``/oai/api/v1``): ``GET models``, ``POST completions``, ``POST chat/completions``
over the same control plane and samplers as the Tinker and native surfaces."""

from .router import OAI_PREFIX, oai_router
from .serving import OpenAIServing

__all__ = ["OAI_PREFIX", "OpenAIServing", "oai_router"]
