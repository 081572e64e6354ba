"""ModelService over the real backend: ownership, quota, seq order, dedup, offload, create-from-checkpoint."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from model_testutil import adapter_state, make_batch
from twinkle.common.wire import AdamParams, LoraConfig, NotFoundError, UserError
from twinkle.model.service import ModelService
from twinkle.model.transformers_backend import TransformersBackend

ADAM = AdamParams(learning_rate=1e-2, eps=1e-8)


@pytest.fixture
async def service(backend, tiny_model_id):
    svc = ModelService(tiny_model_id, backend=backend, adapter_limit_per_owner=2, adapter_timeout_s=None)
    yield svc
    await svc.close()


def _lp(out):
    return [d["logprobs"].data for d in out.loss_fn_outputs]


async def test_ownership_quota_and_listing(service):
    info = await service.create_run("own-1", "alice", LoraConfig(rank=2, seed=1))
    assert info.run_id == "own-1" and info.step == 0 and info.resident
    await service.create_run("own-2", "alice", LoraConfig(rank=2, seed=2))
    with pytest.raises(UserError) as ei:
        await service.create_run("own-3", "alice", LoraConfig(rank=2))
    assert ei.value.status == 400 and "adapter limit" in str(ei.value) and "per_token_adapter_limit = 2" in str(ei.value)
    await service.create_run("own-b", "bob", LoraConfig(rank=2, seed=3))  # bob has his own quota
    with pytest.raises(UserError) as ei:
        await service.create_run("own-1", "alice", LoraConfig(rank=2))
    assert ei.value.status == 409

    # bob cannot see, use or delete alice's runs: they look like runs that do not exist
    for call in (
        service.run_info("own-1", "bob"),
        service.forward_backward("own-1", "bob", 1, make_batch([3], 1)),
        service.optim_step("own-1", "bob", 1, ADAM),
        service.save_state("own-1", "bob", 1, "/tmp/never"),
        service.delete_run("own-1", "bob"),
    ):
        with pytest.raises(NotFoundError) as ei:
            await call
        assert ei.value.status == 404 and "own-1" in str(ei.value)
    assert [r.run_id for r in await service.list_runs("alice")] == ["own-1", "own-2"]
    assert [r.run_id for r in await service.list_runs("bob")] == ["own-b"]

    await service.delete_run("own-2", "alice")
    assert not service.backend.has_run("own-2")
    await service.create_run("own-3", "alice", LoraConfig(rank=2, seed=4))  # the quota slot is free again
    info = await service.info()
    assert info.model_name == "tiny-qwen2" and info.backend == "transformers" and info.vocab_size > 1000
    assert info.max_context_length > 0 and info.runs == 3


async def test_out_of_order_requests_match_in_order_training(service):
    cfg = LoraConfig(rank=4, seed=21)
    await service.create_run("ord-ref", "u", cfg)
    await service.create_run("ord", "u", cfg)
    first, second = make_batch([5, 7], 1), make_batch([6], 2)
    # reference: strictly sequential calls
    ref1 = await service.forward_backward("ord-ref", "u", 1, first)
    await service.forward_backward("ord-ref", "u", 2, second)
    await service.optim_step("ord-ref", "u", 3, ADAM)
    # the SDK pattern: chunks sent concurrently, chunk 1 last, optim_step before results are awaited
    t2 = asyncio.create_task(service.forward_backward("ord", "u", 2, second))
    t3 = asyncio.create_task(service.optim_step("ord", "u", 3, ADAM))
    await asyncio.sleep(0.05)
    assert not t2.done() and not t3.done()  # buffered, waiting for seq 1
    got1 = await service.forward_backward("ord", "u", 1, first)
    await asyncio.gather(t2, t3)
    assert _lp(got1) == _lp(ref1)
    a, b = adapter_state(service.backend, "ord"), adapter_state(service.backend, "ord-ref")
    assert all(torch.equal(a[k], b[k]) for k in a)

    # a retried optim_step (same seq_id) returns the first result and does not step again
    again = await service.optim_step("ord", "u", 3, ADAM)
    assert again is t3.result()
    assert (await service.run_info("ord", "u")).step == 1
    a2 = adapter_state(service.backend, "ord")
    assert all(torch.equal(a[k], a2[k]) for k in a)


async def test_errors_name_fields_and_do_not_stall_the_run(service):
    await service.create_run("err", "u", LoraConfig(rank=2, seed=5))
    with pytest.raises(UserError) as ei:
        await service.forward_backward("err", "u", 1, make_batch([3], 1, loss="nope"))
    assert ei.value.field == "loss_fn"
    with pytest.raises(UserError) as ei:
        await service.optim_step("err", "u", 2, AdamParams(learning_rate=-1.0))
    assert ei.value.field == "adam_params.learning_rate"
    out = await service.forward_backward("err", "u", 3, make_batch([3], 1))
    assert out.metrics["loss:sum"] != 0
    with pytest.raises(UserError) as ei:
        await service.create_run("bad-lora", "u", LoraConfig(rank=2, dropout=1.5))
    assert ei.value.field == "lora.dropout"


async def test_skipped_seq_id_does_not_stall_the_run(service):
    """A front end that refused seq 1 (e.g. an undecodable body) skips it; seq 2 runs at once."""
    await service.create_run("skp", "u", LoraConfig(rank=2, seed=5))
    later = asyncio.create_task(service.forward_backward("skp", "u", 2, make_batch([3], 1)))
    await asyncio.sleep(0.05)
    assert not later.done()  # waits for seq 1
    t0 = time.monotonic()
    await service.skip("skp", "u", 1, "refused by the gateway")
    out = await asyncio.wait_for(later, timeout=10)
    assert out.metrics["loss:sum"] != 0 and time.monotonic() - t0 < 10
    with pytest.raises(UserError, match="refused by the gateway"):  # a retry of seq 1 gets the refusal
        await service.forward_backward("skp", "u", 1, make_batch([3], 1))
    with pytest.raises(NotFoundError):
        await service.skip("skp", "someone-else", 3, "x")


async def test_health_answers_fast_during_a_long_step(service):
    """Compute runs on the model thread, so a health request (a task on the loop) is answered in milliseconds
    while a multi-second step runs. Percentile bound: a loaded CI box may deschedule the process briefly."""
    await service.create_run("long", "u", LoraConfig(rank=8, seed=6))
    big = make_batch([400] * 6, 3)
    t0 = time.perf_counter()
    step = asyncio.create_task(service.forward_backward("long", "u", 1, big))
    await asyncio.sleep(0.05)
    latencies, busy_seen = [], False
    while not step.done():
        t = time.perf_counter()
        h = await asyncio.create_task(service.health())  # a separate request, scheduled on the loop
        latencies.append(time.perf_counter() - t)
        busy_seen |= h.busy_for_s > 0
        await asyncio.sleep(0.01)
    await step
    step_s = time.perf_counter() - t0
    latencies.sort()
    assert busy_seen and len(latencies) >= 10, latencies
    assert latencies[int(len(latencies) * 0.95)] < 0.05, latencies[-5:]
    assert latencies[-1] < min(0.25, step_s / 4), (latencies[-5:], step_s)
    assert h.status == "ok"


async def test_idle_runs_are_offloaded_and_restored_transparently(tiny_model_id, tmp_path):
    backend = TransformersBackend(tiny_model_id, device="cpu", spill_dir=str(tmp_path))
    svc = ModelService(tiny_model_id, backend=backend, adapter_timeout_s=0.2, sweep_interval_s=0.05)
    try:
        await svc.create_run("idle", "u", LoraConfig(rank=4, seed=7))
        await svc.forward_backward("idle", "u", 1, make_batch([5], 1))
        await svc.optim_step("idle", "u", 2, ADAM)
        probe = make_batch([6, 4], 9)
        before = await svc.forward_backward("idle", "u", 3, probe, forward_only=True)
        deadline = time.monotonic() + 10
        while (await svc.run_info("idle", "u")).resident:
            assert time.monotonic() < deadline, "the idle run was never offloaded"
            await asyncio.sleep(0.05)
        assert (await svc.health()).resident_runs == 0
        after = await svc.forward_backward("idle", "u", 4, probe, forward_only=True)
        assert _lp(after) == _lp(before)
        info = await svc.run_info("idle", "u")
        assert info.step == 1
    finally:
        await svc.close()


async def test_create_from_checkpoint_and_failed_create_leaves_nothing(service, tmp_path):
    await service.create_run("src", "u", LoraConfig(rank=4, alpha=8, seed=8, train_mlp=False))
    await service.forward_backward("src", "u", 1, make_batch([5], 1))
    await service.optim_step("src", "u", 2, ADAM)
    saved = await service.save_state("src", "u", 3, str(tmp_path / "ckpt"))
    assert saved.step == 1
    probe = make_batch([4, 7], 5)
    want = await service.forward_backward("src", "u", 4, probe, forward_only=True)

    info = await service.load_state("copy", "u", 0, saved.path, include_optimizer=True, create=True)
    assert info.step == 1 and info.lora.rank == 4 and info.lora.train_mlp is False
    got = await service.forward_backward("copy", "u", 1, probe, forward_only=True)  # seq 1 follows the load's 0
    assert _lp(got) == _lp(want)

    with pytest.raises(NotFoundError):
        await service.load_state("ghost", "u", 0, str(tmp_path / "missing"), include_optimizer=False, create=True)
    assert [r.run_id for r in await service.list_runs("u")] == ["copy", "src"]

    sampler = await service.save_sampler_weights("copy", "u", 2, str(tmp_path / "sampler"))
    assert sampler.size_bytes > 0


async def test_fused_service_matches_unfused(tiny_model_id, backend):
    calls = []

    class Counting(TransformersBackend):
        def forward_backward_many(self, items):
            calls.append(len(items))
            return super().forward_backward_many(items)

    fused_backend = Counting(tiny_model_id, device="cpu")
    svc = ModelService(tiny_model_id, backend=fused_backend, fuse_batches=True, adapter_timeout_s=None)
    ref = ModelService(tiny_model_id, backend=backend, adapter_timeout_s=None)
    try:
        runs = [f"fz-{i}" for i in range(3)]
        for i, rid in enumerate(runs):
            await svc.create_run(rid, "u", LoraConfig(rank=4, seed=30 + i))
            await ref.create_run(rid, "u", LoraConfig(rank=4, seed=30 + i))
        for step in range(2):
            batches = [make_batch([5, 3 + i], 10 * step + i) for i in range(3)]
            outs = await asyncio.gather(*[svc.forward_backward(r, "u", 2 * step + 1, b) for r, b in zip(runs, batches)])
            refs = [await ref.forward_backward(r, "u", 2 * step + 1, b) for r, b in zip(runs, batches)]
            await asyncio.gather(*[svc.optim_step(r, "u", 2 * step + 2, ADAM) for r in runs])
            for r in runs:
                await ref.optim_step(r, "u", 2 * step + 2, ADAM)
            for o, rr in zip(outs, refs):
                torch.testing.assert_close(torch.tensor(_lp(o)[0]), torch.tensor(_lp(rr)[0]), rtol=1e-4, atol=1e-5)
        assert max(calls) >= 2  # work of several runs really shared a pass
    finally:
        await svc.close()
        await ref.close()


async def test_a_request_split_into_passes_goes_after_a_one_pass_request(tiny_model_id):
    """The service marks a forward_backward the backend must split (more padded tokens than one pass) as
    bulk work: queued together, another tenant's one-pass request finishes first, although that tenant has
    had more model time (which alone would let the split request's slices all go first)."""
    svc = ModelService(tiny_model_id, backend=TransformersBackend(tiny_model_id, device="cpu", token_budget=16),
                       adapter_timeout_s=None)
    try:
        await svc.create_run("split", "alice", LoraConfig(rank=2, seed=1))
        await svc.create_run("whole", "bob", LoraConfig(rank=2, seed=2))
        for seq in (1, 2, 3):
            await svc.forward_backward("whole", "bob", seq, make_batch([15] * 8, seq), forward_only=True)
        blocker = asyncio.create_task(svc.scheduler.run_exclusive(lambda: time.sleep(0.2)))
        await asyncio.sleep(0.02)
        split = asyncio.create_task(svc.forward_backward("split", "alice", 1, make_batch([12, 10, 9], 1)))
        await asyncio.sleep(0.01)
        whole = asyncio.create_task(svc.forward_backward("whole", "bob", 4, make_batch([4, 3], 2)))
        done, _ = await asyncio.wait([split, whole], return_when=asyncio.FIRST_COMPLETED)
        assert done == {whole}
        await asyncio.gather(blocker, split)
        assert len(split.result().loss_fn_outputs) == 3
    finally:
        await svc.close()
