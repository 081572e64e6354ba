"""The native Twinkle central app (TwinkleServer): sessions, training runs, checkpoints, futures, capabilities,
and the ``Authority`` that the component apps (model, sampler, processor) call through a Serve handle.

``create_twinkle_app(NativeService(settings, models=..., samplers=...))`` builds the Litestar app.
"""

from .router import create_twinkle_app
from .serving import NativeService
from .settings import NativeSettings

__all__ = ["NativeService", "NativeSettings", "create_twinkle_app"]
