"""What the Tinker API does: sessions, training runs, futures, sampling, checkpoints and the REST reads.

Handlers in ``router.py`` only parse and render; everything here takes decoded requests plus the caller's
principal id and returns response structs (or a ``FutureRecord`` for long calls), raising ``UserError``
(400/404/410/413…) for what the caller got wrong. Another principal's resource is reported exactly like a
missing one.

Identifiers follow the official service, because the SDK derives some of them itself:
training runs are ``{session_id}:train:{model_seq_id}``, sampling sessions ``{session_id}:sample:{n}``,
checkpoints ``tinker://{run_id}/{weights|sampler_weights}/{name}``.

Ordering: the SDK numbers a training client's requests (``seq_id``) and sends forward/backward chunks in
parallel, first chunk last. The Model service executes each run's requests in ``seq_id`` order and
deduplicates them; the gateway passes ``seq_id`` through untouched and deduplicates submissions itself
(``Futures``) so a retried POST never starts a second execution.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import secrets
import time
from typing import Any, Awaitable, Callable

import msgspec

from twinkle.common.http import release_seq_id

from twinkle.common.wire import (
    ForwardBackwardInput,
    NotFoundError,
    SampleRequest,
    UserError,
)

from .._common import Gone, ServedModels, expiry, info_field, iso, page_limit, page_offset, visible_checkpoint
from ..backends import ModelPort, SamplerPort
from ..checkpoints import (
    CHECKPOINT_TYPE,
    EPHEMERAL,
    CheckpointLayout,
    CheckpointRef,
    dir_size,
    parse_checkpoint_id,
    parse_uri,
    validate_name,
    validate_run_id,
)
from ..state import CheckpointRecord, RunRecord, SamplerRecord, SessionRecord, Store
from . import protocol as P
from .convert import (
    adam_params,
    check_optimizer,
    default_name,
    input_tokens,
    lora_config,
    reject_unsupported_sampling,
    render_result,
    sampling_params,
    str_metadata,
)
from .futures import Futures
from .settings import TinkerSettings

log = logging.getLogger("twinkle.server.tinker")
_REFUSED = "the server refused this request (see its submit response)"

_enc = msgspec.json.encode
Work = Callable[[], Awaitable[bytes]]
_MAX_NUM_SAMPLES = 1024
# Rendered results kept for re-polls (the SDK re-fetches after a network error): a few, none huge.
_RENDER_CACHE_ITEMS = 256
_RENDER_CACHE_ITEM_BYTES = 1 << 20


class TinkerService(ServedModels):
    """State and behaviour of one Tinker-compatible server process."""

    def __init__(self, settings: TinkerSettings, store: Store, models: dict[str, ModelPort],
                 samplers: dict[str, SamplerPort]) -> None:
        super().__init__(models, samplers, settings.supported_models)
        self.settings = settings
        self.store = store
        self.layout = CheckpointLayout(settings.checkpoint_dir)
        self.futures = Futures(store, long_poll_s=settings.long_poll_timeout_s)
        self._runs: dict[str, RunRecord] = {}
        self._rendered: collections.OrderedDict[tuple[str, bool], tuple[bytes, str]] = collections.OrderedDict()
        self._background: set[asyncio.Task] = set()

    # =============================================================================== helpers

    def _spawn(self, coro: Awaitable[Any], name: str) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task %s failed", task.get_name(), exc_info=task.exception())

    async def _session(self, owner: str, session_id: str, *, live: bool = False) -> SessionRecord:
        s = await self.store.get_session(session_id, owner)
        if s is None:
            raise NotFoundError(f"session {session_id!r} not found", field="session_id")
        if live and s.finished is not None and s.finish_reason != "expired":
            raise UserError(f"session {session_id!r} is finished; create a new ServiceClient", field="session_id")
        return s

    async def _run(self, owner: str, run_id: str, *, field: str = "model_id") -> RunRecord:
        run = self._runs.get(run_id)
        if run is None:
            run = await self.store.get_run(run_id)
            if run is not None:
                self._runs[run_id] = run
        if run is None or run.owner != owner:
            raise NotFoundError(f"training run {run_id!r} not found", field=field)
        return run

    def _sampler_port(self, base_model: str, *, field: str = "base_model") -> SamplerPort:
        port = self.samplers.get(base_model)
        if port is None:
            served = ", ".join(sorted(self.samplers)) or "none"
            raise UserError(f"no sampler serves base model {base_model!r}; this server samples: {served}",
                            field=field)
        return port

    async def _checkpoint(self, owner: str, ref: CheckpointRef, *, field: str = "path",
                          allow_public: bool = True) -> CheckpointRecord:
        return await visible_checkpoint(self.store, owner, ref.run_id, ref.kind, ref.name, uri=ref.uri, field=field,
                                        allow_public=allow_public)

    # =============================================================================== handshake & sessions

    @staticmethod
    def client_config() -> dict[str, Any]:
        return {
            "pjwt_auth_enabled": False,
            "proto_compress_fwdbwd": False,
            "parallel_fwdbwd_chunks": True,
            "sample_use_retrieve_futures": False,
            "custom_loss_server_side": False,
            "sample_join_sampling_session": False,
        }

    @staticmethod
    def dynamic_config() -> dict[str, Any]:
        return {"refresh_interval_sec": 300, "sample_cancel_enabled": False, "sample_cancel_max_batch_size": 64}

    async def create_session(self, owner: str, req: P.CreateSessionRequest) -> P.CreateSessionResponse:
        now = time.time()
        session = SessionRecord(
            id="sess-" + secrets.token_hex(8), owner=owner, created=now, heartbeat=now,
            tags=list(req.tags or []), user_metadata=req.user_metadata, display_name=req.display_name,
            sdk_version=req.sdk_version,
        )
        await self.store.create_session(session)
        return P.CreateSessionResponse(session_id=session.id)

    async def heartbeat(self, owner: str, session_id: str) -> dict[str, str]:
        s = await self.store.heartbeat(session_id, owner, time.time())
        if s is None:
            raise NotFoundError(f"session {session_id!r} not found", field="session_id")
        if s.finished is not None:
            raise Gone(f"session {session_id!r} is finished ({s.finish_reason})")
        return {"type": "session_heartbeat"}

    async def finish_session(self, owner: str, session_id: str, reason: str | None) -> None:
        if not await self.store.finish_session(session_id, owner, reason or "success", time.time()):
            raise NotFoundError(f"session {session_id!r} not found", field="session_id")
        self._spawn(self._drop_ephemeral(session_ids=[session_id]), f"cleanup {session_id}")

    async def list_sessions(self, owner: str, limit: int | None, offset: int | None) -> P.ListSessionsResponse:
        page = await self.store.list_sessions(owner, page_limit(limit), page_offset(offset))
        return P.ListSessionsResponse(sessions=[s.id for s in page.items])

    async def get_session(self, owner: str, session_id: str) -> P.GetSessionResponse:
        s = await self._session(owner, session_id)
        runs, samplers = await self.store.session_children(session_id)
        return P.GetSessionResponse(
            training_run_ids=runs, sampler_ids=samplers, display_name=s.display_name,
            user_metadata={k: str(v) for k, v in s.user_metadata.items()} if s.user_metadata else None,
        )

    async def capabilities(self) -> P.ServerCapabilitiesResponse:
        names = sorted(set(self.models) | set(self.samplers))
        out = []
        for name in names:
            info = await self.model_info(name)
            out.append(P.SupportedModelOut(
                model_name=name, max_context_length=info_field(info, "max_context_length"),
                trainable=name in self.models, sampleable=name in self.samplers,
            ))
        return P.ServerCapabilitiesResponse(supported_models=out)

    # =============================================================================== training runs

    async def create_model(self, owner: str, req: P.CreateModelRequest) -> P.UntypedFuture:
        await self._session(owner, req.session_id, live=True)
        port = self._model_port(req.base_model)
        lora = lora_config(req.lora_config)
        check_optimizer(req.optimizer_config)
        if req.model_seq_id < 0:
            raise UserError("must be >= 0", field="model_seq_id")
        run_id = validate_run_id(f"{req.session_id}:train:{req.model_seq_id}")

        async def work() -> bytes:
            info = await port.create_run(run_id, owner, lora)
            now = time.time()
            run = RunRecord(id=run_id, owner=owner, session_id=req.session_id, base_model=req.base_model,
                            lora=msgspec.to_builtins(getattr(info, "lora", lora)), created=now, last_request=now,
                            user_metadata=str_metadata(req.user_metadata))
            await self.store.create_run(run)
            self._runs[run_id] = run
            return _enc({"type": "create_model", "model_id": run_id})

        # seq 0 of the run: a create_model and a create-via-load of the same id are the same request.
        record = await self.futures.submit(owner=owner, kind="create_model", work=work, model_id=run_id, seq_id=0)
        return P.UntypedFuture(request_id=record.request_id, model_id=run_id)

    async def get_info(self, owner: str, model_id: str) -> P.GetInfoResponse:
        run = await self._run(owner, model_id)
        info = await self.model_info(run.base_model)
        tokenizer = info_field(info, "tokenizer_id") or run.base_model
        return P.GetInfoResponse(
            model_id=run.id,
            model_data=P.ModelDataOut(model_name=run.base_model, arch=info_field(info, "arch"),
                                      tokenizer_id=tokenizer),
            lora_rank=run.lora.get("rank"), model_name=run.base_model,
        )

    async def unload_model(self, owner: str, model_id: str) -> P.UntypedFuture:
        run = await self._run(owner, model_id)
        port = self._model_port(run.base_model)

        async def work() -> bytes:
            await port.delete_run(run.id, owner)
            return _enc({"type": "unload_model", "model_id": run.id})

        record = await self.futures.submit(owner=owner, kind="unload_model", work=work, model_id=run.id)
        return P.UntypedFuture(request_id=record.request_id, model_id=run.id)

    async def forward_backward(self, owner: str, model_id: str, seq_id: int | None,
                               make_input: Callable[[], ForwardBackwardInput], *, forward_only: bool
                               ) -> P.UntypedFuture:
        """``make_input`` decodes the data; a decoding error is a rejection of this ``seq_id``."""

        def prepare(run: RunRecord, port: ModelPort) -> Work:
            inp = make_input()

            async def work() -> bytes:
                return _enc(await port.forward_backward(run.id, owner, seq_id, inp, forward_only=forward_only))

            return work

        kind = "forward" if forward_only else "forward_backward"
        return await self._training(owner, model_id, seq_id, kind, prepare)

    async def optim_step(self, owner: str, req: P.OptimStepRequest) -> P.UntypedFuture:
        def prepare(run: RunRecord, port: ModelPort) -> Work:
            params = adam_params(req)

            async def work() -> bytes:
                out = await port.optim_step(run.id, owner, req.seq_id, params)
                return _enc({"metrics": dict(out.metrics or {})})

            return work

        return await self._training(owner, req.model_id, req.seq_id, "optim_step", prepare)

    async def save_weights(self, owner: str, req: P.SaveWeightsRequest) -> P.UntypedFuture:
        async def prepare(run: RunRecord, port: ModelPort) -> Work:
            name = validate_name(req.path, field="path") if req.path else default_name()
            expires = expiry(req.ttl_seconds)
            ref = CheckpointRef(run_id=run.id, kind="weights", name=name)
            path = self.layout.path_for(owner, run.id, ref.kind, name)
            if not req.overwrite and await self.store.get_checkpoint(run.id, ref.kind, name) is not None:
                raise UserError(f"checkpoint {ref.uri} already exists; pass overwrite=True or choose another "
                                "name", field="path")

            async def work() -> bytes:
                info = await port.save_state(run.id, owner, req.seq_id, path, include_optimizer=True)
                await self._record_checkpoint(owner, run, ref, path, info, expires, req.user_metadata)
                return _enc({"type": "save_weights", "path": ref.uri})

            return work

        return await self._training(owner, req.model_id, req.seq_id, "save_weights", prepare)

    async def save_weights_for_sampler(self, owner: str, req: P.SaveWeightsForSamplerRequest) -> P.UntypedFuture:
        async def prepare(run: RunRecord, port: ModelPort) -> Work:
            if req.kind not in (None, "snapshot", "inflight"):
                raise UserError(f"unknown kind {req.kind!r}; expected snapshot or inflight", field="kind")
            if req.path:
                return await self._named_sampler_save(owner, run, port, req)
            return await self._ephemeral_sampler_save(owner, run, port, req)

        return await self._training(owner, req.model_id, req.seq_id, "save_weights_for_sampler", prepare)

    async def _named_sampler_save(self, owner: str, run: RunRecord, port: ModelPort,
                                  req: P.SaveWeightsForSamplerRequest) -> Work:
        name = validate_name(req.path or "", field="path")
        expires = expiry(req.ttl_seconds)
        ref = CheckpointRef(run_id=run.id, kind="sampler_weights", name=name)
        path = self.layout.path_for(owner, run.id, ref.kind, name)
        if await self.store.get_checkpoint(run.id, ref.kind, name) is not None:
            raise UserError(f"checkpoint {ref.uri} already exists; choose another name", field="path")

        async def work() -> bytes:
            info = await port.save_sampler_weights(run.id, owner, req.seq_id, path)
            await self._record_checkpoint(owner, run, ref, path, info, expires, req.user_metadata)
            return _enc({"type": "save_weights_for_sampler", "path": ref.uri})

        return work

    async def _ephemeral_sampler_save(self, owner: str, run: RunRecord, port: ModelPort,
                                      req: P.SaveWeightsForSamplerRequest) -> Work:
        """Weights only for a new sampling session (``save_weights_and_get_sampling_client``), not a listed
        checkpoint. The session id uses the session's sampler counter that the SDK sends."""
        seq = req.sampling_session_seq_id
        if seq is None:
            raise UserError("give either path (a named sampler checkpoint) or sampling_session_seq_id",
                            field="path")
        if seq < 0:
            raise UserError("must be >= 0", field="sampling_session_seq_id")
        self._sampler_port(run.base_model, field="model_id")
        sampler_id = f"{run.session_id or run.id}:sample:{seq}"
        if await self.store.get_sampler(sampler_id) is not None:
            raise UserError(f"sampling session {sampler_id!r} exists already; use a new sampling_session_seq_id",
                            field="sampling_session_seq_id")
        path = self.layout.path_for(owner, run.id, EPHEMERAL, f"{seq}-{secrets.token_hex(4)}")

        async def work() -> bytes:
            await port.save_sampler_weights(run.id, owner, req.seq_id, path)
            now = time.time()
            await self.store.create_sampler(SamplerRecord(
                id=sampler_id, owner=owner, session_id=run.session_id, base_model=run.base_model, created=now,
                adapter_path=path, run_id=run.id, ephemeral=True, last_used=now,
            ))
            self._spawn(self._trim_ephemeral(run.id), f"trim {run.id}")
            return _enc({"type": "save_weights_for_sampler", "sampling_session_id": sampler_id})

        return work

    async def load_weights(self, owner: str, req: P.LoadWeightsRequest) -> P.UntypedFuture:
        if req.session_id is not None or req.model_seq_id is not None:
            return await self._create_from_checkpoint(owner, req)
        if req.model_id is None:
            raise UserError("give either session_id and model_seq_id (a new training client) or model_id",
                            field="model_id")

        async def prepare(run: RunRecord, port: ModelPort) -> Work:
            ref, ckpt, base_model, include_optimizer = await self._load_source(owner, req)
            if run.base_model != base_model:
                raise UserError(f"checkpoint {ref.uri} is for base model {base_model!r}, run {run.id!r} trains "
                                f"{run.base_model!r}", field="path")
            if await self.store.count_futures(run.id, min_seq=1) > 0:
                raise UserError("load_weights on an existing training run is only allowed as its first request; "
                                "create a new training client from the checkpoint instead "
                                "(ServiceClient.create_training_client_from_state)", field="model_id")

            async def work() -> bytes:
                await port.load_state(run.id, owner, req.seq_id, ckpt.path, include_optimizer, create=False)
                return _enc({"type": "load_weights", "path": ref.uri, "model_id": run.id})

            return work

        return await self._training(owner, req.model_id, req.seq_id, "load_weights", prepare)

    async def _load_source(self, owner: str, req: P.LoadWeightsRequest
                           ) -> tuple[CheckpointRef, CheckpointRecord, str, bool]:
        ref = parse_uri(req.path, field="path", kinds=("weights",))
        ckpt = await self._checkpoint(owner, ref)
        include_optimizer = bool(req.optimizer)
        if req.optimizer_config is not None:
            if include_optimizer:
                raise UserError("optimizer_config applies only when the optimizer state is not loaded",
                                field="optimizer_config")
            check_optimizer(req.optimizer_config)
        base_model = ckpt.base_model or (await self._run_of_checkpoint(ckpt)).base_model
        return ref, ckpt, base_model, include_optimizer

    async def _create_from_checkpoint(self, owner: str, req: P.LoadWeightsRequest) -> P.UntypedFuture:
        """``create_training_client_from_state[_with_optimizer]``: a new run ``{session}:train:{n}`` whose seq 0
        is the load (the SDK then calls ``get_info`` on the id it derived itself)."""
        if req.session_id is None or req.model_seq_id is None:
            raise UserError("session_id and model_seq_id go together", field="session_id")
        if req.model_seq_id < 0:
            raise UserError("must be >= 0", field="model_seq_id")
        ref, ckpt, base_model, include_optimizer = await self._load_source(owner, req)
        if req.base_model is not None and req.base_model != base_model:
            raise UserError(f"checkpoint {ref.uri} was trained on {base_model!r}, not {req.base_model!r}",
                            field="base_model")
        await self._session(owner, req.session_id, live=True)
        port = self._model_port(base_model, field="path")
        run_id = validate_run_id(f"{req.session_id}:train:{req.model_seq_id}")

        async def work() -> bytes:
            info = await port.load_state(run_id, owner, 0, ckpt.path, include_optimizer, create=True)
            now = time.time()
            lora = msgspec.to_builtins(info.lora) if getattr(info, "lora", None) is not None else (ckpt.lora or {})
            run = RunRecord(id=run_id, owner=owner, session_id=req.session_id, base_model=base_model, lora=lora,
                            created=now, last_request=now, user_metadata=str_metadata(req.user_metadata))
            await self.store.create_run(run)
            self._runs[run_id] = run
            return _enc({"type": "load_weights", "path": ref.uri, "model_id": run_id})

        record = await self.futures.submit(owner=owner, kind="load_weights", work=work, model_id=run_id, seq_id=0)
        return P.UntypedFuture(request_id=record.request_id, model_id=run_id)

    async def _run_of_checkpoint(self, ckpt: CheckpointRecord) -> RunRecord:
        run = await self.store.get_run(ckpt.run_id)
        if run is None:
            raise NotFoundError(f"training run {ckpt.run_id!r} of the checkpoint no longer exists", field="path")
        return run

    async def _training(self, owner: str, model_id: str, seq_id: int | None, kind: str,
                        prepare: Callable[[RunRecord, ModelPort], Work | Awaitable[Work]]) -> P.UntypedFuture:
        """Submit a numbered request of a training run.

        ``prepare`` checks the request and returns the work to run. If it rejects the request, its ``seq_id``
        is still handed to the Model service as a request that fails there (``release_seq_id``): the service runs
        each run's requests strictly in order and would otherwise hold every later request of this run until
        its gap timeout. A repeat of an already accepted ``seq_id`` gets the first request's id instead of
        being checked again (a retried ``save_state`` must not fail on the checkpoint its first try wrote).
        """
        run = await self._run(owner, model_id)
        port = self._model_port(run.base_model)
        if seq_id is not None and seq_id < 0:
            raise UserError("must be >= 0", field="seq_id")
        try:
            work = prepare(run, port)
            if inspect.isawaitable(work):
                work = await work
        except UserError:
            if seq_id is None:
                raise
            first = await self.futures.find(run.id, seq_id)
            if first is not None and first.owner == owner:
                return P.UntypedFuture(request_id=first.request_id, model_id=run.id)
            self._spawn(release_seq_id(port, run.id, owner, seq_id, _REFUSED), f"reject {run.id}#{seq_id}")
            raise
        record = await self.futures.submit(owner=owner, kind=kind, work=work, model_id=run.id, seq_id=seq_id,
                                           touch_run=run.id)
        return P.UntypedFuture(request_id=record.request_id, model_id=run.id)

    async def reject_seq(self, owner: str, model_id: str, seq_id: int | None) -> None:
        """A numbered request of ``model_id`` could not even be decoded: release its ``seq_id`` at the Model
        service (if the run is the caller's and the number was not used yet)."""
        if seq_id is None or seq_id < 0:
            return
        try:
            run = await self._run(owner, model_id)
            port = self._model_port(run.base_model)
        except UserError:
            return
        if await self.futures.find(run.id, seq_id) is None:
            self._spawn(release_seq_id(port, run.id, owner, seq_id, _REFUSED), f"reject {run.id}#{seq_id}")

    async def _record_checkpoint(self, owner: str, run: RunRecord, ref: CheckpointRef, path: str, info: Any,
                                 expires: float | None, user_metadata: dict[str, str] | None) -> None:
        size = getattr(info, "size_bytes", None)
        if size is None:
            size = await asyncio.to_thread(dir_size, path)
        await self.store.put_checkpoint(CheckpointRecord(
            run_id=run.id, kind=ref.kind, name=ref.name, owner=owner, path=path, created=time.time(),
            size_bytes=size, expires_at=expires, user_metadata=user_metadata, base_model=run.base_model,
            lora=run.lora,
        ))

    # =============================================================================== sampling

    async def create_sampling_session(self, owner: str, req: P.CreateSamplingSessionRequest
                                      ) -> P.CreateSamplingSessionResponse:
        await self._session(owner, req.session_id, live=True)
        if req.sampling_session_seq_id < 0:
            raise UserError("must be >= 0", field="sampling_session_seq_id")
        base_model, model_path, adapter_path, run_id = await self._sampling_target(
            owner, req.base_model, req.model_path)
        sampler_id = f"{req.session_id}:sample:{req.sampling_session_seq_id}"
        record = SamplerRecord(id=sampler_id, owner=owner, session_id=req.session_id, base_model=base_model,
                               created=time.time(), model_path=model_path, adapter_path=adapter_path, run_id=run_id)
        if not await self.store.create_sampler(record):
            existing = await self.store.get_sampler(sampler_id, owner)
            if existing is None or existing.model_path != model_path or existing.base_model != base_model:
                raise UserError(f"sampling session {sampler_id!r} exists already with other weights; use a new "
                                "sampling_session_seq_id", field="sampling_session_seq_id")
        return P.CreateSamplingSessionResponse(sampling_session_id=sampler_id)

    async def _sampling_target(self, owner: str, base_model: str | None, model_path: str | None
                               ) -> tuple[str, str | None, str | None, str | None]:
        """(base model, checkpoint URI, adapter directory, run id) for a base model or a sampler checkpoint."""
        if (base_model is None) == (model_path is None):
            raise UserError("give a sampling_session_id, or exactly one of base_model and model_path",
                            field="base_model")
        if model_path is not None:
            ref = parse_uri(model_path, field="model_path")
            ckpt = await self._checkpoint(owner, ref, field="model_path")
            base = ckpt.base_model or (await self._run_of_checkpoint(ckpt)).base_model
            self._sampler_port(base, field="model_path")
            return base, ref.uri, ckpt.path, ref.run_id
        assert base_model is not None
        self._sampler_port(base_model)
        return base_model, None, None, None

    async def get_sampler(self, owner: str, sampler_id: str) -> P.GetSamplerResponse:
        s = await self.store.get_sampler(sampler_id, owner)
        if s is None:
            raise NotFoundError(f"sampling session {sampler_id!r} not found", field="sampling_session_id")
        return P.GetSamplerResponse(sampler_id=s.id, base_model=s.base_model, model_path=s.model_path)

    async def sample(self, owner: str, req: P.SampleRequestIn) -> P.UntypedFuture:
        reject_unsupported_sampling(req)
        prompt = input_tokens(req.prompt, "prompt")
        if not prompt:
            raise UserError("the prompt is empty", field="prompt")
        num_samples = 1 if req.num_samples is None else req.num_samples
        if not 1 <= num_samples <= _MAX_NUM_SAMPLES:
            raise UserError(f"must be between 1 and {_MAX_NUM_SAMPLES}", field="num_samples")
        params = sampling_params(req.sampling_params)
        last_n = req.prompt_logprobs_last_n
        if last_n is not None:
            if not req.prompt_logprobs:
                raise UserError("needs prompt_logprobs=True", field="prompt_logprobs_last_n")
            if not 1 <= last_n <= len(prompt) - 1:
                raise UserError(f"must be between 1 and len(prompt) - 1 = {len(prompt) - 1}",
                                field="prompt_logprobs_last_n")
        dedupe_id: str | None = None
        if req.sampling_session_id is not None:
            s = await self.store.get_sampler(req.sampling_session_id, owner)
            if s is None:
                raise NotFoundError(f"sampling session {req.sampling_session_id!r} not found",
                                    field="sampling_session_id")
            if s.ephemeral and s.adapter_path is None:
                raise Gone(f"the weights of sampling session {s.id!r} were cleaned up (a run keeps its newest "
                           f"{self.settings.ephemeral_keep} save_weights_and_get_sampling_client weights, and none "
                           "long after its session ends); save weights for sampling again")
            base_model, adapter_path = s.base_model, s.adapter_path
            dedupe_id = s.id
            self.store.touch_sampler_background(s.id, time.time())
        else:
            base_model, _uri, adapter_path, _run = await self._sampling_target(owner, req.base_model,
                                                                              req.model_path)
        port = self._sampler_port(base_model)
        request = SampleRequest(prompt=prompt, sampling_params=params, num_samples=num_samples,
                                prompt_logprobs=bool(req.prompt_logprobs), adapter_path=adapter_path)

        async def work() -> bytes:
            try:
                out = await port.sample(request)
            except NotFoundError as e:
                if e.field != "adapter_path":
                    raise
                # the sampler names the server directory; the client knows the checkpoint by its URI
                raise NotFoundError("the weights of this sampling session no longer exist (the checkpoint was "
                                    "deleted or expired); create a new sampling client", field="model_path") from None
            if len(out.sequences) != num_samples:
                raise RuntimeError(f"sampler returned {len(out.sequences)} sequences for {num_samples} samples")
            if last_n is not None and out.prompt_logprobs is not None:
                cut = len(out.prompt_logprobs) - last_n
                out.prompt_logprobs = [None] * cut + list(out.prompt_logprobs[cut:])
            return _enc(out)

        ids = [f"seq-{secrets.token_hex(8)}" for _ in range(num_samples)]
        record = await self.futures.submit(
            owner=owner, kind="sample", work=work, model_id=dedupe_id,
            seq_id=req.seq_id if dedupe_id is not None else None, meta={"sample_sequence_ids": ids},
        )
        return P.UntypedFuture(request_id=record.request_id,
                               sample_sequence_ids=list((record.meta or {}).get("sample_sequence_ids") or ids))

    # =============================================================================== futures

    async def retrieve(self, owner: str, request_id: str, *, proto_ok: bool) -> tuple[bytes, str]:
        """(body, media type) for ``retrieve_future``."""
        record = await self.futures.wait(request_id, owner)
        if record is None:
            raise NotFoundError(f"request {request_id!r} not found (unknown, or its result has expired)",
                                field="request_id")
        if record.status == "pending":
            return _enc(P.TryAgainResponse(request_id=request_id)), "application/json"
        if record.status == "failed":
            body = P.RequestFailedResponse(error=record.error or "request failed", category=record.category or "server")
            return _enc(body), "application/json"
        key = (request_id, proto_ok)
        cached = self._rendered.get(key)
        if cached is None:
            try:
                cached = render_result(record, proto_ok)
            except Exception as e:  # noqa: BLE001 - a 5xx here would make the SDK re-poll forever
                cid = secrets.token_hex(6)
                log.error("cannot render the result of %s, correlation id %s", request_id, cid, exc_info=e)
                body = P.RequestFailedResponse(error=f"internal server error (correlation id {cid})", category="server")
                return _enc(body), "application/json"
            if len(cached[0]) <= _RENDER_CACHE_ITEM_BYTES:
                self._rendered[key] = cached
                while len(self._rendered) > _RENDER_CACHE_ITEMS:
                    self._rendered.popitem(last=False)
        return cached

    # =============================================================================== REST: runs & checkpoints

    def _checkpoint_out(self, c: CheckpointRecord) -> P.CheckpointOut:
        return P.CheckpointOut(
            checkpoint_id=c.checkpoint_id, checkpoint_type=CHECKPOINT_TYPE[c.kind], time=iso(c.created) or "",
            tinker_path=f"tinker://{c.run_id}/{c.kind}/{c.name}", size_bytes=c.size_bytes, public=c.public,
            user_metadata=c.user_metadata, expires_at=iso(c.expires_at),
        )

    async def _run_out(self, run: RunRecord, latest: dict[tuple[str, str], CheckpointRecord]) -> P.TrainingRunOut:
        last = latest.get((run.id, "weights"))
        last_sampler = latest.get((run.id, "sampler_weights"))
        return P.TrainingRunOut(
            training_run_id=run.id, base_model=run.base_model, model_owner=run.owner, is_lora=True,
            last_request_time=iso(run.last_request) or "", corrupted=run.corrupted, lora_rank=run.lora.get("rank"),
            last_checkpoint=self._checkpoint_out(last) if last else None,
            last_sampler_checkpoint=self._checkpoint_out(last_sampler) if last_sampler else None,
            user_metadata=str_metadata(run.user_metadata),
        )

    async def get_training_run(self, owner: str, run_id: str) -> P.TrainingRunOut:
        run = await self._run(owner, run_id, field="training_run_id")
        return await self._run_out(run, await self.store.latest_checkpoints([run.id]))

    async def list_training_runs(self, owner: str, limit: int | None, offset: int | None) -> P.TrainingRunsResponse:
        limit, offset = page_limit(limit), page_offset(offset)
        page = await self.store.list_runs(owner, limit, offset)
        latest = await self.store.latest_checkpoints([r.id for r in page.items])
        runs = [await self._run_out(r, latest) for r in page.items]
        return P.TrainingRunsResponse(training_runs=runs,
                                      cursor=P.CursorOut(offset=offset, limit=limit, total_count=page.total))

    async def list_checkpoints(self, owner: str, run_id: str) -> P.CheckpointsListResponse:
        run = await self._run(owner, run_id, field="training_run_id")
        now = time.time()
        items = [c for c in await self.store.list_checkpoints(run.id) if c.expires_at is None or c.expires_at > now]
        return P.CheckpointsListResponse(checkpoints=[self._checkpoint_out(c) for c in items], cursor=None)

    async def list_user_checkpoints(self, owner: str, limit: int | None, offset: int | None
                                    ) -> P.CheckpointsListResponse:
        limit, offset = page_limit(limit, default=100), page_offset(offset)
        page = await self.store.list_user_checkpoints(owner, limit, offset)
        return P.CheckpointsListResponse(
            checkpoints=[self._checkpoint_out(c) for c in page.items],
            cursor=P.CursorOut(offset=offset, limit=limit, total_count=page.total),
        )

    async def _own_checkpoint(self, owner: str, run_id: str, checkpoint_id: str) -> CheckpointRecord:
        kind, name = parse_checkpoint_id(checkpoint_id)
        validate_run_id(run_id, field="training_run_id")
        c = await self.store.get_checkpoint(run_id, kind, name)
        if c is None or c.owner != owner:
            raise NotFoundError(f"checkpoint {checkpoint_id!r} of training run {run_id!r} not found",
                                field="checkpoint_id")
        return c

    async def delete_checkpoint(self, owner: str, run_id: str, checkpoint_id: str) -> None:
        c = await self._own_checkpoint(owner, run_id, checkpoint_id)
        await self.store.delete_checkpoint(c.run_id, c.kind, c.name)
        await asyncio.to_thread(self.layout.remove, c.path)

    async def set_published(self, owner: str, run_id: str, checkpoint_id: str, public: bool) -> None:
        c = await self._own_checkpoint(owner, run_id, checkpoint_id)
        await self.store.update_checkpoint(c.run_id, c.kind, c.name, public=public)

    async def set_ttl(self, owner: str, run_id: str, checkpoint_id: str, ttl_seconds: int | None) -> None:
        c = await self._own_checkpoint(owner, run_id, checkpoint_id)
        await self.store.update_checkpoint(c.run_id, c.kind, c.name, expires_at=expiry(ttl_seconds, "ttl_seconds"))

    async def weights_info(self, owner: str, tinker_path: str) -> P.WeightsInfoResponse:
        ref = parse_uri(tinker_path, field="tinker_path")
        c = await self._checkpoint(owner, ref, field="tinker_path")
        lora = c.lora or (await self._run_of_checkpoint(c)).lora
        base = c.base_model or (await self._run_of_checkpoint(c)).base_model
        return P.WeightsInfoResponse(
            base_model=base, is_lora=True, lora_rank=lora.get("rank"), train_unembed=lora.get("train_unembed"),
            train_mlp=lora.get("train_mlp"), train_attn=lora.get("train_attn"),
        )

    # =============================================================================== housekeeping

    async def sweep(self) -> dict[str, int]:
        """One cleanup pass: expired checkpoints, old results, silent sessions and their ephemeral weights."""
        now = time.time()
        expired = await self.store.expired_checkpoints(now)
        for c in expired:
            await self.store.delete_checkpoint(c.run_id, c.kind, c.name)
            await asyncio.to_thread(self.layout.remove, c.path)
        pruned = await self.store.prune_futures(now - self.settings.future_ttl_s,
                                                now - self.settings.fetched_result_ttl_s)
        closed = await self.store.expire_sessions(now - self.settings.session_timeout_s, now)
        stale = await self.store.stale_ephemeral_samplers(now - self.settings.ephemeral_ttl_s)
        for s in stale:
            await self._drop_sampler_weights(s)
        return {"checkpoints": len(expired), "futures": pruned, "sessions": len(closed), "ephemeral": len(stale)}

    async def _drop_sampler_weights(self, s: SamplerRecord) -> None:
        if s.adapter_path:
            await self.store.drop_sampler_weights(s.id)
            await asyncio.to_thread(self.layout.remove, s.adapter_path)

    async def _drop_ephemeral(self, *, session_ids: list[str]) -> None:
        for s in await self.store.ephemeral_samplers(session_ids=session_ids):
            await self._drop_sampler_weights(s)

    async def _trim_ephemeral(self, run_id: str) -> None:
        """Keep the newest ``ephemeral_keep`` ephemeral weights of a run (an RL loop saves one per step)."""
        samplers = [s for s in await self.store.ephemeral_samplers(run_id=run_id) if s.adapter_path]
        for s in samplers[self.settings.ephemeral_keep:]:
            await self._drop_sampler_weights(s)

    async def close(self) -> None:
        await self.futures.close()
        for task in list(self._background):
            task.cancel()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
