"""The Sampler service's Litestar app: health and info (the native Twinkle routes join them as that
protocol lands). ``sampler`` is anything with async ``health()`` and ``info()``: the Serve deployment, or
the service object itself in tests."""

from __future__ import annotations

from typing import Any

from litestar import Litestar

from twinkle.common.http import component_app


def create_sampler_app(sampler: Any) -> Litestar:
    return component_app("Twinkle sampler", "twinkle-sampler", sampler)
