"""Peak memory of one ``forward_backward`` on the Model service's backend, measured side by side.

Each case runs in a fresh subprocess (peak RSS = ``ru_maxrss`` of that child, minus the RSS after the model
and the run were set up), on the built-in tiny model:

- ``ragged``     1 datum of 512 tokens + 100 datums of 1 token (612 real tokens), as the server runs it;
- ``packed``     the same 612 tokens as ONE datum (the goal: ``ragged`` within 1.5x of this);
- ``ragged-one-pass`` the ragged batch as a single padded pass with full-vocabulary logits (what the server
  did before micro-batching and chunked logits): the figure the others are compared to;
- ``big``        80 x 128 tokens (10x the 8 x 128 the budget below admits per pass) in one call, vs the same
  datums in 10 calls of 8: equal loss and gradients.

    python bench/memory_bench.py [--budget 1024]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

MODEL_ID = "builtin://tiny-qwen2"


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(case: str, budget: int) -> None:
    import torch

    torch.set_num_threads(1)
    from twinkle.common.wire import Datum, ForwardBackwardInput, LoraConfig, TensorData
    from twinkle.model.transformers_backend import TransformersBackend

    def datum(n: int, seed: int) -> Datum:
        g = torch.Generator().manual_seed(seed)
        toks = torch.randint(10, 2000, (n + 1,), generator=g).tolist()
        return Datum(model_input=toks[:-1], loss_fn_inputs={"target_tokens": TensorData(toks[1:], "int64"),
                                                             "weights": TensorData([1.0] * n)})

    one_pass = case == "ragged-one-pass"
    b = TransformersBackend(MODEL_ID, device="cpu", token_budget=10**9 if one_pass else budget)
    if one_pass:
        b._plain_head = False  # the model's own forward: full logits for the whole padded batch
    b.create_adapter("r", LoraConfig(rank=8, seed=0))
    if case in ("ragged", "ragged-one-pass"):
        data = [datum(512, 0)] + [datum(1, i + 1) for i in range(100)]
    elif case == "packed":
        data = [datum(612, 0)]
    else:
        data = [datum(128, i) for i in range(80)]
    base = _rss_mb()
    if case == "big":
        out = b.forward_backward("r", ForwardBackwardInput(data=data))
        g_big = {k: p.grad.clone() for k, p in b._runs["r"].params.items()}
        b.create_adapter("s", LoraConfig(rank=8, seed=0))
        loss = 0.0
        for i in range(0, 80, 8):
            loss += b.forward_backward("s", ForwardBackwardInput(data=data[i:i + 8])).metrics["loss:sum"]
        g_small = {k: p.grad for k, p in b._runs["s"].params.items()}
        # relative to each tensor's scale; LoRA A gradients are exactly 0 on the first step (B starts at 0)
        diff = max(float((g_big[k] - g_small[k]).abs().max() / g_small[k].abs().max())
                   for k in g_big if float(g_small[k].abs().max()) > 0)
        result = {"loss_big": out.metrics["loss:sum"], "loss_small": loss, "grad_rel_diff": diff}
    else:
        out = b.forward_backward("r", ForwardBackwardInput(data=data))
        result = {"loss": out.metrics["loss:sum"]}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"case": case, "peak_mb": peak, "base_mb": base, "delta_mb": peak - base, **result}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=int, default=1024, help="token budget per pass")
    p.add_argument("--child")
    args = p.parse_args()
    if args.child:
        child(args.child, args.budget)
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    results = {}
    for case in ("packed", "ragged", "ragged-one-pass", "big"):
        out = subprocess.run([sys.executable, __file__, "--child", case, "--budget", str(args.budget)],
                             capture_output=True, text=True, env=env, check=True)
        results[case] = json.loads(out.stdout.strip().splitlines()[-1])
    packed, ragged, old = (results[c]["delta_mb"] for c in ("packed", "ragged", "ragged-one-pass"))
    print(f"forward_backward peak memory above the loaded model (tiny-qwen2, CPU, budget {args.budget} tokens):")
    print(f"  1x512 + 100x1 tokens, micro-batched + chunked logits: {ragged:8.1f} MB")
    print(f"  the same 612 tokens as one packed sequence:         {packed:8.1f} MB")
    print(f"  1x512 + 100x1 in one padded pass, full logits:      {old:8.1f} MB")
    print(f"  ragged / packed = {ragged / packed:.2f}x (goal <= 1.5x); one-pass / micro-batched = "
          f"{old / ragged:.1f}x")
    big = results["big"]
    print(f"  80x128 in one call (10 passes) vs 10 calls of 8x128: loss {big['loss_big']:.4f} vs "
          f"{big['loss_small']:.4f}, largest gradient difference {big['grad_rel_diff']:.1e} (relative)")


if __name__ == "__main__":
    main()
