"""Twinkle Model service: one base model, many users' LoRA adapters, trained in per-run ``seq_id`` order.

Layout, the same in every component package: ``app`` (the Litestar HTTP surface), ``deployment`` (the Ray
Serve binding: ``ModelManagement`` and ``build_application``), ``service`` (``ModelService``, the logic),
and the engine: ``backend`` (its contract), ``transformers_backend``, ``distributed`` (data-parallel ranks).
Importing this package loads neither torch nor Ray; the engine and deployment modules do.
"""

from .app import create_model_app
from .backend import BackendInfo, TrainingBackend
from .service import ModelService

__all__ = ["BackendInfo", "ModelService", "TrainingBackend", "create_model_app"]
