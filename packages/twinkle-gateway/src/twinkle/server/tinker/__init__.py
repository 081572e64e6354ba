"""The Tinker-compatible central app (TinkerCompatServer): the unmodified official ``tinker`` SDK talks to it.

``create_tinker_app(settings, models, samplers)`` builds the Litestar app; ``TinkerSettings`` configures it.
"""

from .router import create_tinker_app
from .serving import TinkerService
from .settings import TinkerSettings

__all__ = ["TinkerService", "TinkerSettings", "create_tinker_app"]
