#!/usr/bin/env python
"""The megatron backend on one CUDA GPU, without the CPU shim, against the transformers backend: one script,
a few minutes, no network.

    python scripts/gpu_check_megatron.py [--layers 24] [--steps 5]

The model is Qwen2.5-0.5B-shaped with random weights, built from a config (no download). On the GPU machine,
which has torch, transformers and peft but no package index, bring megatron-core as a wheel for its Python::

    pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \\
        -d .whl megatron-core==0.16.1
    pip install --no-index --no-deps --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site python scripts/gpu_check_megatron.py

The repo's packages are imported from their ``src`` folders, so the checkout needs no install.

Checks (one ``PASS``/``FAIL``/``INFO`` line each; exit 1 if any failed, 2 without CUDA): tp=1 logprobs equal
the transformers backend's for the same adapter; a 5-step LoRA trajectory follows it; the step time and peak
memory of 8 x 1024 tokens on both; the exported adapter loads in stock peft with the same logprobs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(_REPO, "packages", p, "src") for p in ("twinkle-common", "twinkle-model")]
RESULTS: list[bool] = []


def report(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'PASS' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)
    RESULTS.append(bool(ok))


def build_model(layers: int) -> str:
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=layers, num_attention_heads=14,
                      num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6,
                      rms_norm_eps=1e-6, tie_word_embeddings=True, torch_dtype="float32")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32)
    path = tempfile.mkdtemp(prefix="qwen05-random-")
    model.save_pretrained(path)
    return path


def batch(n: int, length: int, seed: int, loss: str = "cross_entropy"):
    import torch
    from twinkle.common.wire import Datum, ForwardBackwardInput, TensorData

    g = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(n):
        toks = torch.randint(0, 150000, (length + 1,), generator=g).tolist()
        data.append(Datum(model_input=toks[:-1], loss_fn_inputs={"target_tokens": TensorData(toks[1:], "int64")}))
    return ForwardBackwardInput(data=data, loss_fn=loss)


def max_diff(a, b) -> float:
    import torch

    return max(float((torch.tensor(x["logprobs"].data) - torch.tensor(y["logprobs"].data)).abs().max())
               for x, y in zip(a.loss_fn_outputs, b.loss_fn_outputs))


def main(args: argparse.Namespace) -> int:
    import torch

    if not torch.cuda.is_available():
        print("SKIP no CUDA device", flush=True)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    from twinkle.common.wire import AdamParams, LoraConfig
    from twinkle.model.megatron.worker import MegatronWorker
    from twinkle.model.transformers_backend import TransformersBackend

    path = build_model(args.layers)
    print(f"INFO random Qwen2.5-0.5B-shaped model ({args.layers} layers) at {path}", flush=True)
    ref = TransformersBackend(path, device="cuda")
    mg = MegatronWorker(path, 0, 1, "127.0.0.1", 0, "cuda", tp_size=1, pp_size=1).backend
    cfg, adam = LoraConfig(rank=16, alpha=32, seed=5), AdamParams(learning_rate=1e-3, grad_clip_norm=1.0)
    work = tempfile.mkdtemp(prefix="gpu-check-megatron-")
    try:
        ref.create_adapter("r", cfg)
        with torch.no_grad():
            for key, p in ref._resident("r").params.items():
                if "lora_B" in key:
                    p.copy_(torch.randn_like(p) * 0.02)
        start = ref.save_state("r", os.path.join(work, "start")).path
        mg.create_adapter("r", cfg)
        mg.load_state("r", start, include_optimizer=True)
        probe = batch(4, 256, 1)
        d = max_diff(mg.forward_backward("r", probe, True), ref.forward_backward("r", probe, True))
        report("logprobs equal the transformers backend's (fp32, tp=1)", d < 1e-3, f"max |diff| {d:.2e}")
        worst = 0.0
        for step in range(args.steps):
            inp = batch(4, 256, 10 + step)
            mg.forward_backward("r", inp)
            ref.forward_backward("r", inp)
            mg.optim_step("r", adam)
            ref.optim_step("r", adam)
            worst = max(worst, max_diff(mg.forward_backward("r", probe, True), ref.forward_backward("r", probe, True)))
        report(f"a {args.steps}-step LoRA trajectory follows the transformers backend", worst < 5e-3,
               f"max |logprob diff| {worst:.2e}")
        big = batch(8, 1024, 99)
        for name, b in (("transformers", ref), ("megatron", mg)):
            b.forward_backward("r", big)
            b.optim_step("r", adam)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            for _ in range(3):
                b.forward_backward("r", big)
                b.optim_step("r", adam)
            torch.cuda.synchronize()
            print(f"INFO {name}: 8x1024 tokens, step {(time.perf_counter() - t0) / 3 * 1000:.1f} ms, "
                  f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB", flush=True)
        saved = mg.save_sampler_weights("r", os.path.join(work, "sampler")).path
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).cuda()
        peft_model = PeftModel.from_pretrained(hf, saved).eval()
        ids = torch.tensor([probe.data[0].model_input], device="cuda")
        targets = torch.tensor([probe.data[0].loss_fn_inputs["target_tokens"].data], device="cuda")
        with torch.no_grad():
            lp = torch.log_softmax(peft_model(input_ids=ids).logits.float(), -1).gather(-1, targets[..., None])[..., 0]
        mine = torch.tensor(mg.forward_backward("r", probe, True).loss_fn_outputs[0]["logprobs"].data, device="cuda")
        d = float((lp[0] - mine).abs().max())
        report("the exported adapter loads in stock peft with the same logprobs", d < 1e-3, f"max |diff| {d:.2e}")
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        report("the check ran to its end", False, f"{type(e).__name__}: {e}")
    return 0 if all(RESULTS) else 1


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--steps", type=int, default=5)
    sys.exit(main(p.parse_args()))
