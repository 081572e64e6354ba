"""Operator routes, the same under both protocols (``GET <prefix>/admin/usage``, ``…/admin/services``).

Only a principal with the admin role (``admin_keys``, or the local user of an open-mode server) may read them;
anyone else gets 403. Everything else a tenant can read is about its own resources: these are the one place
that shows every tenant's usage and the services' internals (workers with pids and hosts, queues, engine
settings), which the components' own ``/info`` and ``/healthz`` no longer show to the public.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
from litestar import Request, get
from litestar.exceptions import PermissionDeniedException

from ..auth import Principal


def _plane(request: Request):
    return request.app.state.service.plane


def _require_admin(request: Request) -> None:
    user: Principal | None = request.user
    if user is None or not user.admin:
        raise PermissionDeniedException(detail="this route needs an admin key (admin_keys / role: admin)")


@get("/admin/usage")
async def admin_usage(request: Request) -> dict[str, Any]:
    """Per principal: runs, open sessions, requests queued or running, checkpoints and their bytes."""
    _require_admin(request)
    return {"principals": await _plane(request).usage()}


@get("/admin/services")
async def admin_services(request: Request) -> dict[str, Any]:
    """Every model and sampler service's full ``info()`` and ``health()``."""
    _require_admin(request)
    return {"services": await describe_services(_plane(request))}


async def describe_services(plane: Any) -> list[dict[str, Any]]:
    """Every model and sampler service's full ``info()`` and ``health()`` (for admins only: it shows workers,
    queues and engine settings)."""

    async def describe(kind: str, name: str, port: Any) -> dict[str, Any]:
        try:
            info, health = await asyncio.wait_for(asyncio.gather(port.info(), port.health()), 10.0)
        except Exception as e:  # noqa: BLE001 - a service that does not answer is reported, not raised
            return {"kind": kind, "name": name, "error": type(e).__name__}
        return {"kind": kind, "name": name, "info": msgspec.to_builtins(info), "health": msgspec.to_builtins(health)}

    found = await asyncio.gather(*[describe("model", n, p) for n, p in plane.models.items()],
                                 *[describe("sampler", n, p) for n, p in plane.samplers.items()])
    return list(found)


ADMIN_ROUTES = [admin_usage, admin_services]
