"""Tinker sampling over the ``ControlPlane``: sampling sessions (``{session_id}:sample:{n}``), ``asample``, and
the cleanup of ephemeral sampler weights (``save_weights_and_get_sampling_client``).

A sampling session names its weights once (a base model, a sampler checkpoint, or ephemeral weights of a
run), but whether the caller may still read a checkpoint is checked again at every sample: unpublishing,
deleting or overwriting it revokes the sessions other keys opened on it. An *inflight* session
(``save_weights_and_get_sampling_client(kind="inflight")``) samples with its run's newest inflight weights, so
an async RL loop keeps its samplers across steps: each new inflight save moves all of them forward.
"""

from __future__ import annotations

import secrets
import time

import msgspec

from twinkle.common.wire import NotFoundError, SampleRequest, UserError

from ..core import ControlPlane, Gone
from ..core.checkpoints import parse_uri
from ..core.state import CheckpointRecord, SamplerRecord
from . import convert as C
from . import protocol as P
from .settings import TinkerSettings
from .stability import StabilityRecords


_CLIENT_SEQ_BLOCK = 1_000_000_000  # the SDK numbers a joined client's requests from client_counter * 1e9


class TinkerSampling:
    def __init__(self, settings: TinkerSettings, plane: ControlPlane, stability: StabilityRecords) -> None:
        self.settings = settings
        self.plane = plane
        self.stability = stability
        plane.add_housekeeping(self._drop_stale_ephemeral)

    async def create_sampling_session(self, owner: str, req: P.CreateSamplingSessionRequest
                                      ) -> P.CreateSamplingSessionResponse:
        await self.plane.session(owner, req.session_id, live=True)
        if req.sampling_session_seq_id < 0:
            raise UserError("must be >= 0", field="sampling_session_seq_id")
        base_model, ckpt = await self._sampling_target(owner, req.base_model, req.model_path)
        if ckpt is not None:
            self.plane.audit_checkpoint(ckpt, "checkpoint_read", owner, purpose="sample")
        sampler_id = f"{req.session_id}:sample:{req.sampling_session_seq_id}"
        model_path = req.model_path if ckpt is not None else None
        record = SamplerRecord(id=sampler_id, owner=owner, session_id=req.session_id, base_model=base_model,
                               created=time.time(), model_path=model_path,
                               adapter_path=ckpt.path if ckpt else None, run_id=ckpt.run_id if ckpt else None)
        if not await self.plane.store.create_sampler(record):
            existing = await self.plane.store.get_sampler(sampler_id, owner)
            if existing is None or existing.model_path != model_path or existing.base_model != base_model:
                raise UserError(f"sampling session {sampler_id!r} exists already with other weights; use a new "
                                "sampling_session_seq_id", field="sampling_session_seq_id")
        return P.CreateSamplingSessionResponse(sampling_session_id=sampler_id)

    async def _sampling_target(self, owner: str, base_model: str | None, model_path: str | None
                               ) -> tuple[str, CheckpointRecord | None]:
        """(base model, checkpoint) for a base model or a sampler checkpoint the caller may read *now*."""
        if (base_model is None) == (model_path is None):
            raise UserError("give a sampling_session_id, or exactly one of base_model and model_path",
                            field="base_model")
        if model_path is None:
            assert base_model is not None
            base_model = await self.plane.served_name(base_model)
            self.plane.sampler_port(base_model)
            return base_model, None
        ckpt = await self.plane.visible_checkpoint(owner, parse_uri(model_path, field="model_path"),
                                                   field="model_path")
        base = await self.plane.base_model_of(ckpt, field="model_path")
        self.plane.sampler_port(base, field="model_path")
        return base, ckpt

    async def get_sampler(self, owner: str, sampler_id: str) -> P.GetSamplerResponse:
        s = await self.plane.sampler(owner, sampler_id)
        return P.GetSamplerResponse(sampler_id=s.id, base_model=s.base_model, model_path=s.model_path)

    async def sample(self, owner: str, req: P.SampleRequestIn) -> P.UntypedFuture:
        prompt = C.input_tokens(req.prompt, "prompt")
        if not prompt:
            raise UserError("the prompt is empty", field="prompt")
        num_samples = 1 if req.num_samples is None else req.num_samples
        params = C.sampling_params(req.sampling_params, num_samples, self.settings.limits)
        last_n = C.prompt_logprobs_last_n(req, len(prompt))
        dedupe, session_id = None, None
        if req.sampling_session_id is not None:
            base_model, adapter_path, session_id = await self._session_weights(owner, req.sampling_session_id)
            if req.seq_id is not None:
                dedupe = (req.sampling_session_id, req.seq_id)
        else:
            base_model, ckpt = await self._sampling_target(owner, req.base_model, req.model_path)
            adapter_path = ckpt.path if ckpt is not None else None
        port = self.plane.sampler_port(base_model)
        request = SampleRequest(
            prompt=prompt, sampling_params=params, num_samples=num_samples, prompt_logprobs=bool(req.prompt_logprobs),
            adapter_path=adapter_path, topk_prompt_logprobs=req.topk_prompt_logprobs or 0,
            topk_sample_logprobs=req.topk_sample_logprobs or 0, prompt_alt_tokens_k=req.prompt_alt_tokens_k or 0,
            target_prompt_logprobs=C.target_prompt_ids(req.target_prompt_logprobs, len(prompt), self.settings.limits))

        async def work():
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
            if last_n is not None:
                cut = len(prompt) - last_n
                if out.prompt_logprobs is not None:
                    out.prompt_logprobs = [None] * cut + list(out.prompt_logprobs[cut:])
                if out.topk_prompt is not None:
                    out.topk_prompt.ids[:cut] = [[]] * cut
                    out.topk_prompt.logprobs[:cut] = [[]] * cut
            if req.record_stability_info:
                await self.stability.record(owner, session_id, ids, out)
            return out

        ids = [f"seq-{secrets.token_hex(8)}" for _ in range(num_samples)]
        record = await self.plane.submit(owner, "sample", work, dedupe=dedupe,
                                         meta={"sample_sequence_ids": ids, "prompt_tokens": len(prompt),
                                               "session_id": session_id, "base_model": base_model})
        return P.UntypedFuture(request_id=record.request_id,
                               sample_sequence_ids=list((record.meta or {}).get("sample_sequence_ids") or ids))

    async def join(self, owner: str, sampling_session_id: str) -> P.JoinSamplingSessionResponse:
        """``join_sampling_session``: a copy of a SamplingClient (pickled into a worker) gets its own number, so
        its seq_ids (``number * 1e9 + n``) never collide with another copy's."""
        counter = await self.plane.store.join_sampler(sampling_session_id, owner)
        if counter is None:
            raise NotFoundError(f"no sampling session {sampling_session_id!r}", field="sampling_session_id")
        if counter * _CLIENT_SEQ_BLOCK > self.settings.limits.max_seq_id:
            raise UserError(f"{counter} clients joined this sampling session; create a new sampling client",
                            field="sampling_session_id", status=429)
        return P.JoinSamplingSessionResponse(client_counter=counter)

    async def retrieve_futures(self, owner: str, req: P.FuturesRetrieveRequest) -> P.FuturesRetrieveResponse:
        """``retrieve_futures``: the completion queue of one (possibly joined) client of a sampling session, so
        the SDK long-polls once per client instead of once per request. The cursor is the finish time, in
        microseconds, of the newest completion reported; it is durable, so a poll resumes across restarts."""
        target = req.target
        if target.type != "sampling_session":
            raise UserError(f"unknown target type {target.type!r}; expected sampling_session", field="target.type")
        await self.plane.sampler(owner, target.sampling_session_id)
        if not 0 <= target.cloned_sampler_id < _CLIENT_SEQ_BLOCK:
            raise UserError(f"must be in [0, {_CLIENT_SEQ_BLOCK})", field="target.cloned_sampler_id")
        if req.prev_cursor < 0:
            raise UserError("must be >= 0", field="prev_cursor")
        lo = target.cloned_sampler_id * _CLIENT_SEQ_BLOCK
        rows = await self.plane.futures.completions(owner, target.sampling_session_id, lo, lo + _CLIENT_SEQ_BLOCK - 1,
                                                    req.prev_cursor, req.timeout)
        return P.FuturesRetrieveResponse(
            completions=[P.FutureCompletionOut(state="finished" if status == "done" else "failed", request_id=rid,
                                               response_payload_uncompressed_size=size if status == "done" else None)
                         for rid, status, size, _ in rows],
            cursor=rows[-1][3] if rows else req.prev_cursor)

    async def cancel(self, owner: str, request_id: str) -> None:
        """``cancel_future``: a sampling request still queued or running stops (the sampler drops it at its next
        step); one already finished is left as it is."""
        if await self.plane.futures.cancel(request_id, owner, frozenset({"sample"})) is None:
            raise NotFoundError(f"no request {request_id!r}", field="request_id")

    async def _session_weights(self, owner: str, sampler_id: str) -> tuple[str, str | None, str | None]:
        """(base model, adapter directory, session id) of a sampling session, checked again at every sample: a checkpoint
        unpublished, deleted or overwritten by its owner is no longer readable through older sessions."""
        s = await self.plane.sampler(owner, sampler_id)
        if s.inflight and s.run_id is not None:  # the run's newest inflight weights: these or newer ones
            s = msgspec.structs.replace(s, adapter_path=await self.plane.inflight_weights(s.run_id))
        if s.ephemeral and s.adapter_path is None:
            raise Gone(f"the weights of sampling session {s.id!r} were cleaned up (a run keeps its newest "
                       f"{self.settings.ephemeral_keep} save_weights_and_get_sampling_client weights, and none "
                       "long after its session ends); save weights for sampling again")
        if s.model_path is not None:
            ckpt = await self.plane.visible_checkpoint(owner, parse_uri(s.model_path, field="model_path"),
                                                       field="model_path")
            if ckpt.owner != owner and ckpt.created > s.created:
                raise NotFoundError(f"checkpoint {s.model_path} was replaced after this sampling session was "
                                    "created; create a new sampling client", field="model_path")
        self.plane.store.touch_sampler_background(s.id, time.time())
        return s.base_model, s.adapter_path, s.session_id

    async def _drop_stale_ephemeral(self, now: float) -> dict[str, int]:
        stale = await self.plane.store.stale_ephemeral_samplers(now - self.settings.ephemeral_ttl_s)
        for s in stale:
            await self.plane.drop_sampler_weights(s)
        return {"ephemeral": len(stale)}

