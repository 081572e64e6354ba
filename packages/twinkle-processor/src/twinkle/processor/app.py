"""The Processor service's Litestar app: health and info (the native Twinkle routes join them as that
protocol lands). ``processor`` is anything with async ``health()`` and ``info()``: the Serve deployment, or
the service object itself in tests."""

from __future__ import annotations

from typing import Any

from litestar import Litestar

from twinkle.common.http import component_app


def create_processor_app(processor: Any) -> Litestar:
    return component_app("Twinkle processor", "twinkle-processor", processor)
