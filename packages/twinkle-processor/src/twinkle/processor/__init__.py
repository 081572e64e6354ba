"""Twinkle Processor service: tokenization, chat templates and dataset encoding for a served model.

Layout, the same in every component package: ``app`` (the Litestar HTTP surface), ``deployment`` (the Ray
Serve binding: ``ProcessorManagement`` and ``build_application``), ``service`` (``ProcessorService``, the
logic), and the engine: ``encoding`` (rows to training data) on ``workers`` (encoding processes).
``protocol`` holds the request and response structs. Importing this package loads neither torch nor Ray.
"""

from .app import create_processor_app
from .protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    EncodeRequest,
    EncodeResponse,
    RenderChatRequest,
    RenderChatResponse,
    RowsError,
    TokenizeRequest,
    TokenizeResponse,
)
from .service import ProcessorService

__all__ = [
    "DetokenizeRequest",
    "DetokenizeResponse",
    "EncodeRequest",
    "EncodeResponse",
    "ProcessorService",
    "RenderChatRequest",
    "RenderChatResponse",
    "RowsError",
    "TokenizeRequest",
    "TokenizeResponse",
    "create_processor_app",
]
