"""Megatron vs transformers backend: the same training step, measured side by side in one run.

    python bench/megatron_step.py [--steps 10] [--batch 8] [--seq 128] [--rank 8] [--tp 1 2] [--json]

A step is forward_backward + optim_step (cross-entropy, ``--batch`` datums of ``--seq`` tokens) of one LoRA
run. The transformers backend runs in a spawned rank (``ModelWorker``, like a deployed GPU rank), megatron
with each ``--tp`` in its own group of spawned ranks; steps rotate between them so load drift hits all alike,
and medians are compared. Every rank gets one torch thread.

Without CUDA, megatron-core 0.16 runs only through the test suite's CPU shim (``packages/twinkle-model/tests/
megatron_support``, put on the ranks' PYTHONPATH here); on CPU, tp=2 splits the same work over two processes
on the same cores, so it measures the parallel overhead, not a speed-up. On a GPU machine run
``scripts/gpu_check_megatron.py`` for the device figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(__file__))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIM = os.path.join(REPO, "packages", "twinkle-model", "tests", "megatron_support")

from model_bench import make_input  # noqa: E402


def start(target: str, world_size: int, extra: dict):
    from twinkle.common.models import TINY_MODEL_ID
    from twinkle.common.workers import WorkerSpec, free_local_port, start_process_workers
    from twinkle.model.distributed import DataParallelBackend

    port = free_local_port()
    specs = [WorkerSpec(app="bench", rank=r, world_size=world_size, threads=1) for r in range(world_size)]
    ranks = start_process_workers(target, specs, lambda w: (
        (TINY_MODEL_ID, w.rank, w.world_size, "127.0.0.1", port, "cpu"), extra), ready_timeout=300)
    return DataParallelBackend(ranks)


def main(args: argparse.Namespace) -> dict:
    import torch
    from twinkle.common.models import build_tiny_model
    from twinkle.common.wire import AdamParams, LoraConfig

    build_tiny_model()
    if not torch.cuda.is_available():
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (SHIM, os.environ.get("PYTHONPATH")) if p)
        os.environ["TWINKLE_TEST_MEGATRON_CPU_SHIM"] = "1"
    backends = {"transformers": start("twinkle.model.distributed:ModelWorker", 1, {})}
    for tp in args.tp:
        backends[f"megatron tp={tp}"] = start("twinkle.model.megatron.worker:MegatronWorker", tp,
                                              {"tp_size": tp, "pp_size": 1})
    lora = LoraConfig(rank=args.rank, seed=1)
    adam = AdamParams(learning_rate=1e-4)
    inp = make_input(0, args.batch, args.seq, 2000)
    times: dict[str, list[float]] = {name: [] for name in backends}
    try:
        for b in backends.values():
            b.create_adapter("bench", lora)
            b.forward_backward("bench", inp)  # warm-up
            b.optim_step("bench", adam)
        for _ in range(args.steps):
            for name, b in backends.items():
                t0 = time.perf_counter()
                b.forward_backward("bench", inp)
                b.optim_step("bench", adam)
                times[name].append(time.perf_counter() - t0)
    finally:
        for b in backends.values():
            b.close()
    med = {name: statistics.median(t) for name, t in times.items()}
    base = med["transformers"]
    return {"tokens_per_step": args.batch * args.seq, "steps": args.steps,
            "median_step_s": med, "ratio_to_transformers": {n: m / base for n, m in med.items()}}


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    out = main(a)
    if a.json:
        print(json.dumps(out))
    else:
        print(f"{out['tokens_per_step']} tokens per step, median of {out['steps']} steps")
        for name, m in out["median_step_s"].items():
            print(f"  {name:<16} {m * 1000:8.1f} ms   {out['ratio_to_transformers'][name]:.2f}x transformers")
