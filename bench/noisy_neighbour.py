"""Noisy-neighbour benchmark: a well-behaved tenant's step time alone, then beside tenants who misbehave.

    hatch run python bench/noisy_neighbour.py [--steps 12] [--port 0]

Deploys ``deploy/local-tinker.yaml`` (embedded Ray, the built-in tiny model) and drives it with the official
``tinker`` SDK only. The well-behaved tenant trains (forward_backward + optim_step, 4x64 tokens, pipelined).
Its steps are timed alone, then during each phase of misbehaviour by other keys:

- ``invalid``: malformed requests in a loop (tokens outside the vocabulary, mismatched loss inputs, an
  unknown loss): each must be a 4xx for its sender and cost the others nothing;
- ``flood``: many sampling requests at once (num_samples 8, 48 tokens each) past the per-key queue limit,
  so the sender gets 429s and the SDK's backoff;
- ``oversized``: forward_backward of 1x512 + 400x1 tokens back to back (valid, micro-batched: real work
  that the scheduler must interleave fairly with the well-behaved tenant's).

Prints per phase the well-behaved tenant's median step time over its median alone (goal <= 1.5x), its
failed requests (goal 0), what the noisy tenants got back, and the peak resident memory of every replica
process (goal: bounded, no replica restarted).
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))

from local_stack import process_tree, rss_mb  # noqa: E402
from tinker_bench import deploy  # noqa: E402


def _datum(types, tokens):
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)})


class Good:
    def __init__(self, base: str) -> None:
        import tinker
        from tinker import types

        self.sc = tinker.ServiceClient(base_url=base, api_key="tml-good-tenant")
        self.tc = self.sc.create_lora_training_client(base_model="tiny-qwen2", rank=4, seed=0).result()
        self.data = [_datum(types, [(r * 97 + i * 13) % 1800 + 60 for i in range(65)]) for r in range(4)]
        self.adam = types.AdamParams(learning_rate=1e-4)
        self.failures: list[str] = []

    def steps(self, n: int) -> list[float]:
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            try:
                fb = self.tc.forward_backward(self.data, "cross_entropy")
                op = self.tc.optim_step(self.adam)
                fb.result()
                op.result()
            except Exception as e:  # noqa: BLE001 - counted: the goal is zero
                self.failures.append(f"{type(e).__name__}: {str(e)[:120]}")
            out.append(time.perf_counter() - t0)
        return out


def noisy_tenant(base: str, phase: str, index: int, stop, outcomes) -> None:
    """One misbehaving tenant, in a process of its own (as another user's machine would be: its client's
    work must not share the well-behaved client's interpreter), running ``phase`` until ``stop`` is set;
    puts what it got back on ``outcomes``."""
    import tinker
    from tinker import types

    got: collections.Counter[str] = collections.Counter()
    sc = tinker.ServiceClient(base_url=base, api_key=f"tml-noisy-{phase}-{index}")
    tc = sc.create_lora_training_client(base_model="tiny-qwen2", rank=4, seed=1).result()
    try:
        if phase == "flood":
            sampler = tc.save_weights_and_get_sampling_client("flood")
            params = types.SamplingParams(max_tokens=48, temperature=1.0)
            prompt = types.ModelInput.from_ints([5, 6, 7, 8])
        while not stop.is_set():
            try:
                if phase == "invalid":
                    bad = [
                        [_datum(types, [10**9, 3, 4])],  # token outside the vocabulary
                        [types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3]),
                                     loss_fn_inputs={"target_tokens": [1], "weights": [1.0, 1.0]})],
                    ][got.total() % 2]
                    tc.forward_backward(bad, "cross_entropy").result()
                elif phase == "flood":
                    for f in [sampler.sample(prompt, num_samples=8, sampling_params=params) for _ in range(32)]:
                        f.result()
                else:
                    data = [_datum(types, [(i * 7) % 1800 + 60 for i in range(513)])]
                    data += [_datum(types, [61, 62]) for _ in range(400)]
                    tc.forward_backward(data, "cross_entropy").result()
                got["ok"] += 1
            except Exception as e:  # noqa: BLE001 - what the noisy tenant got is the point
                status = getattr(e, "status_code", None)
                got[str(status) if status else type(e).__name__] += 1
    finally:
        outcomes.put(dict(got))
        sc.close("success").result()


def replica_rss(launcher_pid: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for pid in process_tree(launcher_pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "ServeReplica:" in cmd:
            name = cmd.split("ServeReplica:", 1)[1].split()[0].split(".")[0]
            out[f"{name} (pid {pid})"] = rss_mb(pid)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--noisy-tenants", type=int, default=2)
    args = ap.parse_args()
    if not args.port:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            args.port = s.getsockname()[1]
    root = tempfile.mkdtemp(prefix="twinkle-noisy-")
    proc = deploy(args.port, root)
    base = f"http://127.0.0.1:{args.port}"
    peak: dict[str, float] = {}
    sampling = threading.Event()

    def sample_rss() -> None:
        while not sampling.is_set():
            for name, mb in replica_rss(proc.pid).items():
                peak[name] = max(peak.get(name, 0.0), mb)
            time.sleep(0.5)

    threading.Thread(target=sample_rss, daemon=True).start()
    try:
        good = Good(base)
        good.steps(3)  # warm-up
        alone = statistics.median(good.steps(args.steps))
        print(f"well-behaved tenant alone: {alone * 1000:.0f} ms/step (median of {args.steps})")
        ctx = multiprocessing.get_context("spawn")
        for phase in ("invalid", "flood", "oversized"):
            stop, outcomes = ctx.Event(), ctx.Queue()
            noisy = [ctx.Process(target=noisy_tenant, args=(base, phase, i, stop, outcomes), daemon=True)
                     for i in range(args.noisy_tenants)]
            for n in noisy:
                n.start()
            time.sleep(8)  # let the noise build up (the processes import the SDK first)
            failed_before = len(good.failures)
            during = statistics.median(good.steps(args.steps))
            stop.set()
            got: collections.Counter[str] = collections.Counter()
            for _ in noisy:
                got.update(outcomes.get(timeout=180))
            for n in noisy:
                n.join(timeout=60)
            print(f"  beside {args.noisy_tenants} x {phase:9s}: {during * 1000:.0f} ms/step -> ratio "
                  f"{during / alone:.2f}x (goal <= 1.5x); failed requests {len(good.failures) - failed_before} "
                  f"(goal 0); noisy tenants got {dict(got)}")
        alive = proc.poll() is None
        print(f"server alive at the end: {alive}; failures of the well-behaved tenant: {good.failures[:3]}")
        print("peak RSS per replica process (MB):")
        for name, mb in sorted(peak.items()):
            print(f"  {name:60s} {mb:8.0f}")
        restarted = len({n.split(' (pid')[0] for n in peak}) != len(peak)
        print(f"a replica restarted (a new pid for one app): {restarted}")
    finally:
        sampling.set()
        proc.terminate()
        try:
            proc.wait(timeout=90)
        except Exception:  # noqa: BLE001
            proc.kill()


if __name__ == "__main__":
    main()
