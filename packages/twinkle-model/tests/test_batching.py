"""Memory-aware execution: a request split into micro-batches (and its logits into chunks) gives the result of
one pass — outputs, metrics and accumulated gradients — for every loss.

Tolerances: the same float32 sums in other groupings (per micro-batch, per chunk) differ by rounding only;
1e-5 relative is ~100 ulp of float32 for the reductions here (a few hundred terms)."""

from __future__ import annotations

import pytest
import torch
from model_testutil import make_batch
from twinkle.common.wire import LoraConfig, UserError
from twinkle.model.batching import micro_batches, one_pass

LOSSES = [("cross_entropy", {}), ("importance_sampling", {}), ("ppo", {}), ("cispo", {}), ("dro", {}),
          ("gspo", {}), ("stable_reinforce", {})]


def test_micro_batches_respect_the_budget_shortest_first():
    lengths = [512] + [1] * 100
    groups = micro_batches(lengths, 256)
    assert groups[0] == list(range(1, 101)) and groups[1] == [0]  # short ones together, the long one alone
    assert sorted(i for g in groups for i in g) == list(range(101))
    for g in micro_batches([7, 3, 9, 2, 8, 8, 1], 16):
        assert len(g) * max([7, 3, 9, 2, 8, 8, 1][i] for i in g) <= 16 or len(g) == 1
    assert micro_batches([5, 5], 10) == [[0, 1]]
    with pytest.raises(ValueError):
        micro_batches([1], 0)


def test_one_pass_agrees_with_the_grouping():
    import random

    rng = random.Random(0)
    cases = [[], [0], [900], [0, 0, 0], [5, 5], [5, 6], [512] + [1] * 100]
    cases += [[rng.randrange(0, 40) for _ in range(rng.randrange(1, 12))] for _ in range(500)]
    for lengths in cases:
        for budget in (1, 10, 64, 256):
            assert one_pass(lengths, budget) == (len(micro_batches(lengths, budget)) <= 1), (lengths, budget)


def _grads(backend, run_id):
    return {k: p.grad.clone() for k, p in backend._runs[run_id].params.items() if p.grad is not None}


@pytest.mark.parametrize("loss,cfg", LOSSES)
def test_micro_batched_request_equals_one_pass(backend, loss, cfg):
    batch = make_batch([9, 2, 14, 5, 1, 11], 31, loss, **cfg)
    one, many = f"one-{loss}", f"many-{loss}"
    for rid in (one, many):
        backend.create_adapter(rid, LoraConfig(rank=4, seed=5))
    budget, chunk = backend.token_budget, backend.logits_chunk
    try:
        out_one = backend.forward_backward(one, batch)
        backend.token_budget, backend.logits_chunk = 14, 5  # several passes, several chunks per pass
        out_many = backend.forward_backward(many, batch)
    finally:
        backend.token_budget, backend.logits_chunk = budget, chunk
    for a, b in zip(out_one.loss_fn_outputs, out_many.loss_fn_outputs):  # outputs in the request's order
        torch.testing.assert_close(torch.tensor(a["logprobs"].data), torch.tensor(b["logprobs"].data),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.tensor(a["elementwise_loss"].data),
                                   torch.tensor(b["elementwise_loss"].data), rtol=1e-5, atol=1e-5)
    assert out_one.metrics.keys() == out_many.metrics.keys()
    for key in out_one.metrics:
        assert out_many.metrics[key] == pytest.approx(out_one.metrics[key], rel=1e-5, abs=1e-5), key
    g_one, g_many = _grads(backend, one), _grads(backend, many)
    assert g_one.keys() == g_many.keys() and g_one
    for k in g_one:  # absolute error relative to the tensor's scale: tiny entries are sums of cancelling terms
        scale = float(g_one[k].abs().max())
        torch.testing.assert_close(g_one[k], g_many[k], rtol=1e-4, atol=1e-5 * scale)


def test_forward_only_is_split_the_same_way(backend):
    batch = make_batch([3, 17, 4], 8)
    backend.create_adapter("fwd", LoraConfig(rank=2, seed=1))
    whole = backend.forward_backward("fwd", batch, forward_only=True)
    budget = backend.token_budget
    try:
        backend.token_budget = 4
        split = backend.forward_backward("fwd", batch, forward_only=True)
    finally:
        backend.token_budget = budget
    assert split.metrics["loss:sum"] == pytest.approx(whole.metrics["loss:sum"], rel=1e-5)
    assert all(p.grad is None for p in backend._runs["fwd"].params.values())


def test_chunked_logprobs_equal_full_logits(backend):
    backend.create_adapter("chunks", LoraConfig(rank=4, seed=2))
    backend._activate([backend._runs["chunks"]])
    req = make_batch([6, 3, 10], 4)
    from twinkle.model.losses import validate_request

    ids, valid, inputs = backend._pad([validate_request(req, vocab_size=backend.vocab_size)])
    with torch.no_grad():
        full = backend._full_target_logprobs(ids, valid, inputs["target_tokens"])
        chunk = backend.logits_chunk
        try:
            backend.logits_chunk = 4
            chunked = backend._target_logprobs(ids, valid, inputs["target_tokens"])
        finally:
            backend.logits_chunk = chunk
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)
    assert bool((chunked[valid == 0] == 0).all())


def test_datums_over_the_per_datum_limit_are_refused_naming_the_field(tiny_model_id):
    from twinkle.model.transformers_backend import TransformersBackend

    b = TransformersBackend(tiny_model_id, device="cpu", max_tokens_per_datum=8)
    try:
        b.create_adapter("limited", LoraConfig(rank=2, seed=0))
        with pytest.raises(UserError) as e:
            b.forward_backward("limited", make_batch([4, 9], 1))
        assert e.value.field == "data[1].model_input" and "9 tokens" in str(e.value) and "8" in str(e.value)
        b.forward_backward("limited", make_batch([4, 8], 1))
    finally:
        b.close()
