"""The Sampler application as a Ray Serve deployment.

The replica hosts the HTTP app and spreads requests over the component's workers: one ``SamplerService``
per planned rank (``dp_size`` of them, each on its own device). With a single CPU worker the service lives
in the replica itself; GPU workers are pinned Ray actors (see ``twinkle.common.workers``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from typing import Any, AsyncIterator

import msgspec
from litestar import Litestar
from ray import serve

from twinkle.common.binding import bind_component, start_workers, with_workers_alive
from twinkle.common.component import ComponentSpec
from twinkle.common.wire import SampleOutput, SampleRequest, ServiceHealth, ServiceInfo
from twinkle.common.workers import InProcessWorker

from .app import create_sampler_app

_SERVICE = "twinkle.sampler.service:SamplerService"


@serve.ingress()
class SamplerManagement:
    def __init__(self, spec: ComponentSpec) -> None:
        self.spec = spec
        args = spec.args
        options = dict(
            sampler_type=args.get("sampler_type") or "torch",
            engine_args=args.get("engine_args") or {},
            max_loras=args.get("max_loras") or 8,
        )
        self.workers = start_workers(spec, _SERVICE, lambda w: ((args["model_id"],), options))
        self._inflight = [0] * len(self.workers)
        self._tie_break = itertools.count()

    def _pick(self) -> int:
        # Least in-flight work first; ties rotate so equal workers share the load.
        turn = next(self._tie_break)
        n = len(self.workers)
        return min(range(n), key=lambda i: (self._inflight[i], (i - turn) % n))

    @contextlib.contextmanager
    def _worker(self):
        """The worker with the least in-flight work, counted as busy while the caller uses it."""
        i = self._pick()
        self._inflight[i] += 1
        try:
            yield self.workers[i]
        finally:
            self._inflight[i] -= 1

    async def sample(self, req: SampleRequest) -> SampleOutput:
        with self._worker() as worker:
            return await worker.call("sample", req)

    async def sample_stream(self, req: SampleRequest) -> AsyncIterator[Any]:
        """``SamplerService.sample_stream`` of a worker in this replica (tokens as they are sampled); a worker in
        another process answers once, with its whole output."""
        with self._worker() as worker:
            if isinstance(worker, InProcessWorker):
                async for item in worker.target.sample_stream(req):
                    yield item
            else:
                yield await worker.call("sample", req)

    async def health(self) -> ServiceHealth:
        """The workers' counters added up; degraded while some worker does not answer, down when none does."""
        answers = await asyncio.gather(*(w.call("health") for w in self.workers), return_exceptions=True)
        alive = [h for h in answers if isinstance(h, ServiceHealth)]
        if not alive:
            raise next(e for e in answers if isinstance(e, BaseException))
        total = ServiceHealth(
            kind="sampler",
            uptime_s=min(h.uptime_s for h in alive),
            queued=sum(h.queued or 0 for h in alive),
            served=sum(h.served or 0 for h in alive),
            failed=sum(h.failed or 0 for h in alive),
        )
        return with_workers_alive(total, len(self.workers), len(alive))

    async def info(self) -> ServiceInfo:
        info = await self.workers[0].call("info")
        workers = await asyncio.gather(*(w.describe() for w in self.workers))
        return msgspec.structs.replace(info, app=self.spec.app_name, dp_size=len(self.workers), workers=list(workers))

    def __serve_build_asgi_app__(self) -> Litestar:
        from twinkle.common.authority import central_authority
        from twinkle.common.models import served_model_name

        return create_sampler_app(self, central_authority(self.spec), model_name=served_model_name(self.spec.args["model_id"]))


def build_application(spec: ComponentSpec, deployment: Any, default_name: str):
    return bind_component(SamplerManagement, spec, deployment, default_name)
