"""Stability information for ``stable_reinforce``: what samplers record, and how training requests name it.

A sampling request with ``record_stability_info`` (SDK 0.38 sampling clients created with
``record_stability_info=True``) records each returned sequence's tokens and the logprob the sampler gave each
token, under the ``sequence_id`` the SDK attaches to it. A ``stable_reinforce`` datum names those sequences in
its provenance (``Datum.with_provenance``): consecutive spans tiling ``loss_fn_inputs``, each a run of a
sequence's prompt or sampled tokens. For every sampled-token span the server checks that the datum's
``target_tokens`` are the tokens that sequence sampled, and uses the *recorded* logprobs as the sampling
policy ``q`` of the loss (``twinkle.model.losses.stable_reinforce``), whatever ``logprobs`` the client sent.

As Tinker documents: recorded sequences belong to the session that sampled them (a run of another session,
or another key, cannot name them) and are kept for a day after their last use; each training request that
names one restarts its day. A key keeps at most ``max_recorded_sequences_per_key``; past it, its least
recently used ones are dropped first, and likewise past ``max_recorded_tokens_per_key`` sampled tokens.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, NamedTuple

from twinkle.common.wire import Datum, ForwardBackwardInput, SampleOutput, TensorData, UserError

from ..core.state import RunRecord, SequenceRecord

if TYPE_CHECKING:
    from ..core import ControlPlane


class Span(NamedTuple):
    """One run of a datum's provenance: ``length`` positions that are positions ``[offset, offset + length)`` of
    sequence ``sequence_id``'s sampled tokens (``sampled``) or of its request's prompt."""

    sampled: bool
    sequence_id: str
    offset: int
    length: int


class TrainingData(NamedTuple):
    """A decoded forward/backward request and, per datum, its ``loss_fn_input_spans`` (None without)."""

    input: ForwardBackwardInput
    provenance: list[list[Span] | None]


class StabilityRecords:
    def __init__(self, plane: "ControlPlane", *, keep_per_key: int, ttl_s: float,
                 keep_tokens_per_key: int | None = None) -> None:
        self.plane = plane
        self.keep_per_key = keep_per_key
        self.keep_tokens_per_key = keep_tokens_per_key
        self.ttl_s = ttl_s
        plane.add_housekeeping(self._expire)

    async def record(self, owner: str, session_id: str | None, sequence_ids: list[str], out: SampleOutput) -> None:
        records = [SequenceRecord(id=sid, owner=owner, session_id=session_id, tokens=seq.tokens,
                                  logprobs=seq.logprobs)
                   for sid, seq in zip(sequence_ids, out.sequences, strict=True)]
        await self.plane.store.record_sequences(records, time.time(), keep_per_owner=self.keep_per_key,
                                                keep_tokens_per_owner=self.keep_tokens_per_key)

    async def with_recorded_logprobs(self, owner: str, run: RunRecord, data: TrainingData) -> ForwardBackwardInput:
        """The request with each datum's ``logprobs`` taken from the recorded sequences its provenance names;
        ``UserError`` naming the field where provenance is missing, unknown, or does not match."""
        inp = data.input
        provenance = data.provenance or [None] * len(inp.data)
        wanted = sorted({s.sequence_id for spans in provenance if spans for s in spans})
        known = await self.plane.store.use_sequences(owner, wanted, time.time()) if wanted else {}
        return ForwardBackwardInput(
            data=[self._datum(i, d, spans, known, run) for i, (d, spans) in enumerate(zip(inp.data, provenance))],
            loss_fn=inp.loss_fn, loss_fn_config=inp.loss_fn_config)

    def _datum(self, i: int, datum: Datum, spans: list[Span] | None, known: dict[str, SequenceRecord],
               run: RunRecord) -> Datum:
        where = f"data[{i}]"
        if spans is None:
            raise UserError("stable_reinforce needs provenance on every datum (Datum.with_provenance, naming "
                            "sequences sampled with record_stability_info=True)", field=f"{where}.loss_fn_input_spans")
        n = len(datum.model_input)
        targets = _row(datum, "target_tokens", n, where)
        advantages = _row(datum, "advantages", n, where)
        logprobs = list(_row(datum, "logprobs", n, where, required=False) or [0.0] * n)
        sampled = [False] * n
        pos = 0
        for k, span in enumerate(spans):
            field = f"{where}.loss_fn_input_spans[{k}]"
            record = known.get(span.sequence_id)
            if record is None or (record.session_id is not None and record.session_id != run.session_id):
                raise UserError(f"no recorded sequence {span.sequence_id!r} in this session: it was not sampled "
                                "with record_stability_info=True by this session, or it expired (a day after "
                                "its last use)", field=f"{field}.sequence_id")
            if span.sampled:
                end = span.offset + span.length
                if end > len(record.tokens):
                    raise UserError(f"offset {span.offset} + length {span.length} is past the "
                                    f"{len(record.tokens)} tokens sequence {span.sequence_id!r} sampled", field=field)
                if list(targets[pos:pos + span.length]) != record.tokens[span.offset:end]:
                    raise UserError(f"target_tokens[{pos}:{pos + span.length}] are not the tokens sequence "
                                    f"{span.sequence_id!r} sampled at [{span.offset}:{end}]", field=field)
                logprobs[pos:pos + span.length] = record.logprobs[span.offset:end]
                sampled[pos:pos + span.length] = [True] * span.length
            pos += span.length
        for t in range(n):
            if advantages[t] != 0 and not sampled[t]:
                raise UserError(f"stable_reinforce takes advantages only on sampled tokens; position {t} is not "
                                "in a sampled_tokens span", field=f"{where}.loss_fn_inputs.advantages")
        inputs = dict(datum.loss_fn_inputs)
        inputs["logprobs"] = TensorData(data=logprobs, dtype="float32", shape=[n])
        return Datum(model_input=datum.model_input, loss_fn_inputs=inputs)

    async def _expire(self, now: float) -> dict[str, int]:
        return {"sampled_sequences": await self.plane.store.expire_sequences(now - self.ttl_s)}


def _row(datum: Datum, name: str, n: int, where: str, *, required: bool = True) -> list | None:
    """A per-position loss input of length ``n`` (the loss's own validation words the same errors)."""
    td = datum.loss_fn_inputs.get(name)
    field = f"{where}.loss_fn_inputs.{name}"
    if td is None:
        if required:
            raise UserError(f"loss 'stable_reinforce' needs input {name!r} (length {n})", field=field)
        return None
    if td.resolved_shape() != [n]:
        raise UserError(f"expected length {n} (one per model_input token), got shape {td.resolved_shape()}",
                        field=field)
    return td.data
