"""Data parallelism: 2 gloo ranks in spawned processes give the update of 1 process on the same global batch."""

from __future__ import annotations

import pytest
import torch
from model_testutil import make_batch
from twinkle.common.wire import AdamParams, LoraConfig, UserError
from twinkle.common.workers import WorkerSpec, free_local_port, start_process_workers
from twinkle.model.backend import FusedItem
from twinkle.model.distributed import DataParallelBackend, shard_sizes, split

ADAM = AdamParams(learning_rate=1e-2, eps=1.0, weight_decay=0.01, grad_clip_norm=1.0)


def test_shards_are_contiguous_and_balanced():
    assert shard_sizes(5, 2) == [3, 2]
    assert shard_sizes(1, 3) == [1, 0, 0]
    assert shard_sizes(7, 4) == [2, 2, 2, 1]
    assert split(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]]


@pytest.fixture(scope="module")
def dp(tiny_model_id):
    port = free_local_port()
    specs = [WorkerSpec(app="test-dp", rank=r, world_size=2, threads=1) for r in range(2)]
    ranks = start_process_workers(
        "twinkle.model.distributed:ModelWorker", specs,
        lambda w: ((tiny_model_id, w.rank, w.world_size, "127.0.0.1", port, "cpu"), {}), ready_timeout=300,
    )
    backend = DataParallelBackend(ranks)
    yield backend, ranks
    backend.close()


def _weights(rank_handle, run_id):
    return {k: torch.tensor(v) for k, v in rank_handle.submit("adapter_weights", run_id).result().items()}


def test_dp2_equals_dp1_on_the_same_global_batch(dp, backend):
    dp_backend, ranks = dp
    assert dp_backend.describe().dp_size == 2
    cfg = LoraConfig(rank=4, seed=41)
    assert dp_backend.create_adapter("dp", cfg) == cfg
    backend.create_adapter("dp-ref", cfg)
    for step in range(2):
        for loss in ("cross_entropy", "ppo"):
            inp = make_batch([6, 4, 9, 5, 7], 10 * step + len(loss), loss)  # 5 datums: shards of 3 and 2
            got = dp_backend.forward_backward("dp", inp)
            want = backend.forward_backward("dp-ref", inp)
            assert len(got.loss_fn_outputs) == 5
            for g, w in zip(got.loss_fn_outputs, want.loss_fn_outputs):  # outputs back in datum order
                torch.testing.assert_close(torch.tensor(g["logprobs"].data), torch.tensor(w["logprobs"].data),
                                           rtol=1e-5, atol=1e-5)
            assert got.metrics["loss:sum"] == pytest.approx(want.metrics["loss:sum"], rel=1e-5)
        m_dp = dp_backend.optim_step("dp", ADAM).metrics
        m_1 = backend.optim_step("dp-ref", ADAM).metrics
        assert m_dp["grad_norm:mean"] == pytest.approx(m_1["grad_norm:mean"], rel=1e-4)
    w0, w1 = _weights(ranks[0], "dp"), _weights(ranks[1], "dp")
    ref = {k: p.detach().reshape(-1) for k, p in backend._resident("dp-ref").params.items()}
    assert all(torch.equal(w0[k], w1[k]) for k in w0)  # every rank took the identical step
    backend.create_adapter("dp-init", cfg)
    init = {k: p.detach().reshape(-1) for k, p in backend._resident("dp-init").params.items()}
    for k in ref:
        # Compare what training moved. Two ranks sum half-batch gradients, one process the whole batch: the
        # same float32 terms in another order, so equal up to rounding, and that rounding is relative to the
        # gradient's scale and depends on the CPU's BLAS kernels. ADAM's eps of 1 keeps the step linear in the
        # gradient (m / (sqrt(v) + eps)), so rounding is not amplified to lr * sign(g) where g is ~0.
        moved, moved_ref = w0[k] - init[k], ref[k] - init[k]
        scale = float(moved_ref.abs().max())
        torch.testing.assert_close(moved, moved_ref, rtol=1e-3, atol=1e-3 * scale)
    assert dp_backend.run_step("dp") == 2
    # the comparison can fail: training moved the weights away from their (seeded) init
    assert any(float((w0[k] - init[k]).abs().max()) > 1e-5 for k in init)


def test_dp_small_batches_fused_items_checkpoints_and_errors(dp, backend, tmp_path):
    dp_backend, ranks = dp
    cfg = LoraConfig(rank=2, seed=42, train_mlp=False)
    dp_backend.create_adapter("dp-small", cfg)
    dp_backend.create_adapter("dp-other", LoraConfig(rank=2, seed=43))
    backend.create_adapter("dp-small-ref", cfg)
    one = make_batch([5], 1)  # one datum: rank 1 has an empty shard and must still join the all-reduce
    dp_backend.forward_backward("dp-small", one)
    backend.forward_backward("dp-small-ref", one)
    fused = dp_backend.forward_backward_many(
        [FusedItem("dp-small", make_batch([4, 6, 3], 2)), FusedItem("dp-other", make_batch([5, 5], 3))])
    assert [len(o.loss_fn_outputs) for o in fused] == [3, 2]
    backend.forward_backward("dp-small-ref", make_batch([4, 6, 3], 2))
    dp_backend.optim_step("dp-small", ADAM)
    backend.optim_step("dp-small-ref", ADAM)
    ref = {k: p.detach().reshape(-1) for k, p in backend._resident("dp-small-ref").params.items()}
    got = _weights(ranks[1], "dp-small")
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-3, atol=2e-4)

    with pytest.raises(UserError) as ei:  # validated once on the driver: global datum index in the field
        dp_backend.forward_backward("dp-small", make_batch([3, 3, 3], 4, loss="ppo", foo=1.0))
    assert ei.value.field == "loss_fn_config.foo"

    info = dp_backend.save_state("dp-small", str(tmp_path / "s"))
    assert info.step == 1
    dp_backend.offload("dp-other")
    assert not dp_backend.is_resident("dp-other")
    dp_backend.create_adapter("dp-loaded", cfg)
    dp_backend.load_state("dp-loaded", str(tmp_path / "s"), include_optimizer=True)
    assert dp_backend.run_step("dp-loaded") == 1
    loaded = _weights(ranks[1], "dp-loaded")
    assert all(torch.equal(loaded[k], got[k]) for k in got)
    dp_backend.delete_adapter("dp-other")
    assert not dp_backend.has_run("dp-other")


async def test_dp_runs_are_durable_and_restore_on_every_rank(dp, tmp_path):
    """A data-parallel run's state is saved from rank 0 (ranks hold equal weights) and restored on every
    rank by a service that lost its memory; training goes on with the same weights on both ranks."""
    from twinkle.model.service import ModelService

    dp_backend, ranks = dp
    first = ModelService("tiny", backend=dp_backend, adapter_timeout_s=None, state_dir=str(tmp_path))
    await first.create_run("dp-durable", "alice", LoraConfig(rank=2, seed=43))
    await first.forward_backward("dp-durable", "alice", 1, make_batch([5, 6, 4], 1))
    await first.optim_step("dp-durable", "alice", 2, ADAM)
    saved = _weights(ranks[0], "dp-durable")
    await first.scheduler.close()
    dp_backend.delete_adapter("dp-durable")  # the replica's memory is gone

    second = ModelService("tiny", backend=dp_backend, adapter_timeout_s=None, state_dir=str(tmp_path))
    info = await second.run_info("dp-durable", "alice")
    assert info.step == 1
    for rank in ranks:
        restored = _weights(rank, "dp-durable")
        assert all(torch.equal(restored[k], saved[k]) for k in saved)
    await second.forward_backward("dp-durable", "alice", 3, make_batch([5, 6, 4], 2))
    await second.optim_step("dp-durable", "alice", 4, ADAM)
    w0, w1 = _weights(ranks[0], "dp-durable"), _weights(ranks[1], "dp-durable")
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    await second.delete_run("dp-durable", "alice")
    await second.scheduler.close()
