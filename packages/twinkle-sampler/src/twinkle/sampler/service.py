"""``SamplerService``: what the Sampler deployment (Ray Serve replica + Litestar app) calls.

One service owns one engine over one base model. ``sample`` validates the request (a ``UserError`` naming the
field), hands it to the engine, which batches it with whatever else is in flight, and returns the
``SampleOutput``. ``health`` and ``info`` are cheap and never wait for compute.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator

import msgspec

from twinkle.common.models import tokenizer_id
from twinkle.common.wire import SampleOutput, SampleRequest, ServiceHealth, ServiceInfo

from .engine import SamplerEngine, make_engine


class SamplerService:
    def __init__(
        self,
        model_id: str,
        sampler_type: str = "torch",
        engine_args: dict[str, Any] | None = None,
        max_loras: int = 8,
        device: str | None = None,
        *,
        engine: SamplerEngine | None = None,
    ) -> None:
        """``engine``: an already-built engine to serve (tests and benchmarks share one); else one is made."""
        self.model_id = model_id
        self.sampler_type = sampler_type
        self.engine = engine or make_engine(sampler_type, model_id, engine_args, max_loras, device)
        self._started = time.time()
        self._served = 0
        self._failed = 0
        self._in_flight = 0
        self._tokenizer_id: str | None = None

    async def sample(self, req: SampleRequest, tokens: Any = None) -> SampleOutput:
        """``tokens(request index, sample index, token, logprob)``: told of each token as it is sampled."""
        self.engine.resolve(req)  # validate here, so a bad request never reaches the engine's queue
        self._in_flight += 1
        try:
            (out,) = await self.engine.generate([req], tokens=tokens)
        except asyncio.CancelledError:  # the caller went away (cancel_future): not a failure of the sampler
            raise
        except BaseException:
            self._failed += 1
            raise
        finally:
            self._in_flight -= 1
        self._served += 1
        return out

    async def sample_stream(self, req: SampleRequest) -> AsyncIterator[tuple[int, int, float] | SampleOutput]:
        """``sample``, telling each token as it is sampled: ``(sample index, token, logprob)`` tuples, then the
        ``SampleOutput``. Closing the iterator early cancels the request (its rows leave the batch)."""
        queue: asyncio.Queue = asyncio.Queue()
        task = asyncio.ensure_future(self.sample(req, tokens=lambda _i, s, t, lp: queue.put_nowait((s, t, lp))))
        task.add_done_callback(lambda _t: queue.put_nowait(None))
        try:
            while True:
                item = await queue.get()
                if item is None:
                    break
                yield item
            yield await task
        finally:
            if not task.done():
                task.cancel()

    async def health(self) -> ServiceHealth:
        return ServiceHealth(
            kind="sampler",
            uptime_s=round(time.time() - self._started, 3),
            queued=self._in_flight,
            served=self._served,
            failed=self._failed,
        )

    async def info(self) -> ServiceInfo:
        if self._tokenizer_id is None:  # resolving it may look the model up on its hub: once is enough
            self._tokenizer_id = await asyncio.to_thread(tokenizer_id, self.model_id)
        return msgspec.structs.replace(self.engine.info(), tokenizer_id=self._tokenizer_id)

    async def close(self) -> None:
        await self.engine.close()
