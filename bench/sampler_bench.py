"""Sampler benchmark: batching gain and service overhead, measured in one run.

    python bench/sampler_bench.py [--model builtin://tiny-qwen2] [--device cpu] [--tokens 64] [--repeats 5]

Prints:
- tokens/s for 1 request vs 8 concurrent requests through ``SamplerService`` (goal: 8 concurrent >= 4x);
- the same with 8 concurrent requests on 8 *different* LoRA adapters (mixed-adapter batches);
- service overhead: ``SamplerService.sample`` vs a direct ``model.generate`` for N new tokens, greedy, both
  forced to exactly N tokens (goal: <= 1.2x);
- the adapter hand-off: time from a checkpoint re-save to the first sample that used the new weights.
Medians over ``--repeats`` runs, the two sides of each ratio interleaved so drift hits both alike.
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


def _make_adapter(path: str, seed: int) -> str:
    import torch
    from peft import LoraConfig, get_peft_model

    from twinkle.common.models import load_causal_lm

    torch.manual_seed(seed)
    pm = get_peft_model(load_causal_lm(ARGS.model), LoraConfig(
        r=8, lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.05)
    pm.save_pretrained(path, save_embedding_layers=False)
    return path


async def main() -> dict:
    import torch

    from twinkle.common.models import load_causal_lm, load_tokenizer
    from twinkle.common.wire import SampleRequest, SamplingParams
    from twinkle.sampler import SamplerService

    n_tok, reps = ARGS.tokens, ARGS.repeats
    if ARGS.threads:
        torch.set_num_threads(ARGS.threads)  # process-wide: the service's compute thread and generate() alike
    svc = SamplerService(ARGS.model, device=ARGS.device)
    tok = load_tokenizer(ARGS.model)
    prompts = [tok.encode(t) for t in [
        "The sun is", "Once upon a time there was", "def add(x, y):\n    return", "1 2 3 4",
        "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n", "Seven small birds", "Water is",
        "The best way to learn is"]]

    def req(i: int, adapter: str | None = None, greedy: bool = False) -> SampleRequest:
        return SampleRequest(prompt=prompts[i % len(prompts)], adapter_path=adapter, sampling_params=SamplingParams(
            max_tokens=n_tok, temperature=0.0 if greedy else 1.0, seed=i, stop=[]))

    async def timed(reqs) -> float:
        t0 = time.perf_counter()
        outs = await asyncio.gather(*(svc.sample(r) for r in reqs))
        dt = time.perf_counter() - t0
        assert all(len(s.tokens) == n_tok for o in outs for s in o.sequences)
        return dt

    await timed([req(i) for i in range(8)])  # warm-up (allocator, kernels)
    await timed([req(0)])

    # 1 vs 8 concurrent, base model
    one, eight = [], []
    for _ in range(reps):
        one.append(await timed([req(0)]))
        eight.append(await timed([req(i) for i in range(8)]))
    rate1 = n_tok / statistics.median(one)
    rate8 = 8 * n_tok / statistics.median(eight)

    # service vs direct generate, greedy, exactly n_tok new tokens each (no adapter loaded yet)
    model = load_causal_lm(ARGS.model, device=str(svc.engine.device)).eval()
    ids = torch.tensor([prompts[0]], device=svc.engine.device)

    def direct() -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=n_tok, min_new_tokens=n_tok)
        if ids.is_cuda:
            torch.cuda.synchronize()
        assert out.shape[1] - ids.shape[1] == n_tok
        return time.perf_counter() - t0

    direct()
    d, s = [], []
    for _ in range(reps):
        d.append(direct())
        s.append(await timed([req(0, greedy=True)]))
    overhead = statistics.median(s) / statistics.median(d)

    # 8 concurrent on 8 different adapters vs 1 request on one adapter
    tmp = tempfile.mkdtemp(prefix="twinkle-bench-")
    adapters = [_make_adapter(os.path.join(tmp, f"a{i}"), i) for i in range(8)]
    await timed([req(i, adapters[i]) for i in range(8)])
    one_a, eight_a = [], []
    for _ in range(reps):
        one_a.append(await timed([req(0, adapters[0])]))
        eight_a.append(await timed([req(i, adapters[i]) for i in range(8)]))
    rate1_a = n_tok / statistics.median(one_a)
    rate8_a = 8 * n_tok / statistics.median(eight_a)

    # a base-model request while 8 adapters are resident costs what it cost before
    base_resident = []
    for _ in range(reps):
        base_resident.append(await timed([req(0, greedy=True)]))

    # hand-off: re-save adapter 0 in place, then sample
    hand = []
    for k in range(3):
        _make_adapter(adapters[0], 1000 + k)
        t0 = time.perf_counter()
        await svc.sample(SampleRequest(prompt=prompts[0], adapter_path=adapters[0],
                                       sampling_params=SamplingParams(max_tokens=1)))
        hand.append(time.perf_counter() - t0)

    info = svc.info()
    res = {
        "device": info["device"], "dtype": info["dtype"], "torch_threads": torch.get_num_threads(),
        "new_tokens": n_tok, "repeats": reps,
        "tok_s_1": round(rate1, 1), "tok_s_8": round(rate8, 1), "ratio_8_vs_1": round(rate8 / rate1, 2),
        "tok_s_1_lora": round(rate1_a, 1), "tok_s_8_mixed_lora": round(rate8_a, 1),
        "ratio_8_mixed_lora_vs_1_lora": round(rate8_a / rate1_a, 2),
        "direct_generate_s": round(statistics.median(d), 4), "service_s": round(statistics.median(s), 4),
        "service_overhead_x": round(overhead, 3),
        "service_s_with_8_adapters_resident": round(statistics.median(base_resident), 4),
        "handoff_ms_median": round(1000 * statistics.median(hand), 1),
    }
    await svc.close()
    print(f"sampler bench: model={ARGS.model} device={res['device']} dtype={res['dtype']} "
          f"threads={res['torch_threads']} new_tokens={n_tok} repeats={reps}")
    print(f"  1 request            : {res['tok_s_1']:8.1f} tok/s")
    print(f"  8 concurrent         : {res['tok_s_8']:8.1f} tok/s   = {res['ratio_8_vs_1']:.2f}x   (goal >= 4x)")
    print(f"  1 request, 1 LoRA    : {res['tok_s_1_lora']:8.1f} tok/s")
    print(f"  8 concurrent, 8 LoRAs: {res['tok_s_8_mixed_lora']:8.1f} tok/s   = "
          f"{res['ratio_8_mixed_lora_vs_1_lora']:.2f}x")
    print(f"  service vs direct generate ({n_tok} tokens): {res['service_s'] * 1000:.1f} ms vs "
          f"{res['direct_generate_s'] * 1000:.1f} ms = {res['service_overhead_x']:.3f}x   (goal <= 1.2x)")
    print(f"  same service request with 8 adapters resident: {res['service_s_with_8_adapters_resident'] * 1000:.1f} ms")
    print(f"  adapter hand-off (re-save -> first sample done): {res['handoff_ms_median']:.1f} ms")
    if ARGS.json:
        print(json.dumps(res))
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin://tiny-qwen2")
    ap.add_argument("--device", default=None)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    ARGS = ap.parse_args()
    r = asyncio.run(main())
    sys.exit(0)
