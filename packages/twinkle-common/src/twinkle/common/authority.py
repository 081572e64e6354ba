"""How a component app (model, sampler, processor) authenticates callers and handles checkpoints without an
HTTP hop back through the proxy.

The central server owns the API keys, the durable store and the checkpoint layout. A component asks it,
through a Ray Serve handle on the central deployment (``serve.get_deployment_handle``), to:

- ``authenticate(api_key) -> principal id`` — the same keys, hashing and principal ids as the Tinker
  server (``twinkle.server.auth``); an unknown key is a 401 ``UserError``;
- ``submit_save`` / ``submit_load`` — start a checkpoint save or load of a run as a durable future in the
  central store; the central server then calls this Model service back through its own handle with the
  resolved directory, so the client never sends or sees a server path, and the checkpoint is recorded
  only after it was written;
- ``resolve_checkpoint(principal, uri, base_model)`` — the directory of a checkpoint the caller may read
  (its own, or a published one), for the sampler;
- ``report(outcomes)`` — what the training and sampling requests the component served used
  (``twinkle.common.outcomes``), for the central server's usage accounting, run histories and metrics.

Principals are cached here for ``ttl_s`` (30 s): a training loop makes one central round trip per key every
half minute, not one per step. A key removed from the config takes effect within that time.

``Authority`` is a protocol so that tests pass the central service object itself (same methods, same
loop) instead of a handle.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import Any, Protocol, runtime_checkable

from .native import FutureRef, LoadRequest, ResolvedCheckpoint, SaveRequest
from .outcomes import Outcome
from .wire import ServiceUnavailable, UserError, remote_call

API_KEY_HEADER = "x-api-key"


@runtime_checkable
class Authority(Protocol):
    async def authenticate(self, api_key: str | None) -> str: ...

    async def submit_save(self, owner: str, base_model: str, run_id: str, req: SaveRequest) -> FutureRef: ...

    async def submit_load(self, owner: str, base_model: str, run_id: str, req: LoadRequest) -> FutureRef: ...

    async def resolve_checkpoint(self, owner: str, uri: str, base_model: str) -> ResolvedCheckpoint: ...

    async def report(self, outcomes: list[Outcome]) -> None: ...


class CachingAuthority:
    """Wraps an ``Authority``: remembers successful authentications for ``ttl_s`` seconds (keyed by a digest
    of the key, so raw keys are not kept), forwards everything else."""

    def __init__(self, inner: Authority, ttl_s: float = 30.0, max_entries: int = 4096) -> None:
        self.inner = inner
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._cache: dict[bytes, tuple[str, float]] = {}

    async def authenticate(self, api_key: str | None) -> str:
        if not api_key:
            return await self.inner.authenticate(api_key)  # the central server words the 401
        digest = hashlib.sha256(api_key.encode()).digest()
        now = time.monotonic()
        hit = self._cache.get(digest)
        if hit is not None and hit[1] > now:
            return hit[0]
        principal = await self.inner.authenticate(api_key)
        if len(self._cache) >= self.max_entries:
            self._cache = {k: v for k, v in self._cache.items() if v[1] > now}
            if len(self._cache) >= self.max_entries:
                self._cache.clear()
        self._cache[digest] = (principal, now + self.ttl_s)
        return principal

    async def submit_save(self, owner: str, base_model: str, run_id: str, req: SaveRequest) -> FutureRef:
        return await self.inner.submit_save(owner, base_model, run_id, req)

    async def submit_load(self, owner: str, base_model: str, run_id: str, req: LoadRequest) -> FutureRef:
        return await self.inner.submit_load(owner, base_model, run_id, req)

    async def resolve_checkpoint(self, owner: str, uri: str, base_model: str) -> ResolvedCheckpoint:
        return await self.inner.resolve_checkpoint(owner, uri, base_model)

    async def report(self, outcomes: list[Outcome]) -> None:
        await self.inner.report(outcomes)


class HandleAuthority:
    """The central server deployment as an ``Authority``, through a Serve handle resolved on first use
    (the central app may still be deploying when this component starts)."""

    def __init__(self, deployment_name: str, app_name: str, *, timeout_s: float = 60.0) -> None:
        self.deployment_name = deployment_name
        self.app_name = app_name
        self.timeout_s = timeout_s
        self._handle: Any = None

    @property
    def handle(self) -> Any:
        if self._handle is None:
            from ray import serve

            self._handle = serve.get_deployment_handle(self.deployment_name, app_name=self.app_name)
        return self._handle

    async def _call(self, method: str, *args: Any) -> Any:
        try:
            return await asyncio.wait_for(remote_call(getattr(self.handle, method).remote(*args)), self.timeout_s)
        except asyncio.TimeoutError:
            raise UserError("the central server did not answer in time; retry shortly", status=503) from None
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - a central server that is down is a 503, not a 500
            if _is_unavailable(e):
                raise UserError("the central server is not available right now; retry shortly",
                                status=503) from None
            raise

    async def authenticate(self, api_key: str | None) -> str:
        return await self._call("authenticate", api_key)

    async def submit_save(self, owner: str, base_model: str, run_id: str, req: SaveRequest) -> FutureRef:
        return await self._call("submit_save", owner, base_model, run_id, req)

    async def submit_load(self, owner: str, base_model: str, run_id: str, req: LoadRequest) -> FutureRef:
        return await self._call("submit_load", owner, base_model, run_id, req)

    async def resolve_checkpoint(self, owner: str, uri: str, base_model: str) -> ResolvedCheckpoint:
        return await self._call("resolve_checkpoint", owner, uri, base_model)

    async def report(self, outcomes: list[Outcome]) -> None:
        await self._call("report", outcomes)


def _is_unavailable(e: BaseException) -> bool:
    """A central server that is down or restarting (``remote_call`` turns a lost replica into
    ``ServiceUnavailable``; Serve raises ``DeploymentUnavailableError`` while none is up)."""
    if isinstance(e, ServiceUnavailable):
        return True
    try:
        from ray.serve.exceptions import DeploymentUnavailableError
    except ImportError:  # pragma: no cover - older Ray
        return False
    return isinstance(e, DeploymentUnavailableError)


def central_authority(spec: Any) -> Authority | None:
    """The authority of a deployed component (``ComponentSpec``): the central server of a twinkle-mode
    deployment, or None (no native routes: the Tinker protocol has its own front-end)."""
    central = getattr(spec, "central", None)
    if getattr(spec, "server_type", None) != "twinkle" or central is None:
        return None
    return CachingAuthority(HandleAuthority(central.deployment_name, central.app_name))


async def principal_of(request: Any, authority: Authority) -> str:
    """The principal id of an HTTP request to a component app (401 without a valid ``X-API-Key``)."""
    return await authority.authenticate(request.headers.get(API_KEY_HEADER))
