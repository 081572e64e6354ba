"""The Tinker API over the ``ControlPlane``: Tinker's ids, bodies and rules, nothing else.

Handlers in ``router.py`` decode and render; each method here takes a decoded request plus the caller's
principal id and returns a response struct (or a future for long calls). State and the rules both protocols
share (sessions, runs, numbered submissions, checkpoints, visibility, housekeeping) are the control plane's.

Identifiers follow the official service, because the SDK derives some of them itself: training runs are
``{session_id}:train:{model_seq_id}``, sampling sessions ``{session_id}:sample:{n}``, checkpoints
``tinker://{run_id}/{weights|sampler_weights}/{name}``. A run's ``create_model`` (or create-from-checkpoint)
is its request number 0.
"""

from __future__ import annotations

import secrets
import time
from typing import Any, Callable

from twinkle.common.limits import check_metadata, check_tags, check_train_input
from twinkle.common.wire import UserError

from ..core import ControlPlane, result_value
from ..core.checkpoints import (EPHEMERAL, CheckpointRef, parse_checkpoint_id, parse_uri, validate_name,
                                validate_run_id)
from ..core.ports import ModelPort
from ..core.state import CheckpointRecord, FutureRecord, RunRecord, SamplerRecord, SessionRecord
from . import convert as C
from . import protocol as P
from .settings import TinkerSettings
from .stability import StabilityRecords, TrainingData


class TinkerService:
    """The Tinker surface of one central server process."""

    def __init__(self, settings: TinkerSettings, plane: ControlPlane, stability: StabilityRecords) -> None:
        self.settings = settings
        self.plane = plane
        self.stability = stability

    @staticmethod
    def _future(record: FutureRecord, model_id: str | None = None) -> P.UntypedFuture:
        return P.UntypedFuture(request_id=record.request_id, model_id=model_id)

    # =============================================================================== handshake & sessions

    def client_config(self) -> dict[str, Any]:
        """What the SDK should use: zstd forward/backward bodies (``compress_forward_backward``), the
        completion-queue poll (``retrieve_futures``) and joined sampling sessions."""
        return {
            "pjwt_auth_enabled": False,
            "proto_compress_fwdbwd": self.settings.compress_forward_backward,
            "parallel_fwdbwd_chunks": True,
            "sample_use_retrieve_futures": True,
            "custom_loss_server_side": False,
            "sample_join_sampling_session": True,
        }

    @staticmethod
    def dynamic_config() -> dict[str, Any]:
        return {"refresh_interval_sec": 300, "sample_cancel_enabled": True, "sample_cancel_max_batch_size": 64}

    async def create_session(self, owner: str, req: P.CreateSessionRequest) -> P.CreateSessionResponse:
        now = time.time()
        limits = self.settings.limits
        session = await self.plane.open_session(SessionRecord(
            id="sess-" + secrets.token_hex(8), owner=owner, created=now, heartbeat=now,
            tags=check_tags(req.tags, limits=limits), user_metadata=check_metadata(req.user_metadata, limits=limits), display_name=req.display_name, sdk_version=req.sdk_version,
        ))
        return P.CreateSessionResponse(session_id=session.id)

    async def heartbeat(self, owner: str, session_id: str) -> dict[str, str]:
        await self.plane.heartbeat(owner, session_id)
        return {"type": "session_heartbeat"}

    async def finish_session(self, owner: str, session_id: str, reason: str | None) -> None:
        await self.plane.finish_session(owner, session_id, reason or "success")

    async def list_sessions(self, owner: str, limit: int | None, offset: int | None) -> P.ListSessionsResponse:
        page = await self.plane.list_sessions(owner, *self.plane.page(limit, offset))
        return P.ListSessionsResponse(sessions=[s.id for s in page.items])

    async def get_session(self, owner: str, session_id: str) -> P.GetSessionResponse:
        s = await self.plane.session(owner, session_id)
        runs, samplers = await self.plane.store.session_children(session_id)
        return P.GetSessionResponse(training_run_ids=runs, sampler_ids=samplers, display_name=s.display_name,
                                    user_metadata=C.str_metadata(s.user_metadata))

    async def capabilities(self) -> P.ServerCapabilitiesResponse:
        out = []
        for name in self.plane.served_names():
            info = await self.plane.model_info(name)
            out.append(P.SupportedModelOut(
                model_name=name, max_context_length=getattr(info, "max_context_length", None),
                trainable=name in self.plane.models, sampleable=name in self.plane.samplers,
            ))
        return P.ServerCapabilitiesResponse(supported_models=out, limits=C.builtins(self.settings.limits))

    # =============================================================================== training runs

    async def create_model(self, owner: str, req: P.CreateModelRequest) -> P.UntypedFuture:
        await self.plane.session(owner, req.session_id, live=True)
        base_model = await self.plane.served_name(req.base_model)
        port = self.plane.model_port(base_model)
        lora = C.lora_config(req.lora_config, self.settings.limits)
        C.check_optimizer(req.optimizer_config)
        run_id = self._run_id(req.session_id, req.model_seq_id)
        user_metadata = C.str_metadata(check_metadata(req.user_metadata, limits=self.settings.limits))

        async def work() -> dict[str, str]:
            info = await port.create_run(run_id, owner, lora)
            now = time.time()
            await self.plane.record_run(RunRecord(
                id=run_id, owner=owner, session_id=req.session_id, base_model=base_model,
                lora=C.builtins(getattr(info, "lora", lora)), created=now, last_request=now,
                user_metadata=user_metadata))
            return {"type": "create_model", "model_id": run_id}

        record = await self.plane.submit(owner, "create_model", work, dedupe=(run_id, 0))
        return self._future(record, run_id)

    @staticmethod
    def _run_id(session_id: str, model_seq_id: int) -> str:
        if model_seq_id < 0:
            raise UserError("must be >= 0", field="model_seq_id")
        return validate_run_id(f"{session_id}:train:{model_seq_id}")

    async def get_info(self, owner: str, model_id: str) -> P.GetInfoResponse:
        run = await self.plane.run(owner, model_id)
        info = await self.plane.model_info(run.base_model)
        return P.GetInfoResponse(
            model_id=run.id, lora_rank=run.lora.get("rank"), model_name=run.base_model,
            model_data=P.ModelDataOut(model_name=run.base_model, arch=getattr(info, "arch", None),
                                      tokenizer_id=getattr(info, "tokenizer_id", None) or run.base_model),
        )

    async def unload_model(self, owner: str, model_id: str) -> P.UntypedFuture:
        run = await self.plane.run(owner, model_id)
        port = self.plane.model_port(run.base_model)

        async def work() -> dict[str, str]:
            await port.delete_run(run.id, owner)
            return {"type": "unload_model", "model_id": run.id}

        return self._future(await self.plane.submit(owner, "unload_model", work), run.id)

    async def numbered(self, owner: str, model_id: str, seq_id: int | None, kind: str,
                        prepare: Callable[[RunRecord, ModelPort], Any]) -> P.UntypedFuture:
        run = await self.plane.run(owner, model_id)

        async def checked(port: ModelPort) -> tuple[Any, None]:
            return await prepare(run, port), None

        return self._future(await self.plane.submit_numbered(owner, run, seq_id, kind, checked), run.id)

    async def forward_backward(self, owner: str, model_id: str, seq_id: int | None,
                               make_input: Callable[[], TrainingData], *, forward_only: bool
                               ) -> P.UntypedFuture:
        """``make_input`` decodes the data; a decoding error is a refusal of this ``seq_id``."""

        async def prepare(run: RunRecord, port: ModelPort):
            data = make_input()
            inp = check_train_input(data.input, self.settings.limits)
            if inp.loss_fn == "stable_reinforce":
                inp = await self.stability.with_recorded_logprobs(owner, run, data._replace(input=inp))
            return lambda: port.forward_backward(run.id, owner, seq_id, inp, forward_only=forward_only)

        return await self.numbered(owner, model_id, seq_id, "forward" if forward_only else "forward_backward",
                                    prepare)

    async def optim_step(self, owner: str, req: P.OptimStepRequest) -> P.UntypedFuture:
        async def prepare(run: RunRecord, port: ModelPort):
            params = C.adam_params(req)
            return lambda: port.optim_step(run.id, owner, req.seq_id, params)

        return await self.numbered(owner, req.model_id, req.seq_id, "optim_step", prepare)

    async def save_weights(self, owner: str, req: P.SaveWeightsRequest) -> P.UntypedFuture:
        async def prepare(run: RunRecord, port: ModelPort):
            ref, path, expires = await self.new_checkpoint(owner, run, "weights", req.path, req.ttl_seconds,
                                                            overwrite=bool(req.overwrite))

            async def work() -> dict[str, str]:
                info = await port.save_state(run.id, owner, req.seq_id, path, include_optimizer=True)
                await self.plane.record_checkpoint(owner, run, ref, path, info, expires, req.user_metadata)
                return {"type": "save_weights", "path": ref.uri}

            return work

        return await self.numbered(owner, req.model_id, req.seq_id, "save_weights", prepare)

    async def new_checkpoint(self, owner: str, run: RunRecord, kind: str, name: str | None, ttl: int | None,
                              *, overwrite: bool) -> tuple[CheckpointRef, str, float | None]:
        name = validate_name(name, field="path") if name else C.default_name()
        expires = self.plane.expiry(ttl)
        await self.plane.check_checkpoint_quota(owner)
        ref = CheckpointRef(run_id=run.id, kind=kind, name=name)
        if not overwrite and await self.plane.existing_checkpoint(run, kind, name) is not None:
            hint = "pass overwrite=True or choose another name" if kind == "weights" else "choose another name"
            raise UserError(f"checkpoint {ref.uri} already exists; {hint}", field="path")
        return ref, self.plane.checkpoint_path(owner, run, kind, name), expires

    async def save_weights_for_sampler(self, owner: str, req: P.SaveWeightsForSamplerRequest) -> P.UntypedFuture:
        async def prepare(run: RunRecord, port: ModelPort):
            if req.kind not in (None, "snapshot", "inflight"):
                raise UserError(f"unknown kind {req.kind!r}; expected snapshot or inflight", field="kind")
            if req.path:
                return await self._named_sampler_save(owner, run, port, req)
            return await self._ephemeral_sampler_save(owner, run, port, req)

        return await self.numbered(owner, req.model_id, req.seq_id, "save_weights_for_sampler", prepare)

    async def _named_sampler_save(self, owner: str, run: RunRecord, port: ModelPort,
                                  req: P.SaveWeightsForSamplerRequest):
        ref, path, expires = await self.new_checkpoint(owner, run, "sampler_weights", req.path, req.ttl_seconds,
                                                        overwrite=False)

        async def work() -> dict[str, str]:
            info = await port.save_sampler_weights(run.id, owner, req.seq_id, path)
            await self.plane.record_checkpoint(owner, run, ref, path, info, expires, req.user_metadata)
            return {"type": "save_weights_for_sampler", "path": ref.uri}

        return work

    async def _ephemeral_sampler_save(self, owner: str, run: RunRecord, port: ModelPort,
                                      req: P.SaveWeightsForSamplerRequest):
        """Weights only for a new sampling session (``save_weights_and_get_sampling_client``), not a listed
        checkpoint; the session id uses the session's sampler counter that the SDK sends."""
        seq = req.sampling_session_seq_id
        if seq is None:
            raise UserError("give either path (a named sampler checkpoint) or sampling_session_seq_id",
                            field="path")
        if seq < 0:
            raise UserError("must be >= 0", field="sampling_session_seq_id")
        self.plane.sampler_port(run.base_model, field="model_id")
        sampler_id = f"{run.session_id or run.id}:sample:{seq}"
        if await self.plane.store.get_sampler(sampler_id) is not None:
            raise UserError(f"sampling session {sampler_id!r} exists already; use a new sampling_session_seq_id",
                            field="sampling_session_seq_id")
        path = self.plane.checkpoint_path(owner, run, EPHEMERAL, f"{seq}-{secrets.token_hex(4)}")

        async def work() -> dict[str, str]:
            await port.save_sampler_weights(run.id, owner, req.seq_id, path)
            now = time.time()
            await self.plane.store.create_sampler(SamplerRecord(
                id=sampler_id, owner=owner, session_id=run.session_id, base_model=run.base_model, created=now,
                adapter_path=path, run_id=run.id, ephemeral=True, last_used=now, inflight=req.kind == "inflight"))
            self.plane.spawn(self.plane.trim_ephemeral(run.id, self.settings.ephemeral_keep), f"trim {run.id}")
            return {"type": "save_weights_for_sampler", "sampling_session_id": sampler_id}

        return work

    async def load_weights(self, owner: str, req: P.LoadWeightsRequest) -> P.UntypedFuture:
        if req.session_id is not None or req.model_seq_id is not None:
            return await self._create_from_checkpoint(owner, req)
        if req.model_id is None:
            raise UserError("give either session_id and model_seq_id (a new training client) or model_id",
                            field="model_id")

        async def prepare(run: RunRecord, port: ModelPort):
            ref, ckpt, base_model, include_optimizer = await self._load_source(owner, req)
            if run.base_model != base_model:
                raise UserError(f"checkpoint {ref.uri} is for base model {base_model!r}, run {run.id!r} trains "
                                f"{run.base_model!r}", field="path")
            if await self.plane.store.count_futures(run.id, min_seq=1) > 0:
                raise UserError("load_weights on an existing training run is only allowed as its first request; "
                                "create a new training client from the checkpoint instead "
                                "(ServiceClient.create_training_client_from_state)", field="model_id")

            async def work() -> dict[str, str]:
                await port.load_state(run.id, owner, req.seq_id, ckpt.path, include_optimizer, create=False)
                return {"type": "load_weights", "path": ref.uri, "model_id": run.id}

            return work

        return await self.numbered(owner, req.model_id, req.seq_id, "load_weights", prepare)

    async def _load_source(self, owner: str, req: P.LoadWeightsRequest
                           ) -> tuple[CheckpointRef, CheckpointRecord, str, bool]:
        ref = parse_uri(req.path, field="path", kinds=("weights",))
        ckpt = await self.plane.visible_checkpoint(owner, ref, field="path")
        self.plane.audit_checkpoint(ckpt, "checkpoint_read", owner, purpose="load")
        include_optimizer = bool(req.optimizer)
        if req.optimizer_config is not None:
            if include_optimizer:
                raise UserError("optimizer_config applies only when the optimizer state is not loaded",
                                field="optimizer_config")
            C.check_optimizer(req.optimizer_config)
        return ref, ckpt, await self.plane.base_model_of(ckpt), include_optimizer

    async def _create_from_checkpoint(self, owner: str, req: P.LoadWeightsRequest) -> P.UntypedFuture:
        """``create_training_client_from_state[_with_optimizer]``: a new run whose request 0 is the load (the
        SDK then calls ``get_info`` on the id it derived itself)."""
        if req.session_id is None or req.model_seq_id is None:
            raise UserError("session_id and model_seq_id go together", field="session_id")
        run_id = self._run_id(req.session_id, req.model_seq_id)
        ref, ckpt, base_model, include_optimizer = await self._load_source(owner, req)
        if req.base_model is not None and req.base_model != base_model:
            raise UserError(f"checkpoint {ref.uri} was trained on {base_model!r}, not {req.base_model!r}",
                            field="base_model")
        await self.plane.session(owner, req.session_id, live=True)
        port = self.plane.model_port(base_model, field="path")
        user_metadata = C.str_metadata(check_metadata(req.user_metadata, limits=self.settings.limits))

        async def work() -> dict[str, str]:
            info = await port.load_state(run_id, owner, 0, ckpt.path, include_optimizer, create=True)
            now = time.time()
            lora = C.builtins(info.lora) if getattr(info, "lora", None) is not None else (ckpt.lora or {})
            await self.plane.record_run(RunRecord(
                id=run_id, owner=owner, session_id=req.session_id, base_model=base_model, lora=lora, created=now,
                last_request=now, user_metadata=user_metadata))
            return {"type": "load_weights", "path": ref.uri, "model_id": run_id}

        record = await self.plane.submit(owner, "load_weights", work, dedupe=(run_id, 0))
        return self._future(record, run_id)

    # =============================================================================== futures

    async def retrieve(self, owner: str, request_id: str, *, proto_ok: bool) -> tuple[bytes, str]:
        """(body, media type) for ``retrieve_future``."""
        record = await self.plane.wait(owner, request_id)
        if record.status == "pending":
            return C.encode_json(P.TryAgainResponse(request_id=request_id)), "application/json"
        if record.status == "failed":
            body = P.RequestFailedResponse(error=record.error or "request failed", category=record.category or "server")
            return C.encode_json(body), "application/json"
        return C.render_result(record.kind, result_value(record), proto_ok)

    # =============================================================================== REST: runs & checkpoints

    async def get_training_run(self, owner: str, run_id: str) -> P.TrainingRunOut:
        run = await self.plane.run(owner, run_id, field="training_run_id")
        return C.run_out(run, await self.plane.latest_checkpoints(run.id))

    async def list_training_runs(self, owner: str, limit: int | None, offset: int | None) -> P.TrainingRunsResponse:
        limit, offset = self.plane.page(limit, offset)
        page, latest = await self.plane.list_runs(owner, limit, offset)
        return P.TrainingRunsResponse(training_runs=[C.run_out(r, latest) for r in page.items],
                                      cursor=P.CursorOut(offset=offset, limit=limit, total_count=page.total))

    async def list_checkpoints(self, owner: str, run_id: str) -> P.CheckpointsListResponse:
        run = await self.plane.run(owner, run_id, field="training_run_id")
        items = await self.plane.run_checkpoints(run.id)
        return P.CheckpointsListResponse(checkpoints=[C.checkpoint_out(c) for c in items], cursor=None)

    async def list_user_checkpoints(self, owner: str, limit: int | None, offset: int | None
                                    ) -> P.CheckpointsListResponse:
        limit, offset = self.plane.page(limit, offset, default=100)
        page = await self.plane.user_checkpoints(owner, limit, offset)
        return P.CheckpointsListResponse(checkpoints=[C.checkpoint_out(c) for c in page.items],
                                         cursor=P.CursorOut(offset=offset, limit=limit, total_count=page.total))

    async def _own_checkpoint(self, owner: str, run_id: str, checkpoint_id: str) -> CheckpointRecord:
        kind, name = parse_checkpoint_id(checkpoint_id)
        return await self.plane.own_checkpoint(owner, run_id, kind, name, field="checkpoint_id",
                                               uri=f"tinker://{run_id}/{checkpoint_id}")

    async def delete_checkpoint(self, owner: str, run_id: str, checkpoint_id: str) -> None:
        await self.plane.delete_checkpoint(await self._own_checkpoint(owner, run_id, checkpoint_id), actor=owner)

    async def set_published(self, owner: str, run_id: str, checkpoint_id: str, public: bool) -> None:
        await self.plane.update_checkpoint(await self._own_checkpoint(owner, run_id, checkpoint_id), public=public)

    async def set_ttl(self, owner: str, run_id: str, checkpoint_id: str, ttl_seconds: int | None) -> None:
        c = await self._own_checkpoint(owner, run_id, checkpoint_id)
        await self.plane.update_checkpoint(c, expires_at=self.plane.expiry(ttl_seconds))

    async def weights_info(self, owner: str, tinker_path: str) -> P.WeightsInfoResponse:
        c = await self.plane.visible_checkpoint(owner, parse_uri(tinker_path, field="tinker_path"),
                                                field="tinker_path")
        lora = await self.plane.lora_of(c, field="tinker_path")
        return P.WeightsInfoResponse(
            base_model=await self.plane.base_model_of(c, field="tinker_path"), is_lora=True,
            lora_rank=lora.get("rank"), train_unembed=lora.get("train_unembed"), train_mlp=lora.get("train_mlp"),
            train_attn=lora.get("train_attn"),
        )
