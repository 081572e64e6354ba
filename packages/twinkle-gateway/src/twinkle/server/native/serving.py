"""The native TwinkleServer over the ``ControlPlane``: the native ids, bodies and rules, nothing else.

Handlers in ``router.py`` decode and encode; each method here takes a decoded request plus the caller's
principal id. State and the rules both protocols share are the control plane's, so a ``twinkle://`` and a
``tinker://`` URI of the same run name the same files, under the same keys and owners.

Long operations (create, resume, save, load) are durable futures; ``/futures/{id}`` long-polls them. A
retried create or resume with the client's ``idempotency_key`` returns the first request's future.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from typing import Any, Callable

import msgspec
from twinkle.common.component import PeerApp
from twinkle.common.http import distribution_version
from twinkle.common.limits import check_lora, check_metadata, check_tags
from twinkle.common.native import FutureRef
from twinkle.common.wire import NotFoundError, UserError

from ..auth import Principal
from ..core import ControlPlane, iso
from ..core.checkpoints import validate_name
from ..core.usage import audit_window, usage_window
from ..core.ports import ModelPort, SamplerPort
from ..core.state import CheckpointRecord, FutureRecord, RunRecord, SessionRecord
from . import protocol as P
from .authority import NativeAuthority
from .convert import SCHEME, checkpoint_kinds, checkpoint_out, future_out, lora_config, resolve_uri, run_out
from .settings import NativeSettings

log = logging.getLogger("twinkle.server.native")

_INFO_TIMEOUT_S = 10.0
_IDEMPOTENCY_KEY_MAX = 128


class NativeService:
    """The native surface of one central server process (its app's lifespan runs the control plane)."""

    def __init__(self, settings: NativeSettings, *, models: dict[str, ModelPort], samplers: dict[str, SamplerPort],
                 peers: list[PeerApp] | None = None, server_prefix: str = "/server") -> None:
        self.settings = settings
        self.plane = ControlPlane(settings, models=models, samplers=samplers)
        self.authority = NativeAuthority(self.plane)
        self.peers = list(peers or [])
        self.server_prefix = server_prefix

    def _prefix(self, kind: str, model: str) -> str | None:
        return next((p.route_prefix for p in self.peers if p.import_path == kind and p.model_name == model), None)

    async def _run_out(self, run: RunRecord, latest: dict[tuple[str, str], CheckpointRecord], *,
                       live: bool = False) -> P.TrainingRunOut:
        step = loaded = None
        port = self.plane.models.get(run.base_model)
        if live and port is not None:
            try:
                info = await asyncio.wait_for(port.run_info(run.id, run.owner), _INFO_TIMEOUT_S)
                step, loaded = info.step, True
            except NotFoundError:
                loaded = False
            except Exception as e:  # noqa: BLE001 - the store's view is still worth answering
                log.warning("could not read run %s from its model service: %s", run.id, e)
        return run_out(run, latest, model_prefix=self._prefix("model", run.base_model), step=step, loaded=loaded)

    async def _idempotent(self, owner: str, kind: str, key: str | None, work: Any, *, run_id: str,
                          touch_run: str | None = None) -> FutureRef:
        """Submit ``work``; with a client idempotency key, a repeat returns the first request's future."""
        dedupe = None
        if key is not None:
            if not 1 <= len(key) <= _IDEMPOTENCY_KEY_MAX:
                raise UserError(f"must be 1-{_IDEMPOTENCY_KEY_MAX} characters", field="idempotency_key")
            dedupe = (f"idem:{owner}:{kind}:{key}", 0)
        record = await self.plane.submit(owner, kind, work, dedupe=dedupe, meta={"run_id": run_id},
                                         touch_run=touch_run)
        return FutureRef(request_id=record.request_id, kind=record.kind, run_id=(record.meta or {}).get("run_id"))

    # =============================================================================== capabilities

    async def capabilities(self, owner: str) -> P.Capabilities:
        models = []
        for name in self.plane.served_names():
            info = await self.plane.model_info(name)
            model_id = getattr(info, "model_id", None) or next(
                (p.model_id for p in self.peers if p.model_name == name and p.model_id), None)
            models.append(P.ModelCapability(
                name=name, model_id=model_id, trainable=name in self.plane.models,
                sampleable=name in self.plane.samplers, model_prefix=self._prefix("model", name),
                sampler_prefix=self._prefix("sampler", name), processor_prefix=self._prefix("processor", name),
                max_context_length=getattr(info, "max_context_length", None),
                vocab_size=getattr(info, "vocab_size", None), backend=getattr(info, "backend", None),
            ))
        return P.Capabilities(
            server_type="twinkle", version=distribution_version("twinkle-gateway"), api_version=P.API_VERSION,
            server_prefix=self.server_prefix, models=models, heartbeat_interval_s=self.settings.heartbeat_interval_s,
            long_poll_timeout_s=self.settings.long_poll_timeout_s, max_body_bytes=self.settings.max_body_bytes,
            principal=owner, limits=msgspec.to_builtins(self.settings.limits),
        )

    async def info(self) -> dict[str, Any]:
        return {
            "server_type": "twinkle",
            "version": distribution_version("twinkle-gateway"),
            "api_version": P.API_VERSION,
            "applications": [{"name": p.app_name, "kind": p.import_path, "route_prefix": p.route_prefix,
                              "model": p.model_name} for p in self.peers],
        }

    async def health(self) -> tuple[dict[str, Any], int]:
        """(body, status): 200 when this server and every model and sampler behind it answer, else 503."""
        down = await self.plane.health()
        body: dict[str, Any] = {"status": "unavailable" if down else "ok", "server_type": "twinkle"}
        if down:
            body["unavailable"] = down
        return body, 503 if down else 200

    # =============================================================================== sessions

    async def create_session(self, owner: str, req: P.CreateSessionIn) -> P.SessionOut:
        now = time.time()
        session = await self.plane.open_session(SessionRecord(
            id="sess-" + secrets.token_hex(8), owner=owner, protocol="twinkle", created=now, heartbeat=now,
            tags=check_tags(req.tags, limits=self.settings.limits),
            user_metadata=check_metadata(req.user_metadata, limits=self.settings.limits), sdk_version=req.client_version))
        return P.SessionOut(session_id=session.id, heartbeat_interval_s=self.settings.heartbeat_interval_s,
                            session_timeout_s=self.settings.session_timeout_s)

    async def heartbeat(self, owner: str, session_id: str) -> dict[str, str]:
        await self.plane.heartbeat(owner, session_id)
        return {"status": "ok"}

    async def finish_session(self, owner: str, session_id: str) -> None:
        await self.plane.finish_session(owner, session_id)

    # =============================================================================== runs

    async def create_run(self, owner: str, req: P.CreateRunIn) -> FutureRef:
        base_model = await self.plane.served_name(req.base_model)
        port = self.plane.model_port(base_model)
        limits = self.settings.limits
        lora = check_lora(lora_config(req.lora), "lora", limits=limits)
        check_metadata(req.user_metadata, limits=limits)
        if req.session_id is not None:
            await self.plane.session(owner, req.session_id, live=True)
        run_id = "run-" + secrets.token_hex(8)

        async def work() -> P.TrainingRunOut:
            info = await port.create_run(run_id, owner, lora)
            now = time.time()
            run = await self.plane.record_run(RunRecord(
                id=run_id, owner=owner, session_id=req.session_id, base_model=base_model,
                lora=msgspec.to_builtins(getattr(info, "lora", None) or lora), created=now, last_request=now,
                protocol="twinkle", user_metadata=req.user_metadata))
            return await self._run_out(run, {})

        return await self._idempotent(owner, "create_run", req.idempotency_key, work, run_id=run_id)

    async def resume(self, owner: str, req: P.ResumeIn) -> FutureRef:
        """From a state checkpoint URI or a run id (its latest state checkpoint); into a new run or into
        ``into_run_id``."""
        check_metadata(req.user_metadata, limits=self.settings.limits)
        if req.source.startswith((SCHEME, "tinker://")):
            ckpt = await resolve_uri(self.plane, owner, req.source, field="source", kinds=("weights",))
        else:
            source_run = await self.plane.run(owner, req.source, field="source")
            ckpt = (await self.plane.latest_checkpoints(source_run.id)).get((source_run.id, "weights"))
            if ckpt is None:
                raise NotFoundError(f"training run {source_run.id!r} has no saved state to resume from; save one "
                                    "with run.save(name)", field="source")
        base_model = await self.plane.base_model_of(ckpt, field="source")
        port = self.plane.model_port(base_model, field="source")
        uri = f"{SCHEME}{ckpt.run_id}/{ckpt.kind}/{ckpt.name}"
        if req.into_run_id is not None:
            run = await self.plane.run(owner, req.into_run_id, field="into_run_id")
            if run.base_model != base_model:
                raise UserError(f"{uri} was trained on {base_model!r}; run {run.id!r} trains {run.base_model!r}",
                                field="into_run_id")

            async def load_into() -> P.TrainingRunOut:
                # Unnumbered: runs after everything of the run that arrived before it.
                await port.load_state(run.id, owner, None, ckpt.path, req.optimizer, create=False)
                return await self._run_out(run, await self.plane.latest_checkpoints(run.id), live=True)

            return await self._idempotent(owner, "resume", req.idempotency_key, load_into, run_id=run.id,
                                          touch_run=run.id)
        if req.session_id is not None:
            await self.plane.session(owner, req.session_id, live=True)
        run_id = "run-" + secrets.token_hex(8)

        async def load_new() -> P.TrainingRunOut:
            info = await port.load_state(run_id, owner, None, ckpt.path, req.optimizer, create=True)
            now = time.time()
            lora = msgspec.to_builtins(info.lora) if getattr(info, "lora", None) is not None else (ckpt.lora or {})
            user_metadata = dict(req.user_metadata or {})
            user_metadata.setdefault("resumed_from", uri)
            run = await self.plane.record_run(RunRecord(
                id=run_id, owner=owner, session_id=req.session_id, base_model=base_model, lora=lora, created=now,
                last_request=now, protocol="twinkle", user_metadata=user_metadata))
            out = await self._run_out(run, {})
            out.step = getattr(info, "step", None)
            out.loaded = True
            return out

        return await self._idempotent(owner, "resume", req.idempotency_key, load_new, run_id=run_id)

    async def list_runs(self, owner: str, limit: int | None, offset: int | None) -> P.TrainingRunsOut:
        limit, offset = self.plane.page(limit, offset)
        page, latest = await self.plane.list_runs(owner, limit, offset)
        runs = [await self._run_out(r, latest) for r in page.items]
        return P.TrainingRunsOut(training_runs=runs, cursor=_cursor(offset, limit, len(runs), page.total))

    async def get_run(self, owner: str, run_id: str) -> P.TrainingRunOut:
        run = await self.plane.run(owner, run_id, field="run_id")
        return await self._run_out(run, await self.plane.latest_checkpoints(run.id), live=True)

    async def delete_run(self, owner: str, run_id: str, *, checkpoints: bool = False) -> None:
        """Release the run's adapter and forget the run. Its checkpoints stay (and stay resumable) unless
        ``checkpoints`` is true."""
        await self.plane.delete_run(owner, await self.plane.run(owner, run_id, field="run_id"),
                                    checkpoints=checkpoints)

    # =============================================================================== checkpoints

    async def list_checkpoints(self, owner: str, run_id: str) -> P.CheckpointsOut:
        run = await self.plane.run(owner, run_id, field="run_id")
        return P.CheckpointsOut(checkpoints=[checkpoint_out(c) for c in await self.plane.run_checkpoints(run.id)])

    async def latest_checkpoint(self, owner: str, run_id: str, kind: str | None) -> P.CheckpointOut:
        run = await self.plane.run(owner, run_id, field="run_id")
        kinds = checkpoint_kinds(kind)
        items = await self.plane.run_checkpoints(run.id, kinds)
        if not items:
            what = "checkpoint" if len(kinds) == 2 else f"{kinds[0]} checkpoint"
            raise NotFoundError(f"training run {run.id!r} has no {what}", field="run_id")
        return checkpoint_out(max(items, key=lambda c: c.created))

    async def list_user_checkpoints(self, owner: str, limit: int | None, offset: int | None) -> P.CheckpointsOut:
        limit, offset = self.plane.page(limit, offset, default=100)
        page = await self.plane.user_checkpoints(owner, limit, offset)
        return P.CheckpointsOut(checkpoints=[checkpoint_out(c) for c in page.items],
                                cursor=_cursor(offset, limit, len(page.items), page.total))

    async def delete_checkpoint(self, owner: str, run_id: str, kind: str, name: str) -> None:
        await self.plane.delete_checkpoint(await self._own_checkpoint(owner, run_id, kind, name), actor=owner)

    async def checkpoint_archive(self, owner: str, run_id: str, kind: str, name: str
                                 ) -> tuple[str, str, Callable[[], None]]:
        c = await self._own_checkpoint(owner, run_id, kind, name)
        return await self.plane.checkpoint_archive(c, owner, purpose="download")

    async def _own_checkpoint(self, owner: str, run_id: str, kind: str, name: str) -> CheckpointRecord:
        if kind not in ("weights", "sampler_weights"):
            raise UserError(f"kind {kind!r} must be weights or sampler_weights", field="kind")
        validate_name(name, field="name")
        return await self.plane.own_checkpoint(owner, run_id, kind, name, field="uri",
                                               uri=f"{SCHEME}{run_id}/{kind}/{name}")

    # =============================================================================== usage

    async def run_history(self, owner: str, run_id: str, after_step: int, limit: int | None) -> P.RunHistoryOut:
        return P.RunHistoryOut(steps=[P.RunStep(**s) for s in
                                      await self.plane.run_history(owner, run_id, after_step, limit)])

    async def usage(self, user: Principal, starting_on: str, ending_before: str) -> P.UsageOut:
        """The caller's usage per UTC hour in ``[starting_on, ending_before)``; every key's for an admin key."""
        start, end = usage_window(starting_on, ending_before)
        rows = await self.plane.store.usage_buckets(None if user.admin else user.id, start, end)
        return P.UsageOut(buckets=[P.UsageBucket(hour_start=iso(hour), owner=owner, kind=kind, quantity=quantity,
                                                 session_id=session_id or None, base_model=base_model or None)
                                   for owner, hour, session_id, base_model, kind, quantity in rows])

    async def audit(self, user: Principal, event_type: str, day: str | None) -> P.AuditOut:
        """Who created, read, published or deleted what of the caller's (every key's for an admin key) on a UTC
        day (default today)."""
        prefix, start, end = audit_window(event_type, day)
        rows = await self.plane.store.audit_entries(None if user.admin else user.id, prefix, start, end,
                                                    self.plane.settings.limits.max_page_size)
        return P.AuditOut(entries=[P.AuditEntry(time=iso(t), owner=owner, event=event, details=details)
                                   for t, owner, event, details in rows])

    # =============================================================================== futures

    async def wait_future(self, owner: str, request_id: str, timeout: float | None) -> P.FutureOut:
        longest = self.settings.long_poll_timeout_s
        if timeout is not None and (not math.isfinite(timeout) or timeout < 0):
            raise UserError("must be a number of seconds >= 0", field="timeout")
        record: FutureRecord = await self.plane.wait(owner, request_id, longest if timeout is None
                                                     else min(timeout, longest))
        return future_out(record)


def _cursor(offset: int, limit: int, count: int, total: int) -> P.Cursor:
    end = offset + count
    return P.Cursor(offset=offset, limit=limit, total=total, next_offset=end if end < total else None)

