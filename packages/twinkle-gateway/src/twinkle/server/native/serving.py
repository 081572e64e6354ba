"""What the native TwinkleServer does: sessions, training runs, checkpoints, futures, and the ``Authority``
the component apps call through a Serve handle.

Handlers in ``router.py`` only decode and encode; everything here takes decoded requests plus the caller's
principal id, and raises ``UserError`` (400/404/409/410…) for what the caller got wrong. Another principal's
run, checkpoint, session or request is reported exactly like a missing one (404).

One engine, two protocols: runs, checkpoints and sessions are the rows of the same ``Store`` the Tinker
server keeps, owned by the same principal ids, and checkpoints use the same directory layout (a
``twinkle://`` and a ``tinker://`` URI of the same run name the same files). Training requests do not pass
through here: the client sends them to the Model service's own app, which calls the same ``ModelService``
methods the Tinker front-end calls, with the client's ``seq_id``.

Long operations (create, resume, save, load) are durable futures (``tinker.futures.Futures``): the request
is written to the store before its id is returned, then runs as a task; ``/futures/{id}`` long-polls it.
A retried request is deduplicated on ``(run, seq_id)`` (saves and loads) or on the client's idempotency key
(creates and resumes), so it never runs twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import time
from typing import Any, Awaitable, Callable

import msgspec
from twinkle.common.component import PeerApp
from twinkle.common.http import distribution_version, release_seq_id
from twinkle.common.native import (
    SAVE_KINDS,
    FutureRef,
    LoadRequest,
    ResolvedCheckpoint,
    SaveRequest,
)
from twinkle.common.wire import LoraConfig, NotFoundError, UserError

from .._common import (
    Gone,
    ServedModels,
    expiry,
    info_field,
    iso,
    page_limit,
    page_offset,
    sweep_forever,
    visible_checkpoint,
)
from ..auth import KeyRing, check_auth_settings
from ..backends import ModelPort, SamplerPort
from ..checkpoints import CheckpointLayout, CheckpointRef, dir_size, parse_uri, validate_name, validate_run_id
from ..state import CheckpointRecord, FutureRecord, RunRecord, SessionRecord, Store
from ..tinker.futures import Futures
from . import protocol as P
from .settings import NativeSettings

log = logging.getLogger("twinkle.server.native")

_enc = msgspec.json.encode
Work = Callable[[], Awaitable[bytes]]
_SCHEME = "twinkle://"
_INFO_TIMEOUT_S = 10.0
_IDEMPOTENCY_KEY_MAX = 128


class NativeService(ServedModels):
    """State and behaviour of one TwinkleServer process. ``start()`` opens the store; ``close()`` ends it."""

    def __init__(self, settings: NativeSettings, *, models: dict[str, ModelPort], samplers: dict[str, SamplerPort],
                 processors: dict[str, Any] | None = None, peers: list[PeerApp] | None = None,
                 server_prefix: str = "/server") -> None:
        super().__init__(models, samplers, settings.supported_models)
        self.settings = settings
        self.processors = dict(processors or {})
        self.peers = list(peers or [])
        self.server_prefix = server_prefix
        self.layout = CheckpointLayout(settings.checkpoint_dir)
        self.keys = check_auth_settings(settings.host, settings.api_keys)
        self.store: Store | None = None
        self.futures: Futures | None = None
        self.keyring: KeyRing | None = None
        self._started = asyncio.Event()
        self._background: set[asyncio.Task] = set()
        self._sweeper: asyncio.Task | None = None

    # =============================================================================== lifecycle

    async def start(self) -> None:
        self.store = await Store.open(self.settings.state_path)
        self.futures = Futures(self.store, long_poll_s=self.settings.long_poll_timeout_s)
        await self.futures.recover()
        self.keyring = await KeyRing.load(self.store, self.keys, host=self.settings.host)
        self._sweeper = asyncio.create_task(sweep_forever(self.sweep, self.settings.sweep_interval_s, log), name="twinkle sweeper")
        self._started.set()

    async def ready(self, timeout: float = 60.0) -> None:
        """Wait until ``start()`` ran (Serve-handle calls may arrive while the app is starting)."""
        if not self._started.is_set():
            try:
                await asyncio.wait_for(self._started.wait(), timeout)
            except asyncio.TimeoutError:
                raise UserError("the server is still starting; retry in a moment", status=503) from None

    async def close(self) -> None:
        self._started.clear()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._sweeper
        if self.futures is not None:
            await self.futures.close()
        for task in list(self._background):
            task.cancel()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self.store is not None:
            await self.store.close()
        self.keyring = None

    def _spawn(self, coro: Awaitable[Any], name: str) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    @property
    def _store(self) -> Store:
        if self.store is None:
            raise UserError("the server is still starting; retry in a moment", status=503)
        return self.store

    @property
    def _futures(self) -> Futures:
        if self.futures is None:
            raise UserError("the server is still starting; retry in a moment", status=503)
        return self.futures

    # =============================================================================== Authority (components)

    async def authenticate(self, api_key: str | None) -> str:
        """The principal id of ``api_key`` — exactly the Tinker server's rules (``auth.KeyRing``)."""
        await self.ready()
        from litestar.exceptions import NotAuthorizedException

        assert self.keyring is not None
        try:
            return self.keyring.authenticate(api_key).id
        except NotAuthorizedException as e:
            raise UserError(str(e.detail), status=401) from None

    async def submit_save(self, owner: str, base_model: str, run_id: str, req: SaveRequest) -> FutureRef:
        """Start a save of run ``run_id`` (asked by the app of ``base_model``) as a future."""
        await self.ready()
        kind = SAVE_KINDS[req.kind]

        async def prepare(run: RunRecord, port: ModelPort) -> tuple[Work, str]:
            name = validate_name(req.name, field="name")
            expires = expiry(req.ttl_seconds)
            ref = CheckpointRef(run_id=run.id, kind=kind, name=name, scheme=_SCHEME)
            path = self.layout.path_for(owner, run.id, kind, name)
            if not req.overwrite and await self._store.get_checkpoint(run.id, kind, name) is not None:
                raise UserError(f"checkpoint {ref.uri} already exists; pass overwrite=True or choose another name",
                                field="name", status=409)

            async def work() -> bytes:
                if kind == "weights":
                    info = await port.save_state(run.id, owner, req.seq_id, path, include_optimizer=req.optimizer)
                else:
                    info = await port.save_sampler_weights(run.id, owner, req.seq_id, path)
                _expect(info, "size_bytes", run.id, req.seq_id)
                record = await self._record_checkpoint(owner, run, kind, name, path, info, expires)
                return _enc(self._checkpoint_out(record))

            return work, ref.uri

        return await self._numbered(owner, base_model, run_id, req.seq_id, "save", prepare)

    async def submit_load(self, owner: str, base_model: str, run_id: str, req: LoadRequest) -> FutureRef:
        """Start a load of a state checkpoint into run ``run_id`` as a future."""
        await self.ready()

        async def prepare(run: RunRecord, port: ModelPort) -> tuple[Work, str]:
            ckpt = await self._checkpoint_for(owner, req.uri, field="uri", kinds=("weights",))
            ckpt_base = await self._base_model_of(ckpt)
            if ckpt_base != run.base_model:
                raise UserError(f"{req.uri} was trained on {ckpt_base!r}; run {run.id!r} trains {run.base_model!r}",
                                field="uri")

            async def work() -> bytes:
                info = await port.load_state(run.id, owner, req.seq_id, ckpt.path, req.optimizer, create=False)
                _expect(info, "lora", run.id, req.seq_id)
                return _enc({"run_id": run.id, "uri": req.uri, "step": getattr(info, "step", None)})

            return work, req.uri

        return await self._numbered(owner, base_model, run_id, req.seq_id, "load", prepare)

    async def resolve_checkpoint(self, owner: str, uri: str, base_model: str) -> ResolvedCheckpoint:
        """A checkpoint ``owner`` may sample from with the sampler of ``base_model``."""
        await self.ready()
        ckpt = await self._checkpoint_for(owner, uri, field="model_uri")
        ckpt_base = await self._base_model_of(ckpt)
        if ckpt_base != base_model:
            raise UserError(f"{uri} was trained on {ckpt_base!r}; this sampler serves {base_model!r}",
                            field="model_uri")
        return ResolvedCheckpoint(uri=uri, run_id=ckpt.run_id, kind=ckpt.kind, name=ckpt.name, path=ckpt.path,
                                  base_model=ckpt_base)

    async def _numbered(self, owner: str, base_model: str, run_id: str, seq_id: int | None, kind: str,
                        prepare: Callable[[RunRecord, ModelPort], Awaitable[tuple[Work, str]]]) -> FutureRef:
        """Submit a numbered request of a run as a future.

        A repeat of an accepted ``seq_id`` gets the first request's future (a retried save must not fail on
        the checkpoint its first try wrote). If ``prepare`` refuses the request, its ``seq_id`` is still
        handed to the Model service as a request that fails there: the service runs a run's requests
        strictly in order and would otherwise hold every later one until its gap timeout.
        """
        if seq_id is not None and seq_id < 0:
            raise UserError("must be >= 0", field="seq_id")
        run = await self._run(owner, run_id, field="run_id")
        if run.base_model != base_model:  # asked at another model's app: that app has no such run
            raise NotFoundError(f"training run {run_id!r} not found", field="run_id")
        port = self._model_port(run.base_model)
        if seq_id is not None:
            first = await self._futures.find(run.id, seq_id)
            if first is not None and first.owner == owner:
                return FutureRef(request_id=first.request_id, kind=first.kind, run_id=run.id,
                                 uri=(first.meta or {}).get("uri"))
        try:
            work, uri = await prepare(run, port)
        except UserError:
            if seq_id is not None:
                self._spawn(release_seq_id(port, run.id, owner, seq_id, "this request was refused by the server before it ran"),
                            f"reject {run.id}#{seq_id}")
            raise
        record = await self._futures.submit(owner=owner, kind=kind, work=work, model_id=run.id, seq_id=seq_id,
                                            meta={"uri": uri}, touch_run=run.id)
        return FutureRef(request_id=record.request_id, kind=kind, run_id=run.id, uri=(record.meta or {}).get("uri"))

    # =============================================================================== helpers

    async def _run(self, owner: str, run_id: str, *, field: str = "run_id") -> RunRecord:
        validate_run_id(run_id, field=field)
        run = await self._store.get_run(run_id)
        if run is None or run.owner != owner:
            raise NotFoundError(f"training run {run_id!r} not found", field=field)
        return run

    async def _checkpoint_for(self, owner: str, uri: str, *, field: str,
                              kinds: tuple[str, ...] = ("weights", "sampler_weights")) -> CheckpointRecord:
        if not isinstance(uri, str) or not uri.startswith(("twinkle://", "tinker://")):
            raise UserError(f"{uri!r} is not a checkpoint URI; expected twinkle://<run_id>/{kinds[0]}/<name> "
                            "(server file paths are not accepted)", field=field)
        ref = parse_uri(uri, field=field, kinds=kinds)
        return await visible_checkpoint(self._store, owner, ref.run_id, ref.kind, ref.name, uri=uri, field=field)

    async def _base_model_of(self, c: CheckpointRecord) -> str:
        if c.base_model:
            return c.base_model
        run = await self._store.get_run(c.run_id)
        if run is None:
            raise NotFoundError(f"the training run of checkpoint {c.run_id}/{c.kind}/{c.name} no longer exists")
        return run.base_model

    async def _record_checkpoint(self, owner: str, run: RunRecord, kind: str, name: str, path: str, info: Any,
                                 expires: float | None) -> CheckpointRecord:
        size = getattr(info, "size_bytes", None)
        if size is None:
            size = await asyncio.to_thread(dir_size, path)
        record = CheckpointRecord(run_id=run.id, kind=kind, name=name, owner=owner, path=path, created=time.time(),
                                  size_bytes=size, expires_at=expires, base_model=run.base_model, lora=run.lora)
        await self._store.put_checkpoint(record)
        return record

    def _checkpoint_out(self, c: CheckpointRecord) -> P.CheckpointOut:
        return P.CheckpointOut(uri=f"{_SCHEME}{c.run_id}/{c.kind}/{c.name}", run_id=c.run_id, kind=c.kind,
                               name=c.name, created_at=iso(c.created) or "", size_bytes=c.size_bytes,
                               base_model=c.base_model, expires_at=iso(c.expires_at), public=c.public)

    def _prefix(self, kind: str, model: str) -> str | None:
        return next((p.route_prefix for p in self.peers if p.import_path == kind and p.model_name == model), None)

    async def _run_out(self, run: RunRecord, latest: dict[tuple[str, str], CheckpointRecord], *,
                       live: bool = False) -> P.TrainingRunOut:
        last = latest.get((run.id, "weights"))
        last_sampler = latest.get((run.id, "sampler_weights"))
        step = loaded = None
        if live and run.base_model in self.models:
            try:
                info = await asyncio.wait_for(self.models[run.base_model].run_info(run.id, run.owner), _INFO_TIMEOUT_S)
                step, loaded = info.step, True
            except NotFoundError:
                loaded = False
            except Exception as e:  # noqa: BLE001 - the store's view is still worth answering
                log.warning("could not read run %s from its model service: %s", run.id, e)
        return P.TrainingRunOut(
            run_id=run.id, base_model=run.base_model, lora=run.lora, created_at=iso(run.created) or "",
            last_request_at=iso(run.last_request) or "", protocol=run.protocol, session_id=run.session_id,
            user_metadata=run.user_metadata, model_prefix=self._prefix("model", run.base_model), step=step,
            loaded=loaded, last_checkpoint=self._checkpoint_out(last) if last else None,
            last_sampler_checkpoint=self._checkpoint_out(last_sampler) if last_sampler else None,
        )

    async def _idempotent(self, owner: str, kind: str, key: str | None, work: Work, *, run_id: str | None,
                          touch_run: str | None = None) -> FutureRef:
        """Submit ``work``; with a client idempotency key, a repeat returns the first request's future."""
        model_id = seq = None
        if key is not None:
            if not 1 <= len(key) <= _IDEMPOTENCY_KEY_MAX:
                raise UserError(f"must be 1-{_IDEMPOTENCY_KEY_MAX} characters", field="idempotency_key")
            model_id, seq = f"idem:{owner}:{kind}:{key}", 0
        record = await self._futures.submit(owner=owner, kind=kind, work=work, model_id=model_id, seq_id=seq,
                                            meta={"run_id": run_id}, touch_run=touch_run)
        return FutureRef(request_id=record.request_id, kind=record.kind,
                         run_id=(record.meta or {}).get("run_id"))

    async def _session(self, owner: str, session_id: str, *, live: bool = False) -> SessionRecord:
        s = await self._store.get_session(session_id, owner)
        if s is None:
            raise NotFoundError(f"session {session_id!r} not found", field="session_id")
        if live and s.finished is not None and s.finish_reason != "expired":
            raise Gone(f"session {session_id!r} is finished; create a new client", field="session_id")
        return s

    # =============================================================================== capabilities

    async def capabilities(self, owner: str) -> P.Capabilities:
        names = sorted(set(self.models) | set(self.samplers))
        models = []
        for name in names:
            info = await self.model_info(name)
            model_id = info_field(info, "model_id") or next(
                (p.model_id for p in self.peers if p.model_name == name and p.model_id), None)
            models.append(P.ModelCapability(
                name=name, model_id=model_id, trainable=name in self.models, sampleable=name in self.samplers,
                model_prefix=self._prefix("model", name), sampler_prefix=self._prefix("sampler", name),
                processor_prefix=self._prefix("processor", name),
                max_context_length=info_field(info, "max_context_length"), vocab_size=info_field(info, "vocab_size"),
                backend=info_field(info, "backend"),
            ))
        return P.Capabilities(
            server_type="twinkle", version=distribution_version("twinkle-gateway"), api_version=P.API_VERSION,
            server_prefix=self.server_prefix, models=models, heartbeat_interval_s=self.settings.heartbeat_interval_s,
            long_poll_timeout_s=self.settings.long_poll_timeout_s, max_body_bytes=self.settings.max_body_bytes,
            principal=owner,
        )

    async def info(self) -> dict[str, Any]:
        return {
            "server_type": "twinkle",
            "version": distribution_version("twinkle-gateway"),
            "api_version": P.API_VERSION,
            "applications": [{"name": p.app_name, "kind": p.import_path, "route_prefix": p.route_prefix,
                              "model": p.model_name} for p in self.peers],
        }

    async def health(self) -> dict[str, Any]:
        return {"status": "ok" if self._started.is_set() else "starting", "server_type": "twinkle",
                "running_requests": self.futures.running if self.futures is not None else 0}

    # =============================================================================== sessions

    async def create_session(self, owner: str, req: P.CreateSessionIn) -> P.SessionOut:
        now = time.time()
        session = SessionRecord(id="sess-" + secrets.token_hex(8), owner=owner, protocol="twinkle", created=now,
                                heartbeat=now, tags=list(req.tags), user_metadata=req.user_metadata,
                                sdk_version=req.client_version)
        await self._store.create_session(session)
        return P.SessionOut(session_id=session.id, heartbeat_interval_s=self.settings.heartbeat_interval_s,
                            session_timeout_s=self.settings.session_timeout_s)

    async def heartbeat(self, owner: str, session_id: str) -> dict[str, str]:
        s = await self._store.heartbeat(session_id, owner, time.time())
        if s is None:
            raise NotFoundError(f"session {session_id!r} not found", field="session_id")
        if s.finished is not None:
            raise Gone(f"session {session_id!r} is finished ({s.finish_reason})", field="session_id")
        return {"status": "ok"}

    async def finish_session(self, owner: str, session_id: str) -> None:
        if not await self._store.finish_session(session_id, owner, "success", time.time()):
            raise NotFoundError(f"session {session_id!r} not found", field="session_id")

    # =============================================================================== runs

    async def create_run(self, owner: str, req: P.CreateRunIn) -> FutureRef:
        port = self._model_port(req.base_model)
        lora = _lora(req.lora)
        if req.session_id is not None:
            await self._session(owner, req.session_id, live=True)
        run_id = "run-" + secrets.token_hex(8)

        async def work() -> bytes:
            info = await port.create_run(run_id, owner, lora)
            now = time.time()
            run = RunRecord(id=run_id, owner=owner, session_id=req.session_id, base_model=req.base_model,
                            lora=msgspec.to_builtins(getattr(info, "lora", None) or lora), created=now,
                            last_request=now, protocol="twinkle", user_metadata=req.user_metadata)
            await self._store.create_run(run)
            return _enc(await self._run_out(run, {}))

        return await self._idempotent(owner, "create_run", req.idempotency_key, work, run_id=run_id)

    async def resume(self, owner: str, req: P.ResumeIn) -> FutureRef:
        """From a state checkpoint URI or a run id (its latest state checkpoint); into a new run or into
        ``into_run_id``."""
        if req.source.startswith(("twinkle://", "tinker://")):
            ckpt = await self._checkpoint_for(owner, req.source, field="source", kinds=("weights",))
        else:
            source_run = await self._run(owner, req.source, field="source")
            ckpt = (await self._store.latest_checkpoints([source_run.id])).get((source_run.id, "weights"))
            if ckpt is None:
                raise NotFoundError(f"training run {source_run.id!r} has no saved state to resume from; save one "
                                    "with run.save(name)", field="source")
        base_model = await self._base_model_of(ckpt)
        port = self._model_port(base_model, field="source")
        uri = f"{_SCHEME}{ckpt.run_id}/{ckpt.kind}/{ckpt.name}"
        if req.into_run_id is not None:
            run = await self._run(owner, req.into_run_id, field="into_run_id")
            if run.base_model != base_model:
                raise UserError(f"{uri} was trained on {base_model!r}; run {run.id!r} trains {run.base_model!r}",
                                field="into_run_id")

            async def load_into() -> bytes:
                # Unnumbered: runs after everything of the run that arrived before it.
                await port.load_state(run.id, owner, None, ckpt.path, req.optimizer, create=False)
                return _enc(await self._run_out(run, await self._store.latest_checkpoints([run.id]), live=True))

            return await self._idempotent(owner, "resume", req.idempotency_key, load_into, run_id=run.id,
                                          touch_run=run.id)
        if req.session_id is not None:
            await self._session(owner, req.session_id, live=True)
        run_id = "run-" + secrets.token_hex(8)

        async def load_new() -> bytes:
            info = await port.load_state(run_id, owner, None, ckpt.path, req.optimizer, create=True)
            now = time.time()
            lora = msgspec.to_builtins(info.lora) if getattr(info, "lora", None) is not None else (ckpt.lora or {})
            user_metadata = dict(req.user_metadata or {})
            user_metadata.setdefault("resumed_from", uri)
            run = RunRecord(id=run_id, owner=owner, session_id=req.session_id, base_model=base_model, lora=lora,
                            created=now, last_request=now, protocol="twinkle", user_metadata=user_metadata)
            await self._store.create_run(run)
            out = await self._run_out(run, {})
            out.step = getattr(info, "step", None)
            out.loaded = True
            return _enc(out)

        return await self._idempotent(owner, "resume", req.idempotency_key, load_new, run_id=run_id)

    async def list_runs(self, owner: str, limit: int | None, offset: int | None) -> P.TrainingRunsOut:
        limit, offset = page_limit(limit), page_offset(offset)
        page = await self._store.list_runs(owner, limit, offset)
        latest = await self._store.latest_checkpoints([r.id for r in page.items])
        runs = [await self._run_out(r, latest) for r in page.items]
        end = offset + len(runs)
        return P.TrainingRunsOut(training_runs=runs, cursor=P.Cursor(
            offset=offset, limit=limit, total=page.total, next_offset=end if end < page.total else None))

    async def get_run(self, owner: str, run_id: str) -> P.TrainingRunOut:
        run = await self._run(owner, run_id)
        return await self._run_out(run, await self._store.latest_checkpoints([run.id]), live=True)

    async def delete_run(self, owner: str, run_id: str, *, checkpoints: bool = False) -> None:
        """Release the run's adapter and forget the run. Its checkpoints stay (and stay resumable) unless
        ``checkpoints`` is true."""
        run = await self._run(owner, run_id)
        port = self.models.get(run.base_model)
        if port is not None:
            with contextlib.suppress(NotFoundError):  # the adapter is already gone (e.g. after a restart)
                await port.delete_run(run.id, owner)
        if checkpoints:
            for c in await self._store.list_checkpoints(run.id):
                await self._store.delete_checkpoint(c.run_id, c.kind, c.name)
                await asyncio.to_thread(self.layout.remove, c.path)
        await self._store.delete_run(run.id)

    # =============================================================================== checkpoints

    async def list_checkpoints(self, owner: str, run_id: str) -> P.CheckpointsOut:
        run = await self._run(owner, run_id)
        now = time.time()
        items = [c for c in await self._store.list_checkpoints(run.id) if c.expires_at is None or c.expires_at > now]
        return P.CheckpointsOut(checkpoints=[self._checkpoint_out(c) for c in items])

    async def latest_checkpoint(self, owner: str, run_id: str, kind: str | None) -> P.CheckpointOut:
        run = await self._run(owner, run_id)
        kinds = _kinds(kind)
        now = time.time()
        items = [c for c in await self._store.list_checkpoints(run.id)
                 if c.kind in kinds and (c.expires_at is None or c.expires_at > now)]
        if not items:
            what = "checkpoint" if len(kinds) == 2 else f"{kinds[0]} checkpoint"
            raise NotFoundError(f"training run {run.id!r} has no {what}", field="run_id")
        return self._checkpoint_out(max(items, key=lambda c: c.created))

    async def list_user_checkpoints(self, owner: str, limit: int | None, offset: int | None) -> P.CheckpointsOut:
        limit, offset = page_limit(limit, default=100), page_offset(offset)
        page = await self._store.list_user_checkpoints(owner, limit, offset)
        end = offset + len(page.items)
        return P.CheckpointsOut(checkpoints=[self._checkpoint_out(c) for c in page.items], cursor=P.Cursor(
            offset=offset, limit=limit, total=page.total, next_offset=end if end < page.total else None))

    async def delete_checkpoint(self, owner: str, run_id: str, kind: str, name: str) -> None:
        validate_run_id(run_id, field="run_id")
        if kind not in ("weights", "sampler_weights"):
            raise UserError(f"kind {kind!r} must be weights or sampler_weights", field="kind")
        validate_name(name, field="name")
        c = await self._store.get_checkpoint(run_id, kind, name)
        if c is None or c.owner != owner:
            raise NotFoundError(f"checkpoint {_SCHEME}{run_id}/{kind}/{name} not found", field="uri")
        await self._store.delete_checkpoint(c.run_id, c.kind, c.name)
        await asyncio.to_thread(self.layout.remove, c.path)

    # =============================================================================== futures

    async def wait_future(self, owner: str, request_id: str, timeout: float | None) -> P.FutureOut:
        if timeout is None:
            timeout = self.settings.long_poll_timeout_s
        if not math.isfinite(timeout) or timeout < 0:
            raise UserError("must be a number of seconds >= 0", field="timeout")
        timeout = min(timeout, self.settings.long_poll_timeout_s)
        record = await self._futures.wait(request_id, owner, timeout=timeout)
        if record is None:
            raise NotFoundError(f"request {request_id!r} not found (unknown, or its result has expired)",
                                field="request_id")
        return _future_out(record)

    # =============================================================================== housekeeping

    async def sweep(self) -> dict[str, int]:
        """One cleanup pass: expired checkpoints, old results, silent sessions."""
        now = time.time()
        store = self._store
        expired = await store.expired_checkpoints(now)
        for c in expired:
            await store.delete_checkpoint(c.run_id, c.kind, c.name)
            await asyncio.to_thread(self.layout.remove, c.path)
        pruned = await store.prune_futures(now - self.settings.future_ttl_s, now - self.settings.fetched_result_ttl_s)
        closed = await store.expire_sessions(now - self.settings.session_timeout_s, now)
        return {"checkpoints": len(expired), "futures": pruned, "sessions": len(closed)}


# =================================================================================== helpers



def _expect(out: Any, attribute: str, run_id: str, seq_id: int | None) -> None:
    """The Model service answers a repeated ``seq_id`` with its first request's result; if that was another
    operation (two clients numbering one run), fail instead of recording a checkpoint that was not written."""
    if not hasattr(out, attribute):
        raise UserError(f"seq_id {seq_id} of run {run_id!r} was already used by another kind of request; continue "
                        "from the run's next_seq_id", field="seq_id", status=409)


def _future_out(record: FutureRecord) -> P.FutureOut:
    end = record.finished or time.time()
    out = P.FutureOut(request_id=record.request_id, status=record.status, kind=record.kind,
                      elapsed_s=round(max(0.0, end - record.created), 3))
    if record.status == "done":
        out.result = msgspec.Raw(record.result or b"null")
    elif record.status == "failed":
        out.error = P.FutureError(detail=record.error or "request failed", category=record.category or "server")
    return out


def _lora(cfg: P.LoraIn) -> LoraConfig:
    if not 1 <= cfg.rank <= 1024:
        raise UserError("must be between 1 and 1024", field="lora.rank")
    if cfg.alpha is not None and (not math.isfinite(cfg.alpha) or cfg.alpha <= 0):
        raise UserError("must be a positive number", field="lora.alpha")
    if not 0.0 <= cfg.dropout < 1.0:
        raise UserError("must be in [0, 1)", field="lora.dropout")
    if not (cfg.train_attn or cfg.train_mlp or cfg.train_unembed):
        raise UserError("at least one of train_attn, train_mlp and train_unembed must be true", field="lora")
    alpha = LoraConfig().alpha if cfg.alpha is None else cfg.alpha
    return LoraConfig(rank=cfg.rank, alpha=alpha, seed=cfg.seed, train_attn=cfg.train_attn, train_mlp=cfg.train_mlp,
                      train_unembed=cfg.train_unembed, dropout=cfg.dropout)


def _kinds(kind: str | None) -> tuple[str, ...]:
    if kind in (None, "", "any"):
        return ("weights", "sampler_weights")
    mapped = SAVE_KINDS.get(kind, kind)
    if mapped not in ("weights", "sampler_weights"):
        raise UserError(f"kind {kind!r} must be state, sampler, weights, sampler_weights or any", field="kind")
    return (mapped,)

