"""Durable-runs benchmark: what saving each run's state after every step costs, measured side by side.

    python bench/durability.py [--steps 20] [--batch 8] [--seq 128] [--rank 8] [--threads 2] [--json]

Two ``ModelService`` instances over ONE backend (the same model in memory), one with ``state_dir`` (durable:
every optim_step's state written, fsynced and swapped in before the step is answered) and one without. A
training step is what the SDK's loop awaits: forward_backward + optim_step, pipelined (both submitted, then
both awaited). Steps alternate between the two services so load drift hits both alike; medians are compared.

Prints the step time durable vs not (goal <= 1.05x), the median write of one run's state, and its size.
The time from a replica's death to the next successful step is measured on a deployed stack by
``tests/test_fault_injection.py`` (it prints the figure).

With ``--replicas``, instead: aggregate training throughput of ``--runs`` concurrent runs (one official-SDK
client each, in threads) on ``deploy/local-tinker.yaml`` deployed with one model replica, then with two —
steps per second in both and their ratio. The figure matters on machines with a device per replica; a 2-core
box has no spare cores for a second replica, so expect little there.
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


def replicas_throughput(args: argparse.Namespace) -> dict:
    import concurrent.futures
    import json as _json
    import signal
    import subprocess

    import tinker
    from tinker import types
    from tinker_bench import deploy
    from twinkle.server._uvicorn import free_port

    data = [types.Datum(model_input=types.ModelInput.from_ints(list(range(10, 10 + args.seq))),
                        loss_fn_inputs={"target_tokens": list(range(11, 11 + args.seq)), "weights": [1.0] * args.seq})
            for _ in range(args.batch)]
    adam = types.AdamParams(learning_rate=1e-4)
    out: dict = {"runs": args.runs, "steps_per_run": args.steps, "batch": f"{args.batch}x{args.seq}"}
    for replicas in (1, 2):
        root = tempfile.mkdtemp(prefix=f"twinkle-replicas-{replicas}-")
        port = free_port()
        server = deploy(port, root, lambda t: t.replace(
            "      - name: ModelManagement\n", f"      - name: ModelManagement\n        num_replicas: {replicas}\n", 1))
        try:
            _wait_running(replicas, subprocess, _json)
            clients = [tinker.ServiceClient(base_url=f"http://127.0.0.1:{port}", api_key=f"tml-bench-{i}")
                       for i in range(args.runs)]
            runs = [c.create_lora_training_client(base_model="tiny-qwen2", rank=args.rank, seed=i).result()
                    for i, c in enumerate(clients)]

            def train(tc, n: int) -> None:
                for _ in range(n):
                    fb, op = tc.forward_backward(data, "cross_entropy"), tc.optim_step(adam)
                    fb.result()
                    op.result()

            with concurrent.futures.ThreadPoolExecutor(len(runs)) as pool:
                list(pool.map(lambda tc: train(tc, 2), runs))  # warm-up
                t0 = time.perf_counter()
                list(pool.map(lambda tc: train(tc, args.steps), runs))
                elapsed = time.perf_counter() - t0
            leases = os.path.join(root, "ckpt", ".runs", "models-tiny-qwen2", ".leases")
            holders = [open(os.path.join(leases, tc.model_id)).read() for tc in runs]
            out[f"steps_per_s_{replicas}"] = round(len(runs) * args.steps / elapsed, 3)
            out[f"runs_per_replica_{replicas}"] = sorted(holders.count(h) for h in set(holders))
            for c in clients:
                c.close("success").result()
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=120)
    out["ratio"] = round(out["steps_per_s_2"] / out["steps_per_s_1"], 3)
    return out


def _wait_running(replicas: int, subprocess, json, timeout_s: float = 300) -> None:
    """Until ``twinkle-server status`` shows the model application with ``replicas`` running replicas (runs
    created before the second one runs would all stay on the first)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done = subprocess.run([sys.executable, "-m", "twinkle.server", "status", "--format", "json"],
                              capture_output=True, text=True, timeout=120)
        if done.returncode == 0:
            apps = {a["name"]: a for a in json.loads(done.stdout)["applications"]}
            model = apps.get("models-tiny-qwen2")
            if model and model["replicas"].get("RUNNING", 0) >= replicas:
                return
        time.sleep(2)
    raise RuntimeError(f"the model application did not reach {replicas} running replicas")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--replicas", action="store_true", help="aggregate steps/s with two model replicas vs one")
    ap.add_argument("--runs", type=int, default=4, help="concurrent runs (with --replicas)")
    a = ap.parse_args()
    if a.replicas:
        out = replicas_throughput(a)
        print(json.dumps(out) if a.json else
              f"{out['runs']} concurrent runs ({out['batch']}, {out['steps_per_run']} steps each, official SDK, "
              f"deploy/local-tinker.yaml): 1 model replica {out['steps_per_s_1']} steps/s, 2 replicas "
              f"{out['steps_per_s_2']} steps/s (runs per replica {out['runs_per_replica_2']}) -> "
              f"{out['ratio']:.2f}x on {os.cpu_count()} cores")
        sys.exit(0)
    out = asyncio.run(main(a))
    if a.json:
        print(json.dumps(out))
    else:
        print(f"step ({out['batch']}, LoRA r={out['rank']}, fb+optim pipelined), median of {out['steps']}:")
        print(f"  memory only {out['step_s_memory_only'] * 1000:.1f} ms, durable {out['step_s_durable'] * 1000:.1f} ms"
              f"  -> ratio {out['ratio']:.3f}x (goal <= 1.05x)")
        print(f"  one state write: {out['state_write_ms_median']:.2f} ms median, {out['state_bytes'] / 1024:.0f} KiB")
