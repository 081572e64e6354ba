"""Usage accounting and run histories, from every request's outcome.

Usage: per key, per UTC hour, per session and base model, what the key's requests used.

``UsageLedger.finished`` sees every request's outcome (a ``Futures`` observer) and adds to the hourly buckets
of the store: ``training`` tokens (forward and forward/backward), ``sampling_prefill`` (a sample's prompt)
and ``sampling_sample`` tokens (generated), ``checkpoint`` saves. The numbered requests carry their run's
session and base model in their meta, samples their sampling session's. Served to clients on the routes the
Tinker SDK's billing methods use (``tinker/router.py``); storage is read live from the checkpoints.

Run history (``RunHistory``): one compact row per optimizer step of each run — the step, its time, the loss
summed over the forward/backward passes since the previous step, their tokens, the learning rate and the
gradient norm — kept with the run and deleted with it.
"""

from __future__ import annotations

from typing import Any

from .state import FutureRecord, Store

HOUR_S = 3600
CHECKPOINT_KINDS = frozenset({"save_weights", "save_weights_for_sampler", "save_weights_external"})


def trained_tokens(out: Any) -> int:
    """Tokens a forward/backward result covered: one logprob per input token of each datum."""
    return sum(len(o["logprobs"].data) for o in out.loss_fn_outputs if "logprobs" in o)


class UsageLedger:
    def __init__(self, store_of: Any) -> None:
        self._store_of = store_of  # () -> Store: the plane opens its store after the observers are wired

    def finished(self, record: FutureRecord, value: Any) -> None:
        if record.status != "done" or value is None or record.finished is None:
            return
        store: Store = self._store_of()
        meta = record.meta or {}
        hour = int(record.finished // HOUR_S) * HOUR_S

        def add(kind: str, quantity: int) -> None:
            if quantity:
                store.add_usage_background(record.owner, hour, meta.get("session_id"), meta.get("base_model"), kind,
                                           quantity)

        if record.kind in ("forward_backward", "forward"):
            add("training", trained_tokens(value))
        elif record.kind == "sample":
            add("sampling_prefill", int(meta.get("prompt_tokens") or 0))
            add("sampling_sample", sum(len(s.tokens) for s in value.sequences))
        elif record.kind in CHECKPOINT_KINDS:
            add("checkpoint", 1)


class RunHistory:
    def __init__(self, store_of: Any) -> None:
        self._store_of = store_of
        self._since_step: dict[str, list[float]] = {}  # run -> [loss, tokens] of its passes since its last step

    def finished(self, record: FutureRecord, value: Any) -> None:
        if record.status != "done" or value is None or record.model_id is None or record.finished is None:
            return
        if record.kind == "forward_backward":
            acc = self._since_step.setdefault(record.model_id, [0.0, 0])
            acc[0] += float(value.metrics.get("loss:sum", 0.0))
            acc[1] += trained_tokens(value)
        elif record.kind == "optim_step":
            metrics = value.metrics or {}
            step = metrics.get("step:max")
            loss, tokens = self._since_step.pop(record.model_id, (None, 0))
            if step is not None:
                self._store_of().add_step_background(record.model_id, int(step), record.finished, loss, int(tokens),
                                                     metrics.get("learning_rate:mean"), metrics.get("grad_norm:mean"))
