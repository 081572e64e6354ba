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

from datetime import date, datetime, timezone
from typing import Any

from twinkle.common.outcomes import Outcome, measured
from twinkle.common.wire import UserError

from .state import FutureRecord, Store

HOUR_S = 3600
# the saves of Tinker's routes, and the native protocol's "save"
CHECKPOINT_KINDS = frozenset({"save_weights", "save_weights_for_sampler", "save_weights_external", "save"})


MAX_USAGE_WINDOW_S = 14 * 86400
AUDIT_EVENT_PREFIXES = {"all": "", "checkpoints": "checkpoint_", "projects": "project_", "teams": "team_",
                        "organizations": "organization_"}


def usage_window(starting_on: str, ending_before: str) -> tuple[int, int]:
    """The UTC hours ``[start, end)`` of a usage query: ISO 8601 times on hour boundaries, at most 14 days."""
    start, end = _hour(starting_on, "starting_on"), _hour(ending_before, "ending_before")
    if not start < end <= start + MAX_USAGE_WINDOW_S:
        raise UserError("the window must be non-empty and at most 14 days", field="ending_before")
    if start > datetime.now(timezone.utc).timestamp():
        raise UserError("must not be in the future", field="starting_on")
    return start, end


def audit_window(event_type: str, day: str | None) -> tuple[str, float, float]:
    """An audit query's event prefix and its UTC day (default today) as ``[start, end)``. ``event_type``: ``all``
    or ``checkpoints`` (the others name things this server does not have, so they are always empty)."""
    if event_type not in AUDIT_EVENT_PREFIXES:
        raise UserError(f"unknown event_type {event_type!r}; one of {', '.join(AUDIT_EVENT_PREFIXES)}",
                        field="event_type")
    try:
        start_day = date.fromisoformat(day) if day else datetime.now(timezone.utc).date()
    except ValueError:
        raise UserError(f"expected a date like 2026-12-03, got {day!r}", field="day") from None
    start = datetime(start_day.year, start_day.month, start_day.day, tzinfo=timezone.utc).timestamp()
    return AUDIT_EVENT_PREFIXES[event_type], start, start + 86400


def _hour(value: str, field: str) -> int:
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise UserError(f"expected an ISO 8601 time, got {value!r}", field=field) from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    seconds = t.timestamp()
    if seconds % HOUR_S:
        raise UserError("must be aligned to a UTC hour boundary", field=field)
    return int(seconds)


def outcome_of(record: FutureRecord, value: Any) -> Outcome:
    """The ``Outcome`` of a future the central app served (``value``: its result, None unless done)."""
    meta = record.meta or {}
    status = "done" if record.status == "done" else record.category or "failed"
    done = status == "done"
    return Outcome(owner=record.owner, kind=record.kind, created=record.created,
                   finished=record.finished if record.finished is not None else record.created, status=status,
                   run_id=record.model_id, session_id=meta.get("session_id"), base_model=meta.get("base_model"),
                   prompt_tokens=int(meta.get("prompt_tokens") or 0) if done else 0,
                   **(measured(record.kind, value) if done else {}))


class UsageLedger:
    def __init__(self, store_of: Any) -> None:
        self._store_of = store_of  # () -> Store: the plane opens its store after the observers are wired

    def finished(self, o: Outcome) -> None:
        if o.status != "done":
            return
        store: Store = self._store_of()
        hour = int(o.finished // HOUR_S) * HOUR_S

        def add(kind: str, quantity: int) -> None:
            if quantity:
                store.add_usage_background(o.owner, hour, o.session_id, o.base_model, kind, quantity)

        add("training", o.trained_tokens)
        add("sampling_prefill", o.prompt_tokens)
        add("sampling_sample", o.sampled_tokens)
        if o.kind in CHECKPOINT_KINDS:
            add("checkpoint", 1)


class RunHistory:
    def __init__(self, store_of: Any) -> None:
        self._store_of = store_of
        self._since_step: dict[str, list[float]] = {}  # run -> [loss, tokens] of its passes since its last step

    def finished(self, o: Outcome) -> None:
        if o.status != "done" or o.run_id is None:
            return
        if o.kind == "forward_backward":
            acc = self._since_step.setdefault(o.run_id, [0.0, 0])
            acc[0] += o.loss_sum or 0.0
            acc[1] += o.trained_tokens
        elif o.kind == "optim_step":
            loss, tokens = self._since_step.pop(o.run_id, (None, 0))
            if o.step is not None:
                self._store_of().add_step_background(o.run_id, o.step, o.finished, loss, int(tokens), o.learning_rate,
                                                     o.grad_norm)
