"""Durable-runs benchmark: what saving each run's state after every step costs, measured side by side.

    python bench/durability.py [--steps 20] [--batch 8] [--seq 128] [--rank 8] [--threads 2] [--json]

Two ``ModelService`` instances over ONE backend (the same model in memory), one with ``state_dir`` (durable:
every optim_step's state written, fsynced and swapped in before the step is answered) and one without. A
training step is what the SDK's loop awaits: forward_backward + optim_step, pipelined (both submitted, then
both awaited). Steps alternate between the two services so load drift hits both alike; medians are compared.

Prints the step time durable vs not (goal <= 1.05x), the median write of one run's state, and its size.
The time from a replica's death to the next successful step is measured on a deployed stack by
``tests/test_fault_injection.py`` (it prints the figure).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(__file__))

from model_bench import make_input  # noqa: E402


async def main(args: argparse.Namespace) -> dict:
    import torch
    from twinkle.common.models import TINY_MODEL_ID, build_tiny_model
    from twinkle.common.wire import AdamParams, LoraConfig
    from twinkle.model.service import ModelService
    from twinkle.model.transformers_backend import TransformersBackend

    torch.set_num_threads(args.threads)
    build_tiny_model()
    backend = TransformersBackend(TINY_MODEL_ID, device="cpu")
    state_dir = tempfile.mkdtemp(prefix="twinkle-durability-")
    plain = ModelService(TINY_MODEL_ID, backend=backend, adapter_timeout_s=None)
    durable = ModelService(TINY_MODEL_ID, backend=backend, adapter_timeout_s=None, state_dir=state_dir)
    lora = LoraConfig(rank=args.rank, seed=1)
    adam = AdamParams(learning_rate=1e-4)
    inp = make_input(0, args.batch, args.seq, backend.vocab_size)
    await plain.create_run("plain", "bench", lora)
    await durable.create_run("durable", "bench", lora)
    seqs = {"plain": 1, "durable": 1}
    times: dict[str, list[float]] = {"plain": [], "durable": []}

    async def step(svc: ModelService, run: str) -> float:
        seq = seqs[run]
        seqs[run] += 2
        t0 = time.perf_counter()
        await asyncio.gather(svc.forward_backward(run, "bench", seq, inp), svc.optim_step(run, "bench", seq + 1, adam))
        return time.perf_counter() - t0

    for _ in range(2):  # warm-up
        await step(plain, "plain")
        await step(durable, "durable")
    for i in range(args.steps):
        order = [(plain, "plain"), (durable, "durable")] if i % 2 == 0 else [(durable, "durable"), (plain, "plain")]
        for svc, run in order:
            times[run].append(await step(svc, run))

    # One state write alone (what each step's save costs, off the model thread).
    snap = await durable.scheduler.run_exclusive(lambda: backend.snapshot("durable"))
    from twinkle.model.durability import SavedRun

    writes = []
    for _ in range(10):
        saved = SavedRun(run_id="durable", owner="bench", lora=lora, step=snap.step, next_seq=seqs["durable"])
        t0 = time.perf_counter()
        await durable.durable.save("durable", snap, saved)
        writes.append(time.perf_counter() - t0)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(state_dir) for f in fs)
    await plain.close()
    await durable.close()

    p, d = statistics.median(times["plain"]), statistics.median(times["durable"])
    return {
        "batch": f"{args.batch}x{args.seq}", "rank": args.rank, "steps": args.steps,
        "step_s_memory_only": round(p, 4), "step_s_durable": round(d, 4), "ratio": round(d / p, 3),
        "state_write_ms_median": round(statistics.median(writes) * 1000, 2), "state_bytes": size,
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    out = asyncio.run(main(a))
    if a.json:
        print(json.dumps(out))
    else:
        print(f"step ({out['batch']}, LoRA r={out['rank']}, fb+optim pipelined), median of {out['steps']}:")
        print(f"  memory only {out['step_s_memory_only'] * 1000:.1f} ms, durable {out['step_s_durable'] * 1000:.1f} ms"
              f"  -> ratio {out['ratio']:.3f}x (goal <= 1.05x)")
        print(f"  one state write: {out['state_write_ms_median']:.2f} ms median, {out['state_bytes'] / 1024:.0f} KiB")
