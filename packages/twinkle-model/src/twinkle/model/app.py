"""The Model service's Litestar app: health and info, plus the native Twinkle routes of a training run.

``model`` is anything with the async ``ModelService`` API (the Serve deployment, or the service itself in
tests). The native routes are mounted when an ``authority`` is given (``twinkle.common.authority``: the
central server, which authenticates callers and keeps checkpoint records):

==========  =====================================  ==========================================================
GET         /runs/{run_id}                         the run now (step, LoRA, ``next_seq_id``)
POST        /runs/{run_id}/forward                 logprobs and loss, no gradients
POST        /runs/{run_id}/forward_backward        accumulate gradients
POST        /runs/{run_id}/optim_step              one AdamW step
POST        /runs/{run_id}/save                    a checkpoint (``state`` or ``sampler``): a future + its URI
POST        /runs/{run_id}/load                    a ``twinkle://`` state checkpoint into the run: a future
==========  =====================================  ==========================================================

These call the very ``ModelService`` methods the Tinker front-end calls, with the client's ``seq_id``: the
same per-run ordering and de-duplication (a retried ``seq_id`` is answered from its first execution).
A numbered request whose body cannot even be decoded still uses up its ``seq_id`` (``ModelService.skip``),
so a bad request never stalls the run's later ones. What each training request used (tokens, loss, the step)
is reported to the central server afterwards (``OutcomeReporter``), for usage, run histories and metrics.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from litestar import Litestar, Request, get, post
from twinkle.common.authority import Authority, principal_of
from twinkle.common.outcomes import Outcome, OutcomeReporter, measured
from twinkle.common.http import component_app, release_seq_id, served_model_name
from twinkle.common.native import (
    MAX_BODY_BYTES,
    FutureRef,
    LoadRequest,
    OptimStepRequest,
    RunState,
    SaveRequest,
    TrainRequest,
    decode,
    peek_seq_id,
)
from twinkle.common.wire import (AdamParams, ForwardBackwardInput, ForwardBackwardOutput, OptimStepOutput,
                                 ResyncNeeded, UserError, remote_call)

log = logging.getLogger("twinkle.model.app")

_MAX_SETTLED = 4096  # seq_ids a restored run may be told ran elsewhere at once


def create_model_app(model: Any, authority: Authority | None = None, *, model_name: str | None = None) -> Litestar:
    routes = _native_routes(model, authority, model_name) if authority is not None else []
    return component_app("Twinkle model", "twinkle-model", model, routes)


def _native_routes(model: Any, authority: Authority, model_name: str | None) -> list:
    served_name = served_model_name(model, model_name)
    reporter = OutcomeReporter(authority.report)

    async def report(owner: str, kind: str, run_id: str, seq_id: int | None, started: float, out: Any) -> None:
        reporter.tell(Outcome(owner=owner, kind=kind, run_id=run_id, seq_id=seq_id, created=started,
                              finished=time.time(), base_model=await served_name(), **measured(kind, out)))

    async def owner_of(request: Request) -> str:
        return await principal_of(request, authority)

    async def numbered(request: Request, run_id: str, owner: str, type_: type) -> Any:
        """Decode a numbered request's body; if that fails but its ``seq_id`` is readable, release that
        number at the service before answering 400."""
        body = await request.body()
        try:
            return decode(body, type_)
        except UserError:
            seq_id = peek_seq_id(body)
            if seq_id is not None:
                await release_seq_id(model, run_id, owner, seq_id, "this request's body could not be decoded")
            raise

    async def in_order(run_id: str, owner: str, seq_id: int | None, call) -> Any:
        """Run ``call``; when a run restored after a replica restart asks which requests before ``seq_id`` ran
        on the lost replica (``ResyncNeeded``), answer "all of them": a native client sends a run's requests
        one at a time and waits for each, so every earlier seq_id was answered (their gradients count as
        lost: the next optim_step says so), and send the request again."""
        try:
            return await remote_call(call())
        except ResyncNeeded as e:
            if seq_id is None or seq_id - e.expected > _MAX_SETTLED:
                raise UserError(f"seq_id {seq_id} is far ahead of the run, which was restored at seq_id "
                                f"{e.expected}; continue from its next_seq_id", field="seq_id", status=409) from None
            earlier = [(s, "forward_backward") for s in range(e.expected, seq_id)]
            await remote_call(model.settle(run_id, owner, earlier))
            return await remote_call(call())

    @get("/runs/{run_id:str}")
    async def run_state(request: Request, run_id: str) -> RunState:
        owner = await owner_of(request)
        info = await remote_call(model.run_info(run_id, owner))
        next_seq = await remote_call(model.next_seq_id(run_id, owner))
        return RunState(run_id=info.run_id, base_model=await served_name(), lora=info.lora, step=info.step,
                        resident=info.resident, next_seq_id=next_seq)

    async def train(request: Request, run_id: str, forward_only: bool) -> ForwardBackwardOutput:
        owner = await owner_of(request)
        req: TrainRequest = await numbered(request, run_id, owner, TrainRequest)
        inp = ForwardBackwardInput(data=req.data, loss_fn=req.loss_fn, loss_fn_config=req.loss_fn_config)
        started = time.time()
        out = await in_order(run_id, owner, req.seq_id,
                             lambda: model.forward_backward(run_id, owner, req.seq_id, inp, forward_only=forward_only))
        out = _expect(out, ForwardBackwardOutput, req.seq_id, run_id)
        await report(owner, "forward" if forward_only else "forward_backward", run_id, req.seq_id, started, out)
        return out

    @post("/runs/{run_id:str}/forward", status_code=200, request_max_body_size=MAX_BODY_BYTES)
    async def forward(request: Request, run_id: str) -> ForwardBackwardOutput:
        return await train(request, run_id, True)

    @post("/runs/{run_id:str}/forward_backward", status_code=200, request_max_body_size=MAX_BODY_BYTES)
    async def forward_backward(request: Request, run_id: str) -> ForwardBackwardOutput:
        return await train(request, run_id, False)

    @post("/runs/{run_id:str}/optim_step", status_code=200)
    async def optim_step(request: Request, run_id: str) -> OptimStepOutput:
        owner = await owner_of(request)
        req: OptimStepRequest = await numbered(request, run_id, owner, OptimStepRequest)
        params = AdamParams(learning_rate=req.learning_rate, beta1=req.beta1, beta2=req.beta2, eps=req.eps,
                            weight_decay=req.weight_decay, grad_clip_norm=req.grad_clip_norm)
        started = time.time()
        out = await in_order(run_id, owner, req.seq_id, lambda: model.optim_step(run_id, owner, req.seq_id, params))
        out = _expect(out, OptimStepOutput, req.seq_id, run_id)
        await report(owner, "optim_step", run_id, req.seq_id, started, out)
        return out

    @post("/runs/{run_id:str}/save", status_code=202)
    async def save(request: Request, run_id: str) -> FutureRef:
        owner = await owner_of(request)
        req: SaveRequest = await numbered(request, run_id, owner, SaveRequest)
        return await authority.submit_save(owner, await served_name(), run_id, req)

    @post("/runs/{run_id:str}/load", status_code=202)
    async def load(request: Request, run_id: str) -> FutureRef:
        owner = await owner_of(request)
        req: LoadRequest = await numbered(request, run_id, owner, LoadRequest)
        return await authority.submit_load(owner, await served_name(), run_id, req)

    return [run_state, forward, forward_backward, optim_step, save, load]


def _expect(out: Any, type_: type, seq_id: int | None, run_id: str) -> Any:
    """A repeated ``seq_id`` is answered with its first request's result; if that request was a different
    operation (two clients numbering one run), say so instead of returning the wrong kind of result."""
    if not isinstance(out, type_):
        raise UserError(f"seq_id {seq_id} of run {run_id!r} was already used by another kind of request; continue "
                        "from the run's next_seq_id (GET …/runs/{run_id})", field="seq_id", status=409)
    return out

