"""The megatron backend against the transformers backend, on CPU: spawned gloo ranks run megatron-core through
the test-only CPU shim (``megatron_support/``), the reference is ``TransformersBackend`` in this process.

What must hold at every layout (tp=2, pp=2, dp=2 x tp=2): the same logprobs and every loss's value within 1e-5
(fp32) for an adapter loaded from the same checkpoint; the same 5-step trajectories for two interleaved runs
within 1e-4 relative; checkpoints that cross between the backends both ways with equal logprobs.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is an optional extra (pip install twinkle-model[megatron])")

from model_testutil import make_batch  # noqa: E402
from twinkle.common.placement import mesh_coordinates  # noqa: E402
from twinkle.common.wire import AdamParams, LoraConfig, UserError  # noqa: E402
from twinkle.common.workers import WorkerSpec, free_local_port, start_process_workers  # noqa: E402
from twinkle.model.distributed import DataParallelBackend  # noqa: E402
from twinkle.model.losses import LOSSES  # noqa: E402

SUPPORT = os.path.join(os.path.dirname(__file__), "megatron_support")
ADAM = AdamParams(learning_rate=1e-2, eps=1e-3, weight_decay=0.01, grad_clip_norm=1.0)


@contextlib.contextmanager
def cpu_shim_environment():
    """Processes started inside run megatron-core on CPU: its ``sitecustomize`` installs the test-only shim."""
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "TWINKLE_TEST_MEGATRON_CPU_SHIM")}
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (SUPPORT, saved["PYTHONPATH"]) if p)
    os.environ["TWINKLE_TEST_MEGATRON_CPU_SHIM"] = "1"
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def start_megatron(model_id: str, world_size: int, tp: int, pp: int, **kwargs) -> DataParallelBackend:
    port = free_local_port()
    specs = [WorkerSpec(app="test-megatron", rank=r, world_size=world_size, threads=1) for r in range(world_size)]
    with cpu_shim_environment():
        ranks = start_process_workers(
            "twinkle.model.megatron.worker:MegatronWorker", specs,
            lambda w: ((model_id, w.rank, w.world_size, "127.0.0.1", port, "cpu"),
                       {"tp_size": tp, "pp_size": pp, **kwargs}),
            ready_timeout=300,
        )
    return DataParallelBackend(ranks, model_id=model_id)


def _lp(out) -> list[torch.Tensor]:
    return [torch.tensor(o["logprobs"].data) for o in out.loss_fn_outputs]


def assert_same_outputs(got, want, tol: float) -> None:
    assert len(got.loss_fn_outputs) == len(want.loss_fn_outputs)
    for g, w in zip(_lp(got), _lp(want)):
        torch.testing.assert_close(g, w, rtol=tol, atol=tol)
    assert got.metrics["loss:sum"] == pytest.approx(want.metrics["loss:sum"], rel=tol, abs=tol)


def same_start(reference, megatron, run_id: str, cfg: LoraConfig, tmp_path) -> None:
    """The run on both backends, starting from the transformers backend's initial adapter (a checkpoint
    crossing from transformers to megatron), with a non-zero B so that the adapter changes the outputs."""
    reference.create_adapter(run_id, cfg)
    with torch.no_grad():
        for key, p in reference._resident(run_id).params.items():
            if "lora_B" in key:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(key))) * 0.05)
    path = reference.save_state(run_id, str(tmp_path / f"{run_id}-start"), True).path
    megatron.create_adapter(run_id, cfg)
    megatron.load_state(run_id, path, include_optimizer=True)


def check_layout(reference, megatron, tmp_path, *, losses=tuple(LOSSES), steps: int = 5, alone: bool = False) -> None:
    a, b = "run-a", "run-b"
    same_start(reference, megatron, a, LoraConfig(rank=4, alpha=8, seed=3), tmp_path)
    same_start(reference, megatron, b, LoraConfig(rank=2, alpha=4, seed=4, train_unembed=False), tmp_path)
    # 1. logprobs and every loss, forward only
    for i, loss in enumerate(losses):
        inp = make_batch([5, 9, 3], 100 + i, loss)
        assert_same_outputs(megatron.forward_backward(a, inp, True), reference.forward_backward(a, inp, True), 1e-5)
    # 2. two runs trained interleaved: each follows its own trajectory
    for step in range(steps):
        for run_id, loss in ((a, "cross_entropy"), (b, "ppo")):
            inp = make_batch([6, 4, 7], 10 * step + len(run_id), loss)
            assert_same_outputs(megatron.forward_backward(run_id, inp), reference.forward_backward(run_id, inp), 1e-4)
            got, want = megatron.optim_step(run_id, ADAM), reference.optim_step(run_id, ADAM)
            assert got.metrics["grad_norm:mean"] == pytest.approx(want.metrics["grad_norm:mean"], rel=1e-4)
    assert megatron.run_step(a) == steps
    if alone:  # the same run trained without b's ops in between ends bit-identical
        megatron.create_adapter("alone", LoraConfig(rank=4, alpha=8, seed=3))
        megatron.load_state("alone", str(tmp_path / f"{a}-start"), include_optimizer=True)
        for step in range(steps):
            megatron.forward_backward("alone", make_batch([6, 4, 7], 10 * step + len(a), "cross_entropy"))
            megatron.optim_step("alone", ADAM)
        probe = make_batch([8, 5], 7)
        assert_same_outputs(megatron.forward_backward("alone", probe, True), megatron.forward_backward(a, probe, True), 0)
        megatron.delete_adapter("alone")
    # 3. megatron's checkpoint, loaded by the transformers backend, gives the same logprobs
    saved = megatron.save_state(a, str(tmp_path / "from-megatron"), True)
    assert saved.step == steps and saved.size_bytes > 0
    reference.create_adapter("crossed", LoraConfig(rank=4, alpha=8, seed=99))
    reference.load_state("crossed", saved.path, include_optimizer=True)
    inp = make_batch([8, 5], 7)
    assert_same_outputs(reference.forward_backward("crossed", inp, True), megatron.forward_backward(a, inp, True), 1e-5)
    # the optimizer moments crossed too: one more step lands on the same weights
    for backend, run_id in ((megatron, a), (reference, "crossed")):
        backend.forward_backward(run_id, inp)
        backend.optim_step(run_id, ADAM)
    assert_same_outputs(reference.forward_backward("crossed", inp, True), megatron.forward_backward(a, inp, True), 1e-4)
    # 4. offloading changes nothing; a bad request names its field and leaves the run as it was
    before = megatron.forward_backward(b, inp, True)
    megatron.offload(b)
    assert not megatron.is_resident(b)
    assert_same_outputs(megatron.forward_backward(b, inp, True), before, 0)
    with pytest.raises(UserError, match="target_tokens"):
        bad = make_batch([4], 1)
        bad.data[0].loss_fn_inputs["target_tokens"].data[0] = 10**6
        megatron.forward_backward(b, bad)
    assert_same_outputs(megatron.forward_backward(b, inp, True), before, 0)
    for run_id in (a, b):
        megatron.delete_adapter(run_id)
        reference.delete_adapter(run_id)
    reference.delete_adapter("crossed")


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2)], ids=["tp1", "tp2", "pp2"])
def test_megatron_matches_the_transformers_backend(backend, tiny_model_id, tmp_path, tp, pp):
    # at tp=1 every request runs as several micro-batches (a 20-token budget): the results must not change
    megatron = start_megatron(tiny_model_id, tp * pp, tp, pp, **({"token_budget": 20} if tp * pp == 1 else {}))
    try:
        info = megatron.describe()
        assert (info.backend, info.dp_size, info.vocab_size) == ("megatron", 1, backend.describe().vocab_size)
        # one rank per replica returns its results: TP rank 0 of the last stage
        expected = [False, True] if pp == 2 else [True, False][:tp]
        assert [p.returns_output for p in megatron._placements] == expected
        check_layout(backend, megatron, tmp_path, alone=tp == 2)
    finally:
        megatron.close()


def test_data_parallel_over_tensor_parallel_groups(backend, tiny_model_id, tmp_path):
    """dp=2 x tp=2: each TP pair gets half the datums; the step is that of the whole batch."""
    megatron = start_megatron(tiny_model_id, 4, 2, 1)
    try:
        assert megatron.describe().dp_size == 2
        # the ranks sit where `twinkle plan` says they will (megatron-core's order: TP adjacent, then DP)
        layout = [(p.dp_rank, p.returns_output) for p in megatron._placements]
        assert layout == [(mesh_coordinates(r, 2, 2, 1)[0], mesh_coordinates(r, 2, 2, 1)[1] == 0) for r in range(4)]
        check_layout(backend, megatron, tmp_path, losses=("cross_entropy",), steps=2)
    finally:
        megatron.close()


def test_a_fresh_adapter_is_the_same_whatever_the_layout(tiny_model_id, tmp_path):
    """Initial A is drawn per PEFT key from the run's seed, so tp=1 and tp=2 start identically (B is zero)."""
    from safetensors.torch import load_file

    saved = []
    for tp in (1, 2):
        megatron = start_megatron(tiny_model_id, tp, tp, 1)
        try:
            megatron.create_adapter("fresh", LoraConfig(rank=4, seed=11))
            saved.append(load_file(os.path.join(
                megatron.save_sampler_weights("fresh", str(tmp_path / f"tp{tp}")).path, "adapter_model.safetensors")))
        finally:
            megatron.close()
    assert saved[0].keys() == saved[1].keys() and len(saved[0]) == 4 * 2 * 7 + 2
    for k in saved[0]:
        assert torch.equal(saved[0][k], saved[1][k]), k


def test_without_cuda_or_the_shim_a_worker_refuses_to_start_and_says_why(tiny_model_id):
    """megatron-core 0.16 cannot run on a plain CPU process: the worker fails at start-up naming the device."""
    specs = [WorkerSpec(app="test-megatron-cpu", rank=0, world_size=1, threads=1)]
    with pytest.raises(Exception, match="megatron-core cannot run on cpu here .*needs CUDA devices"):
        start_process_workers("twinkle.model.megatron.worker:MegatronWorker", specs,
                              lambda w: ((tiny_model_id, 0, 1, "127.0.0.1", 0, "cpu"), {}), ready_timeout=300)


def test_a_tied_embedding_model_trains_across_two_pipeline_stages(tiny_model_id, tmp_path):
    """Tied input and output embeddings with the output layer's LoRA on the last stage, the embedding on the
    first: the same results as the transformers backend on the same checkpoint directory."""
    from transformers import AutoModelForCausalLM, Qwen2Config
    from twinkle.common.models import load_causal_lm
    from twinkle.model.transformers_backend import TransformersBackend

    base = load_causal_lm(tiny_model_id).config.to_dict()
    cfg = Qwen2Config(**{**base, "tie_word_embeddings": True})
    torch.manual_seed(0)
    tied = tmp_path / "tied-qwen2"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tied)
    reference = TransformersBackend(str(tied), device="cpu")
    megatron = start_megatron(str(tied), 2, 1, 2)
    try:
        check_layout(reference, megatron, tmp_path, losses=("cross_entropy",), steps=2)
    finally:
        megatron.close()
        reference.close()
