"""Serving helpers both central apps share (``tinker.serving.TinkerService``, ``native.serving.NativeService``):
the served models and their cached ``info()``, checkpoint visibility, paging and expiry arguments, timestamps,
and the periodic cleanup loop. The protocols' own surfaces stay in their packages."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime, timezone
from typing import Any, Awaitable, Callable

from twinkle.common.wire import NotFoundError, UserError

from .backends import ModelPort, SamplerPort
from .state import CheckpointRecord, Store

log = logging.getLogger("twinkle.server")

_INFO_TIMEOUT_S = 10.0


def iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, tz=timezone.utc).isoformat().replace("+00:00", "Z")


def info_field(info: Any, name: str) -> Any:
    """A field of a service's ``info()``: a struct in-process (the model service), a dict through a deployment
    or from the sampler."""
    if info is None:
        return None
    if isinstance(info, dict):
        return info.get(name)
    return getattr(info, name, None)


class Gone(UserError):
    """The resource existed but is finished (HTTP 410; the Tinker SDK stops heartbeating on it)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message, field=field, status=410)


def page_limit(limit: int | None, *, default: int = 20, cap: int = 1000) -> int:
    if limit is None:
        return default
    if limit < 1:
        raise UserError("must be >= 1", field="limit")
    return min(limit, cap)


def page_offset(offset: int | None) -> int:
    if offset is None:
        return 0
    if offset < 0:
        raise UserError("must be >= 0", field="offset")
    return offset


def expiry(ttl_seconds: int | None, field: str = "ttl_seconds") -> float | None:
    if ttl_seconds is None:
        return None
    if ttl_seconds <= 0:
        raise UserError("must be a positive number of seconds (or null for no expiry)", field=field)
    return time.time() + ttl_seconds


async def visible_checkpoint(store: Store, owner: str, run_id: str, kind: str, name: str, *, uri: str, field: str,
                             allow_public: bool = True) -> CheckpointRecord:
    """The checkpoint if ``owner`` may use it (theirs, or published) and it has not expired; else 404 (another
    principal's checkpoint is reported exactly like a missing one)."""
    c = await store.get_checkpoint(run_id, kind, name)
    if c is None or not (c.owner == owner or (allow_public and c.public)):
        raise NotFoundError(f"checkpoint {uri} not found", field=field)
    if c.expires_at is not None and c.expires_at <= time.time():
        raise NotFoundError(f"checkpoint {uri} has expired", field=field)
    return c


class ServedModels:
    """The model and sampler ports a central app serves (only ``supported_models``, when given), and their
    ``info()``, cached once read."""

    def __init__(self, models: dict[str, ModelPort], samplers: dict[str, SamplerPort],
                 supported_models: list[str] | None) -> None:
        allowed = set(supported_models) if supported_models is not None else None
        self.models = {k: v for k, v in models.items() if allowed is None or k in allowed}
        self.samplers = {k: v for k, v in samplers.items() if allowed is None or k in allowed}
        self._model_info: dict[str, Any] = {}

    def _model_port(self, base_model: str, *, field: str = "base_model") -> ModelPort:
        port = self.models.get(base_model)
        if port is None:
            served = ", ".join(sorted(self.models)) or "none"
            raise UserError(f"unknown base_model {base_model!r}; this server trains: {served}", field=field)
        return port

    async def model_info(self, name: str) -> Any | None:
        """``info()`` of the model (or sampler) serving ``name``, cached; None while it cannot answer."""
        if name in self._model_info:
            return self._model_info[name]
        port = self.models.get(name) or self.samplers.get(name)
        if port is None:
            return None
        try:
            info = await asyncio.wait_for(port.info(), _INFO_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - capabilities degrade gracefully while a peer starts
            log.warning("could not read info of model %s: %s", name, e)
            return None
        self._model_info[name] = info
        return info


async def sweep_forever(sweep: Callable[[], Awaitable[dict[str, int]]], interval: float,
                        logger: logging.Logger) -> None:
    """Run ``sweep()`` every ``interval`` seconds until cancelled, logging what it cleaned up."""
    while True:
        try:
            counts = await sweep()
            if any(counts.values()):
                logger.info("cleanup: %s", counts)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - the sweeper must survive a bad pass
            logger.exception("cleanup pass failed")
        await asyncio.sleep(interval)
