"""The Sampler service's Litestar app: health and info, plus the native Twinkle ``POST /sample`` route.

``sampler`` is anything with async ``sample(SampleRequest)``, ``health()`` and ``info()`` (the Serve
deployment, or a service in tests). The native route is mounted when an ``authority`` is given
(``twinkle.common.authority``): it authenticates the caller and turns a checkpoint URI into the adapter
directory — only for a checkpoint the caller owns (or a published one) of this sampler's base model.
Clients never send a server path; ``SampleRequest.adapter_path`` is filled here, from the central
server's answer. What each sample used is reported to the central server afterwards (``OutcomeReporter``).
"""

from __future__ import annotations

import time
from typing import Any

from litestar import Litestar, Request, post
from twinkle.common.authority import Authority, principal_of
from twinkle.common.http import component_app, served_model_name
from twinkle.common.limits import DEFAULT_LIMITS
from twinkle.common.native import MAX_BODY_BYTES, SampleRequestIn, decode
from twinkle.common.outcomes import Outcome, OutcomeReporter, measured
from twinkle.common.wire import SampleOutput, SampleRequest, UserError, remote_call

#: Most continuations of one prompt per request (the Tinker front-end's limit too).
MAX_NUM_SAMPLES = DEFAULT_LIMITS.max_num_samples


def create_sampler_app(sampler: Any, authority: Authority | None = None, *, model_name: str | None = None) -> Litestar:
    routes = [_sample_route(sampler, authority, model_name)] if authority is not None else []
    return component_app("Twinkle sampler", "twinkle-sampler", sampler, routes)


def _sample_route(sampler: Any, authority: Authority, model_name: str | None):
    served_name = served_model_name(sampler, model_name)
    reporter = OutcomeReporter(authority.report)

    @post("/sample", status_code=200, request_max_body_size=MAX_BODY_BYTES)
    async def sample(request: Request) -> SampleOutput:
        owner = await principal_of(request, authority)
        req = decode(await request.body(), SampleRequestIn)
        if not req.prompt_tokens:
            raise UserError("the prompt is empty", field="prompt_tokens")
        if not 1 <= req.num_samples <= MAX_NUM_SAMPLES:
            raise UserError(f"must be between 1 and {MAX_NUM_SAMPLES}", field="num_samples")
        params = req.sampling_params.to_wire()
        adapter_path = None
        if req.model_uri is not None:
            adapter_path = (await authority.resolve_checkpoint(owner, req.model_uri, await served_name())).path
        wire = SampleRequest(prompt=list(req.prompt_tokens), sampling_params=params, num_samples=req.num_samples,
                             prompt_logprobs=req.prompt_logprobs, adapter_path=adapter_path)
        started = time.time()
        try:
            out = await remote_call(sampler.sample(wire))
            reporter.tell(Outcome(owner=owner, kind="sample", created=started, finished=time.time(),
                                  base_model=await served_name(), prompt_tokens=len(wire.prompt),
                                  **measured("sample", out)))
            return out
        except UserError as e:
            if e.field == "adapter_path":  # the client named a URI: speak of it, never of the path
                message = e.message.replace(adapter_path or "\0", str(req.model_uri))
                raise UserError(message, field="model_uri", status=e.status) from None
            raise

    return sample
