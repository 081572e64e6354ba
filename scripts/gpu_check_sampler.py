#!/usr/bin/env python
"""One script that checks the sampler's whole GPU path in a few minutes on a CUDA machine.

    python scripts/gpu_check_sampler.py            # torch engine on CUDA + vLLM engine
    python scripts/gpu_check_sampler.py --torch-only

Uses the built-in tiny Qwen2 model (saved as a normal HF Qwen2 directory) and stock-peft LoRA adapters, and a
stock transformers/peft reference on the same GPU. Prints one ``PASS``/``FAIL``/``SKIP``/``INFO`` line per
check and exits 1 if any check failed (2 if there is no CUDA at all). A missing ``vllm`` package is a FAIL
unless ``--torch-only`` is given.

Greedy outputs are compared with a tie-aware rule: equal to the reference's greedy tokens, or, at the first
position where they differ, the reference's two candidates are within ``tie_tol`` of each other (different
kernels/batch shapes may break a near-tie differently; anything else is a real bug).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
import traceback

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
RESULTS: list[bool] = []


def report(name: str, ok: bool, detail: str = "") -> bool:
    print(f"{'PASS' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)
    RESULTS.append(bool(ok))
    return ok


def info(msg: str) -> None:
    print(f"INFO {msg}", flush=True)


def guarded(name: str):
    def deco(fn):
        async def run(*a, **kw):
            try:
                return await fn(*a, **kw)
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                report(name, False, f"{type(e).__name__}: {e}")

        return run

    return deco


class Reference:
    def __init__(self, model_id: str, device: str) -> None:
        import torch

        from twinkle.common.models import load_causal_lm

        self.torch, self.model_id, self.device = torch, model_id, device
        self.base = load_causal_lm(model_id, device=device).eval()
        self.cache: dict = {}

    def model(self, adapter):
        if adapter is None:
            return self.base
        import hashlib

        from peft import PeftModel

        from twinkle.common.models import load_causal_lm

        with open(os.path.join(adapter, "adapter_model.safetensors"), "rb") as f:
            h = hashlib.sha256(f.read()).hexdigest()
        if (adapter, h) not in self.cache:
            self.cache[(adapter, h)] = PeftModel.from_pretrained(
                load_causal_lm(self.model_id, device=self.device), adapter).eval()
        return self.cache[(adapter, h)]

    def logprobs(self, adapter, ids):
        with self.torch.no_grad():
            logits = self.model(adapter)(input_ids=self.torch.tensor([ids], device=self.device)).logits[0].float()
        return self.torch.log_softmax(logits, dim=-1)

    def teacher_forced(self, adapter, prompt, toks):
        lp = self.logprobs(adapter, list(prompt) + list(toks))
        return [lp[len(prompt) - 1 + k, t].item() for k, t in enumerate(toks)]

    def prompt_logprobs(self, adapter, prompt):
        lp = self.logprobs(adapter, prompt)
        return [None] + [lp[i - 1, prompt[i]].item() for i in range(1, len(prompt))]

    def greedy(self, adapter, prompt, n):
        t = self.torch
        with t.no_grad():
            out = self.model(adapter).generate(input_ids=t.tensor([prompt], device=self.device),
                                               attention_mask=t.ones(1, len(prompt), dtype=t.long, device=self.device),
                                               do_sample=False, max_new_tokens=n)
        return out[0, len(prompt):].tolist()

    def greedy_ok(self, adapter, prompt, got, n, tie_tol) -> tuple[bool, str]:
        want = self.greedy(adapter, prompt, n)
        if got == want:
            return True, "exact"
        j = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        if j >= min(len(got), len(want)):
            return False, f"length differs: got {len(got)} tokens, reference {len(want)}"
        lp = self.logprobs(adapter, list(prompt) + got[:j])[-1]
        gap = float(lp[want[j]] - lp[got[j]])
        return gap <= tie_tol, f"first difference at token {j}: reference-vs-got logprob gap {gap:.2e}"


def diff(a, b) -> float:
    if len(a) != len(b):
        return float("inf")
    return max((abs(x - y) for x, y in zip(a, b) if x is not None and y is not None), default=0.0)


def make_adapter(model_id, path, seed):
    import torch
    from peft import LoraConfig, get_peft_model

    from twinkle.common.models import load_causal_lm

    torch.manual_seed(seed)
    pm = get_peft_model(load_causal_lm(model_id), LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.05)
    pm.save_pretrained(path)
    return path


def straddling_stop_string(tok, toks: list[int]) -> str:
    """A stop string spanning a token boundary (last char of token j-1's text + token j's text), at a place
    where the text is clean: no half UTF-8 characters, which detokenizers may hold back differently."""
    for strict in (True, False):
        for j in range(3, len(toks)):
            a, b = tok.decode(toks[:j]), tok.decode(toks[: j + 1])
            stop = a[-1:] + b[len(a):]
            if a and len(b) > len(a) and b.startswith(a) and "\ufffd" not in (b if strict else stop):
                return stop
    raise AssertionError("no clean token boundary in the reference output")


def R(prompt, adapter=None, n=1, prompt_logprobs=False, **params):
    from twinkle.common.wire import SampleRequest, SamplingParams

    return SampleRequest(prompt=list(prompt), sampling_params=SamplingParams(**params), num_samples=n,
                         prompt_logprobs=prompt_logprobs, adapter_path=adapter)


async def engine_checks(tag, eng, ref, prompts, adapters, tok, *, lp_tol, tie_tol, workdir):
    from twinkle.common.models import TINY_MODEL_ID
    from twinkle.common.wire import UserError

    # 1. greedy + sampled-token logprobs, base and adapters (more adapters than max_loras=2), one concurrent wave
    cases = [(p, a) for p in prompts[:3] for a in [None] + adapters]
    outs = await eng.generate([R(p, a, max_tokens=16, temperature=0.0) for p, a in cases])
    bad = []
    worst = 0.0
    for (p, a), out in zip(cases, outs):
        s = out.sequences[0]
        ok, why = ref.greedy_ok(a, p, s.tokens, 16, tie_tol)
        if not ok:
            bad.append(f"{os.path.basename(a or 'base')}: {why}")
        worst = max(worst, diff(s.logprobs, ref.teacher_forced(a, p, s.tokens)))
    report(f"{tag} greedy == reference generate (base + {len(adapters)} adapters, mixed batch)", not bad,
           "; ".join(bad[:3]))
    report(f"{tag} greedy logprobs == teacher-forced", worst < lp_tol, f"max |diff| {worst:.2e} (tol {lp_tol})")

    # 2. sampled logprobs are raw teacher-forced, every sample
    outs = await eng.generate([R(prompts[1], a, n=3, max_tokens=16, temperature=0.8, top_p=0.9, top_k=40, seed=7)
                               for a in [None] + adapters])
    worst = max(diff(s.logprobs, ref.teacher_forced(a, prompts[1], s.tokens))
                for a, out in zip([None] + adapters, outs) for s in out.sequences)
    report(f"{tag} sampled logprobs (raw) == teacher-forced", worst < lp_tol, f"max |diff| {worst:.2e}")

    # 3. prompt logprobs
    outs = await eng.generate([R(prompts[1], a, prompt_logprobs=True, max_tokens=1) for a in [None] + adapters])
    ok = all(o.prompt_logprobs is not None and o.prompt_logprobs[0] is None for o in outs)
    worst = max(diff(o.prompt_logprobs, ref.prompt_logprobs(a, prompts[1])) for a, o in zip([None] + adapters, outs))
    report(f"{tag} prompt logprobs == teacher-forced, first null", ok and worst < lp_tol, f"max |diff| {worst:.2e}")

    # 4. seeds
    a1, a2, b, four = await eng.generate([
        R(prompts[0], max_tokens=20, seed=42), R(prompts[0], max_tokens=20, seed=42),
        R(prompts[0], max_tokens=20, seed=43), R(prompts[0], n=4, max_tokens=20, seed=9)])
    report(f"{tag} same seed -> same tokens, other seed -> other tokens",
           a1.sequences[0].tokens == a2.sequences[0].tokens != b.sequences[0].tokens)
    report(f"{tag} num_samples=4 -> 4 distinct samples", len({tuple(s.tokens) for s in four.sequences}) == 4)

    # 5. stops
    full = ref.greedy(None, prompts[4], 30)
    stop_id = full[6]
    (o,) = await eng.generate([R(prompts[4], max_tokens=30, temperature=0.0, stop=[stop_id])])
    report(f"{tag} stop token id ends the sequence and is included",
           o.sequences[0].tokens == full[: full.index(stop_id) + 1] and o.sequences[0].stop_reason == "stop",
           f"got {o.sequences[0].tokens[-3:]}")
    stop = straddling_stop_string(tok, full)
    expect = next(j for j in range(30) if stop in tok.decode(full[: j + 1]))
    (o,) = await eng.generate([R(prompts[4], max_tokens=30, temperature=0.0, stop=[stop])])
    report(f"{tag} stop string: tokens end with the token that completes it",
           o.sequences[0].tokens == full[: expect + 1] and o.sequences[0].stop_reason == "stop",
           f"stop={stop!r} got {len(o.sequences[0].tokens)} tokens, expected {expect + 1}")
    (o,) = await eng.generate([R(prompts[0], n=2, max_tokens=33, temperature=1.0, seed=1, stop=[])])
    report(f"{tag} stop=[] -> exactly max_tokens", all(len(s.tokens) == 33 and s.stop_reason == "length"
                                                       for s in o.sequences))

    # 6. hand-off: re-save adapter 0 in place, the next sample must use the new weights
    before = ref.prompt_logprobs(adapters[0], prompts[1])
    make_adapter(TINY_MODEL_ID, adapters[0], seed=999 if tag == "torch" else 1999)
    t0 = time.perf_counter()
    (o,) = await eng.generate([R(prompts[1], adapters[0], prompt_logprobs=True, max_tokens=1)])
    dt = time.perf_counter() - t0
    after = ref.prompt_logprobs(adapters[0], prompts[1])
    report(f"{tag} re-saved checkpoint is used by the next sample",
           diff(o.prompt_logprobs, after) < lp_tol and diff(before, after) > 1e-2, f"hand-off {dt * 1000:.0f} ms")

    # 7. a broken checkpoint is a UserError, never the base model
    broken = os.path.join(workdir, f"broken-{tag}")
    os.makedirs(broken, exist_ok=True)
    shutil.copy(os.path.join(adapters[1], "adapter_config.json"), broken)
    with open(os.path.join(broken, "adapter_model.safetensors"), "wb") as f:
        f.write(b"garbage" * 100)
    try:
        await eng.generate([R(prompts[0], broken, max_tokens=4)])
        report(f"{tag} corrupt checkpoint -> UserError", False, "it was served")
    except UserError as e:
        report(f"{tag} corrupt checkpoint -> UserError", e.field == "adapter_path", str(e)[:120])

    # 8. throughput, 1 vs 8 concurrent (information)
    runs = [
        ("1 request", [R(prompts[0], max_tokens=128, stop=[], seed=1)]),
        ("8 concurrent", [R(prompts[i % 6], max_tokens=128, stop=[], seed=i) for i in range(8)]),
        ("8 concurrent, 2 adapters", [R(prompts[i % 6], adapters[1 + i % 2], max_tokens=128, stop=[], seed=i)
                                      for i in range(8)]),
        ("8 concurrent, 3 adapters > 2 slots (reloads)",
         [R(prompts[i % 6], adapters[i % 3], max_tokens=128, stop=[], seed=i) for i in range(8)]),
    ]
    for label, reqs in runs:
        await eng.generate(reqs)
        t0 = time.perf_counter()
        await eng.generate(reqs)
        dt = time.perf_counter() - t0
        info(f"{tag} {label}: {len(reqs) * 128 / dt:.0f} tok/s")
    info(f"{tag} resident adapters: {[os.path.basename(e['path']) for e in eng.adapters.resident()]}")


async def main(args) -> int:
    import torch

    device = "cuda"
    if not torch.cuda.is_available():
        if not args.self_test_on_cpu:
            print("FAIL no CUDA device visible; this script checks the GPU path", flush=True)
            return 2
        device, args.torch_only = "cpu", True  # exercise this script's own logic with the torch engine on CPU
    os.environ.setdefault("TWINKLE_CACHE_DIR", os.path.join(tempfile.gettempdir(), "twinkle-cache"))
    from twinkle.common.models import TINY_MODEL_ID, load_tokenizer, resolve_model_path
    from twinkle.sampler import make_engine

    t_start = time.perf_counter()
    info(f"device {torch.cuda.get_device_name(0) if device == 'cuda' else 'cpu'}, torch {torch.__version__}")
    info(f"tiny model at {resolve_model_path(TINY_MODEL_ID)}")
    tok = load_tokenizer(TINY_MODEL_ID)
    prompts = [tok.encode(t) for t in [
        "The sun is", "<|im_start|>user\nWhat is the best way to learn?<|im_end|>\n", "def add_one(x):\n    return",
        "Seven", "A long time ago, in a small town, there", "1 2 3 4 5 6 7"]]
    work = tempfile.mkdtemp(prefix="twinkle-gpu-check-")
    adapters = [make_adapter(TINY_MODEL_ID, os.path.join(work, f"user{i}"), 100 + i) for i in range(3)]
    ref = Reference(TINY_MODEL_ID, device)

    # -- torch engine on CUDA --
    try:
        eng = make_engine("torch", TINY_MODEL_ID, {}, max_loras=2, device=device)
        report(f"torch engine starts on {device}", str(eng.device).startswith(device), str(eng.device))
        await guarded("torch engine checks")(engine_checks)("torch", eng, ref, prompts, adapters, tok,
                                                            lp_tol=1e-3, tie_tol=1e-3, workdir=work)
        st = eng.stats()
        report("torch engine batches concurrent requests", st["max_batch_rows"] >= 8,
               f"max rows {st['max_batch_rows']}")
        report("torch engine kept <= max_loras adapters resident", st["max_resident_adapters"] <= 2,
               str(st["max_resident_adapters"]))
        await eng.close()
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        report("torch engine on CUDA", False, f"{type(e).__name__}: {e}")

    # -- vLLM engine --
    if args.torch_only:
        print("SKIP vllm engine: --torch-only", flush=True)
    else:
        try:
            import vllm

            info(f"vllm {vllm.__version__}")
        except ImportError as e:
            report("vllm is importable", False, f"{e} (pip install vllm, or run with --torch-only)")
        else:
            eng = None
            for dtype, lp_tol, tie_tol in [("float32", 2e-3, 2e-3), ("bfloat16", 6e-2, 6e-2)]:
                try:
                    t0 = time.perf_counter()
                    eng = make_engine("vllm", TINY_MODEL_ID, {
                        "dtype": dtype, "gpu_memory_utilization": args.gpu_memory_utilization,
                        "max_model_len": 2048, "enforce_eager": True, "max_lora_rank": 16,
                    }, max_loras=2)
                    report(f"vllm engine starts ({dtype})", True, f"{time.perf_counter() - t0:.0f} s")
                    break
                except Exception as e:  # noqa: BLE001
                    traceback.print_exc()
                    info(f"vllm engine with dtype={dtype} failed to start: {type(e).__name__}: {e}")
            if eng is None:
                report("vllm engine starts", False, "neither float32 nor bfloat16")
            else:
                await guarded("vllm engine checks")(engine_checks)("vllm", eng, ref, prompts, adapters, tok,
                                                                   lp_tol=lp_tol, tie_tol=tie_tol, workdir=work)
                await eng.close()

    n_fail = RESULTS.count(False)
    print(f"{'PASS' if n_fail == 0 else 'FAIL'} summary: {len(RESULTS) - n_fail} passed, {n_fail} failed "
          f"in {time.perf_counter() - t_start:.0f} s", flush=True)
    return 0 if n_fail == 0 else 1


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--torch-only", action="store_true", help="check only the torch engine on CUDA")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    ap.add_argument("--self-test-on-cpu", action="store_true", help=argparse.SUPPRESS)
    sys.exit(asyncio.run(main(ap.parse_args())))
