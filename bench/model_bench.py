"""Model-service benchmark: service overhead and multi-user throughput, measured in one run.

    python bench/model_bench.py [--model builtin://tiny-qwen2] [--device cpu] [--steps 20] [--threads 2]
                                [--batch 8] [--seq 128] [--rank 8] [--users 1,2,4] [--json]

Prints:
(a) tokens/s of forward_backward + optim_step through ``ModelService`` vs the same step in-process with plain
    peft (same model, LoRA r=8 on attn+mlp+lm_head, AdamW, summed cross-entropy, batch 8x128); the ratio
    (goal >= 0.8). The two sides alternate step by step and the medians are compared, so load drift on a
    shared box hits both alike.
(b) aggregate tokens/s with 1, 2, 4 concurrent users (separate runs, each doing forward_backward +
    optim_step in its own seq order) through ``ModelService``, without and with cross-run fusion
    (``fuse_batches``: concurrent forward_backward requests of different runs share one forward/backward
    pass); the ratio 4 users vs 1 (goal >= 1.5). Blocks of 5 steps per (mode, users) are interleaved; medians.
torch runs with ``--threads`` intra-op threads (``torch.set_num_threads``, default 2), set explicitly.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


def make_input(seed: int, batch: int, seq: int, vocab: int):
    import torch
    from twinkle.common.wire import Datum, ForwardBackwardInput, TensorData

    g = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(batch):
        toks = torch.randint(0, vocab, (seq + 1,), generator=g).tolist()
        data.append(Datum(model_input=toks[:-1], loss_fn_inputs={
            "target_tokens": TensorData(toks[1:], "int64"), "weights": TensorData([1.0] * seq)}))
    return ForwardBackwardInput(data=data, loss_fn="cross_entropy")


class Direct:
    """The same training step written directly against peft: the baseline the service is measured against."""

    def __init__(self, model_id: str, device: str, rank: int, inp) -> None:
        import torch
        from peft import LoraConfig, get_peft_model
        from twinkle.common.models import load_causal_lm

        torch.manual_seed(0)
        self.model = get_peft_model(load_causal_lm(model_id).to(device),
                                    LoraConfig(r=rank, lora_alpha=32, target_modules=TARGETS))
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-4,
                                     betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0)
        self.ids = torch.tensor([d.model_input for d in inp.data], device=device)
        self.targets = torch.tensor([d.loss_fn_inputs["target_tokens"].data for d in inp.data], device=device)
        self.weights = torch.tensor([d.loss_fn_inputs["weights"].data for d in inp.data], device=device)

    def step(self) -> None:
        import torch
        import torch.nn.functional as F

        logits = self.model(input_ids=self.ids, attention_mask=torch.ones_like(self.ids)).logits.float()
        lp = -F.cross_entropy(logits.flatten(0, 1), self.targets.flatten(), reduction="none").view_as(self.targets)
        (-(self.weights * lp).sum()).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        lp.detach().cpu().tolist()  # the service returns logprobs too


async def service_overhead(args, backend, vocab: int) -> dict:
    """Alternate one direct step and one service step; medians of the per-step times (robust to load spikes
    on a shared box)."""
    from twinkle.common.wire import AdamParams, LoraConfig
    from twinkle.model.service import ModelService

    inp = make_input(1, args.batch, args.seq, vocab)
    direct = Direct(args.model, args.device, args.rank, inp)
    svc = ModelService(args.model, backend=backend, adapter_timeout_s=None)
    await svc.create_run("bench-overhead", "bench", LoraConfig(rank=args.rank, alpha=32, seed=0))
    seq = iter(range(1, 10**9))
    adam = AdamParams(learning_rate=1e-4)

    async def svc_step():
        await svc.forward_backward("bench-overhead", "bench", next(seq), inp)
        await svc.optim_step("bench-overhead", "bench", next(seq), adam)

    for _ in range(2):  # warm-up both
        direct.step()
        await svc_step()
    t_direct, t_svc = [], []
    for _ in range(args.steps):
        t = time.perf_counter()
        direct.step()
        t_direct.append(time.perf_counter() - t)
        t = time.perf_counter()
        await svc_step()
        t_svc.append(time.perf_counter() - t)
    await svc.close()
    tok = args.batch * args.seq
    md, ms = statistics.median(t_direct), statistics.median(t_svc)
    return {"direct_tok_s": tok / md, "service_tok_s": tok / ms, "ratio": md / ms,
            "direct_mean_tok_s": tok * len(t_direct) / sum(t_direct), "service_mean_tok_s": tok * len(t_svc) / sum(t_svc)}


async def multi_user(args, backend, vocab: int, counts: list[int]) -> dict:
    """Aggregate tokens/s of N concurrent users, unfused and fused. Blocks of a few steps for every (mode, N)
    are interleaved and the median block throughput is reported, so load drift hits every figure alike."""
    from twinkle.common.wire import AdamParams, LoraConfig
    from twinkle.model.service import ModelService

    n_max = max(counts)
    adam = AdamParams(learning_rate=1e-4)
    inputs = [make_input(100 + i, args.batch, args.seq, vocab) for i in range(n_max)]
    modes = {}
    for fuse in (False, True):
        svc = ModelService(args.model, backend=backend, adapter_timeout_s=None, fuse_batches=fuse, max_fused=8)
        runs = [f"bench-{'f' if fuse else 'n'}-{i}" for i in range(n_max)]
        for i, rid in enumerate(runs):
            await svc.create_run(rid, f"user{i}", LoraConfig(rank=args.rank, alpha=32, seed=i))
        modes["fused" if fuse else "unfused"] = (svc, runs, {rid: 1 for rid in runs})

    async def block(mode: str, n: int, steps: int) -> float:
        svc, runs, next_seq = modes[mode]

        async def user(i: int) -> None:
            rid = runs[i]
            for _ in range(steps):
                s = next_seq[rid]
                next_seq[rid] += 2
                await svc.forward_backward(rid, f"user{i}", s, inputs[i])
                await svc.optim_step(rid, f"user{i}", s + 1, adam)

        t = time.perf_counter()
        await asyncio.gather(*(user(i) for i in range(n)))
        return n * steps * args.batch * args.seq / (time.perf_counter() - t)

    for mode in modes:  # warm-up, incl. the fused shapes
        await block(mode, n_max, 1)
    per_block = max(1, min(5, args.steps))
    blocks = max(1, args.steps // per_block)
    samples = {mode: {n: [] for n in counts} for mode in modes}
    for _ in range(blocks):
        for mode in modes:
            for n in counts:
                samples[mode][n].append(await block(mode, n, per_block))
    out = {}
    for mode, (svc, runs, _) in modes.items():
        res = {n: statistics.median(v) for n, v in samples[mode].items()}
        out[mode] = {"tok_s": res, "ratio_max_vs_1": res[n_max] / res[min(counts)]}
        for i, rid in enumerate(runs):
            await svc.delete_run(rid, f"user{i}")
        await svc.close()
    return out


async def main(args) -> dict:
    import torch
    from twinkle.model.transformers_backend import TransformersBackend

    torch.set_num_threads(args.threads)
    backend = TransformersBackend(args.model, device=args.device)
    vocab = min(backend.vocab_size, 2000)
    out: dict = {"threads": args.threads, "device": str(backend.device), "batch": f"{args.batch}x{args.seq}",
                 "lora_rank": args.rank, "steps": args.steps}
    out["a"] = await service_overhead(args, backend, vocab)
    _print_a(out)
    counts = [int(x) for x in args.users.split(",")]
    out["b"] = await multi_user(args, backend, vocab, counts)
    for key, val in out["b"].items():
        _print_b(key, val["tok_s"], counts)
    return out


def _print_a(out: dict) -> None:
    a = out["a"]
    print(f"# torch threads: {out['threads']} (torch.set_num_threads), device {out['device']}, "
          f"batch {out['batch']}, LoRA r={out['lora_rank']}, {out['steps']} timed steps after warm-up")
    print(f"(a) direct peft     : {a['direct_tok_s']:8.0f} tok/s (median step; mean {a['direct_mean_tok_s']:.0f})")
    print(f"    ModelService    : {a['service_tok_s']:8.0f} tok/s (median step; mean {a['service_mean_tok_s']:.0f})"
          f"   ratio service/direct = {a['ratio']:.2f} (goal >= 0.8)")
    sys.stdout.flush()


def _print_b(key: str, res: dict, counts: list[int]) -> None:
    line = ", ".join(f"{n} user{'s' if n > 1 else ''}: {v:.0f} tok/s" for n, v in res.items())
    print(f"(b) {key:8s}: {line};  {max(counts)} vs {min(counts)} = {res[max(counts)] / res[min(counts)]:.2f}x "
          "(goal >= 1.5)")
    sys.stdout.flush()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin://tiny-qwen2")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--users", default="1,2,4")
    p.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    ARGS = p.parse_args()
    result = asyncio.run(main(ARGS))
    if ARGS.json:
        print(json.dumps(result))
