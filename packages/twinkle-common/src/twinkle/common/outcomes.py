"""What a finished request used, told to the central server whichever app served it.

The central server's usage accounting, run histories and metrics read ``Outcome``s. The central app makes one
from every request it serves itself (its futures: all of Tinker mode); in twinkle mode the model and sampler
apps serve training and sampling directly, and report an ``Outcome`` of each such request to the central server
(``OutcomeReporter``: batched, off the request's path; a central server that is away costs the reports made
meanwhile, never a request).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Any, Awaitable, Callable

import msgspec

log = logging.getLogger("twinkle.outcomes")


class Outcome(msgspec.Struct, kw_only=True, frozen=True):
    owner: str
    kind: str  # forward, forward_backward, optim_step, sample, save_weights, …
    created: float
    finished: float
    status: str = "done"  # else the error's category ("user", "server") or "failed"
    run_id: str | None = None
    seq_id: int | None = None  # a run's numbered request: a replay of it is answered again, not accounted again
    session_id: str | None = None
    base_model: str | None = None
    trained_tokens: int = 0  # forward / forward_backward: one per input token of each datum
    loss_sum: float | None = None  # forward_backward
    step: int | None = None  # optim_step: the run's step after it, its learning rate and gradient norm
    learning_rate: float | None = None
    grad_norm: float | None = None
    prompt_tokens: int = 0  # sample
    sampled_tokens: int = 0


def measured(kind: str, value: Any) -> dict[str, Any]:
    """The ``Outcome`` fields a finished request's result (a ``twinkle.common.wire`` output) gives."""
    if value is None:
        return {}
    if kind in ("forward", "forward_backward"):
        tokens = sum(len(o["logprobs"].data) for o in value.loss_fn_outputs if "logprobs" in o)
        loss = value.metrics.get("loss:sum") if kind == "forward_backward" else None
        return {"trained_tokens": tokens, "loss_sum": None if loss is None else float(loss)}
    if kind == "optim_step":
        metrics = value.metrics or {}
        step = metrics.get("step:max")
        return {"step": None if step is None else int(step), "learning_rate": metrics.get("learning_rate:mean"),
                "grad_norm": metrics.get("grad_norm:mean")}
    if kind == "sample":
        return {"sampled_tokens": sum(len(s.tokens) for s in value.sequences)}
    return {}


class OutcomeReporter:
    """Sends a component's outcomes to the central server in batches, on its own task: ``tell`` never waits.
    At most ``max_pending`` wait to be sent; beyond that the oldest are dropped (and counted in the log)."""

    def __init__(self, send: Callable[[list[Outcome]], Awaitable[None]], *, max_pending: int = 10_000,
                 max_batch: int = 512) -> None:
        self._send = send
        self._pending: collections.deque[Outcome] = collections.deque(maxlen=max_pending)
        self._max_batch = max_batch
        self._task: asyncio.Task | None = None
        self.dropped = 0

    def tell(self, outcome: Outcome) -> None:
        if len(self._pending) == self._pending.maxlen:
            self.dropped += 1
        self._pending.append(outcome)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        while self._pending:
            batch = [self._pending.popleft() for _ in range(min(self._max_batch, len(self._pending)))]
            try:
                await self._send(batch)
            except Exception as e:  # noqa: BLE001 - accounting never fails a request; the loss is logged
                log.warning("could not report %d request outcome(s) to the central server: %s", len(batch),
                            type(e).__name__)
        if self.dropped:
            log.warning("dropped %d request outcome(s): the central server took them too slowly", self.dropped)
            self.dropped = 0
