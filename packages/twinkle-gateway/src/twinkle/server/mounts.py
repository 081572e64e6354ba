"""What both central apps mount beside their protocol's routes: the operator routes (under the protocol's
prefix), the OpenAI-compatible surface, Prometheus ``/metrics`` and the web console, and the app state those
read. Each protocol's ``create_*_app`` adds only what is its own."""

from __future__ import annotations

from typing import Any

from litestar import Router

from .console import ConsoleSessions, console_router
from .core import ControlPlane
from .core.admin import ADMIN_ROUTES
from .core.metrics import Metrics, metrics_route
from .oai import OpenAIServing, oai_router


def central_mounts(protocol: str, plane: ControlPlane, routes: list[Any], *, path_prefix: str,
                   oai_prefix: str | None, scheme: str) -> tuple[list[Any], Metrics, dict[str, Any]]:
    """``(route handlers, metrics, state)`` of a central app speaking ``protocol`` (its metrics' label), whose
    ``routes`` are mounted at ``path_prefix`` and whose checkpoints are named ``scheme``."""
    handlers: list[Any] = [*routes, *ADMIN_ROUTES]
    if path_prefix:
        handlers = [Router(path=path_prefix, route_handlers=handlers)]
    if oai_prefix is not None:
        handlers.append(oai_router(oai_prefix))
    metrics = Metrics(protocol)
    plane.observers.append(metrics.finished)
    handlers += [metrics_route, console_router()]
    state = {"keyring": None, "plane": plane, "metrics": metrics, "oai": OpenAIServing(plane, scheme=scheme),
             "console": ConsoleSessions(plane), "console_scheme": scheme}
    return handlers, metrics, state
