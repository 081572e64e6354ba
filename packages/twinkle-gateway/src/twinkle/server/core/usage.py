"""Usage accounting: per key, per UTC hour, per session and base model, what the key's requests used.

``UsageLedger.finished`` sees every request's outcome (a ``Futures`` observer) and adds to the hourly buckets
of the store: ``training`` tokens (forward and forward/backward), ``sampling_prefill`` (a sample's prompt)
and ``sampling_sample`` tokens (generated), ``checkpoint`` saves. The numbered requests carry their run's
session and base model in their meta, samples their sampling session's. Served to clients on the routes the
Tinker SDK's billing methods use (``tinker/router.py``); storage is read live from the checkpoints.
"""

from __future__ import annotations

from typing import Any

from .state import FutureRecord, Store

HOUR_S = 3600
CHECKPOINT_KINDS = frozenset({"save_weights", "save_weights_for_sampler", "save_weights_external"})


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
            add("training", sum(len(out["logprobs"].data) for out in value.loss_fn_outputs if "logprobs" in out))
        elif record.kind == "sample":
            add("sampling_prefill", int(meta.get("prompt_tokens") or 0))
            add("sampling_sample", sum(len(s.tokens) for s in value.sequences))
        elif record.kind in CHECKPOINT_KINDS:
            add("checkpoint", 1)
