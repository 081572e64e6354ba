"""What the Tinker-compatible server costs per training step, measured in one run.

Three ways to do the SDK's supervised step (``forward_backward`` + ``optim_step`` submitted together, then
awaited; cross-entropy over ``--batch`` × ``--seq`` tokens; LoRA rank ``--rank`` on attention, MLP and
unembedding; AdamW):

1. ``peft``    — in-process with plain transformers + peft + torch.optim.AdamW (no service at all);
2. ``service`` — the Model service called in-process (its scheduler thread, validation, metrics);
3. ``server``  — the unmodified official ``tinker`` SDK over HTTP against the Tinker app (uvicorn), which
   calls the same Model service through a ``LocalPort``. The server runs in a *separate process*, as it
   would for a real user, so client and server do not share a GIL.

The three are interleaved step by step (peft, service, server, peft, …) so that other load on the machine
hits all of them alike, and the overhead is the median of the *paired* differences. A short pause
(``--settle``) follows each step, so that work one method leaves behind does not land on the next one's time
(the deployed stack finishes its bookkeeping after the response: store writes, Serve's metrics and logs).
On a shared machine these still move by tens of milliseconds, so the server's own timestamps split each
server step exactly: client → request recorded (SDK + HTTP), recorded → optim_step finished (the Model
service's work, queueing included), finished → result in the client's hands (long-poll wake-up + HTTP + SDK).

Then ``retrieve_future`` latency for a request that has already finished (the cost of one poll: auth, the
finished-result cache, rendering) over a keep-alive connection.

With ``--deploy`` the ``server`` step goes to ``deploy/local-tinker.yaml`` deployed on Ray Serve (launched
here, on a free port, state in a temporary directory): the central replica answering HTTP itself
(``ingress: gateway``; ``--ingress serve`` puts Serve's proxy in front instead) and a handle call to the model
replica are then on the path, as for a real user.

    python bench/tinker_bench.py [--deploy [--ingress gateway|serve]] [--steps 40] [--batch 8] [--seq 128] [--rank 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Idle OpenMP threads of one process must not spin on the cores the other process computes on.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
MODEL_ID = "builtin://tiny-qwen2"


# ----------------------------------------------------------------------------------------- server process


def deploy(port: int, root: str, edit=None) -> subprocess.Popen:
    """``deploy/local-tinker.yaml`` (changed by ``edit(text)`` if given) on a free port, its state under
    ``root``; returns once it answers."""
    import httpx

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(repo, "deploy", "local-tinker.yaml")) as f:
        text = f.read().replace("port: 8000", f"port: {port}")
    if edit is not None:
        text = edit(text)
    text += f"checkpoint_dir: {os.path.join(root, 'ckpt')}\n"
    cfg = os.path.join(root, "local-tinker.yaml")
    with open(cfg, "w") as f:
        f.write(text)
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", "twinkle.server", "--config", cfg, "--log-level", "WARNING"],
                            cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the deployed server exited while starting")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/v1/healthz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.terminate()
    raise RuntimeError("the deployed server did not answer within 300 s")


def serve(port: int, root: str) -> None:
    """Child process: the Tinker app over an in-process Model service, until stdin closes."""
    from twinkle.server.tinker import TinkerSettings
    from twinkle.server.tinker.testing import LocalTinkerServer

    settings = TinkerSettings(checkpoint_dir=os.path.join(root, "ckpt"))
    with LocalTinkerServer(settings, MODEL_ID, port=port, log_level="error"):
        print("READY", flush=True)
        sys.stdin.read()


# ----------------------------------------------------------------------------------------- the three steps


def make_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(10, vocab) for _ in range(seq + 1)] for _ in range(batch)]


class PeftStep:
    def __init__(self, rank: int, rows: list[list[int]]) -> None:
        import torch
        from peft import LoraConfig, get_peft_model

        from twinkle.common.models import load_causal_lm

        torch.manual_seed(0)
        self.torch = torch
        model = load_causal_lm(MODEL_ID)
        cfg = LoraConfig(r=rank, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                 "up_proj", "down_proj", "lm_head"],
                         bias="none", task_type="CAUSAL_LM")
        self.model = get_peft_model(model, cfg)
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-4,
                                     betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0)
        t = torch.tensor(rows)
        self.inputs, self.targets = t[:, :-1], t[:, 1:]

    def step(self) -> float:
        torch = self.torch
        logits = self.model(input_ids=self.inputs).logits
        lp = torch.log_softmax(logits.float(), -1).gather(-1, self.targets.unsqueeze(-1)).squeeze(-1)
        loss = -lp.sum()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())


class ServiceStep:
    def __init__(self, rank: int, rows: list[list[int]], state_dir: str | None = None) -> None:
        from twinkle.common.wire import AdamParams, Datum, ForwardBackwardInput, LoraConfig, TensorData
        from twinkle.model.service import ModelService

        self.loop = asyncio.new_event_loop()
        self.svc = ModelService(MODEL_ID, state_dir=state_dir)
        self.loop.run_until_complete(self.svc.create_run("bench", "me", LoraConfig(rank=rank, seed=0)))
        data = [Datum(model_input=r[:-1], loss_fn_inputs={
            "target_tokens": TensorData(data=r[1:], dtype="int64"),
            "weights": TensorData(data=[1.0] * (len(r) - 1), dtype="float32")}) for r in rows]
        self.inp = ForwardBackwardInput(data=data, loss_fn="cross_entropy")
        self.adam = AdamParams(learning_rate=1e-4)
        self.seq = 0

    def step(self) -> float:
        async def go():
            self.seq += 2
            fb = asyncio.ensure_future(self.svc.forward_backward("bench", "me", self.seq - 1, self.inp))
            op = asyncio.ensure_future(self.svc.optim_step("bench", "me", self.seq, self.adam))
            out = await fb
            await op
            return out.metrics["loss:sum"]

        return self.loop.run_until_complete(go())

    def close(self) -> None:
        self.loop.run_until_complete(self.svc.close())


class SdkStep:
    def __init__(self, base_url: str, rank: int, rows: list[list[int]]) -> None:
        import tinker
        from tinker import types

        self.types = types
        self.sc = tinker.ServiceClient(base_url=base_url, api_key="tml-bench")
        self.tc = self.sc.create_lora_training_client(base_model="tiny-qwen2", rank=rank, seed=0).result()
        self.data = [types.Datum(model_input=types.ModelInput.from_ints(r[:-1]),
                                 loss_fn_inputs={"target_tokens": r[1:], "weights": [1.0] * (len(r) - 1)})
                     for r in rows]
        self.adam = types.AdamParams(learning_rate=1e-4)
        self.spans: list[tuple[float, float]] = []

    def step(self) -> float:
        t0 = time.time()
        fb = self.tc.forward_backward(self.data, "cross_entropy")
        op = self.tc.optim_step(self.adam)
        out = fb.result()
        op.result()
        self.spans.append((t0, time.time()))
        return out.metrics["loss:sum"]

    def close(self) -> None:
        self.sc.close("success").result()


def timed(step, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def cpu_per_step(step, n: int) -> dict[str, float]:
    """CPU time (ms) each Ray process of the deployed stack, and this process, spends per server step, over
    ``n`` server steps alone: where the machine's cores go while a step runs (on a 2-core box, Serve's
    processes take CPU the model replica's torch threads would use)."""
    import psutil

    def cpu() -> dict[str, float]:
        out: dict[str, float] = {}
        for proc in psutil.process_iter(["cmdline"]):
            cmd = " ".join(proc.info["cmdline"] or [])
            if proc.pid == os.getpid():
                name = "bench process (SDK client)"
            elif cmd.startswith("ray::"):
                name = cmd.split()[0].removeprefix("ray::")
            elif "/ray/core/" in cmd or "ray/dashboard" in cmd or "ray/_private" in cmd:
                name = "Ray's own daemons (GCS, raylet, dashboard, log monitor)"
            else:
                continue
            try:
                t = proc.cpu_times()
            except psutil.Error:
                continue
            out[name] = out.get(name, 0.0) + (t.user + t.system) * 1000
        return out

    before = cpu()
    for _ in range(n):
        step()
    after = cpu()
    return {k: (v - before.get(k, 0.0)) / n for k, v in after.items()}


def retrieve_latency(base_url: str, n: int) -> list[float]:
    """p50 of ``retrieve_future`` for a finished request, over one keep-alive connection."""
    import httpx

    h = {"X-API-Key": "tml-bench-poll", "Content-Type": "application/json"}
    with httpx.Client(base_url=f"{base_url}/api/v1", headers=h, timeout=30) as c:
        sid = c.post("/create_session", json={"tags": [], "sdk_version": "bench"}).json()["session_id"]
        rid = c.post("/create_model", json={"session_id": sid, "model_seq_id": 0, "base_model": "tiny-qwen2",
                                            "lora_config": {"rank": 4}}).json()["request_id"]
        while c.post("/retrieve_future", json={"request_id": rid}).json().get("type") == "try_again":
            pass
        for _ in range(20):  # warm up
            c.post("/retrieve_future", json={"request_id": rid})
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            r = c.post("/retrieve_future", json={"request_id": rid})
            out.append((time.perf_counter() - t0) * 1000)
            assert r.status_code == 200 and "model_id" in r.json()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40, help="timed steps per method")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--polls", type=int, default=500)
    p.add_argument("--settle", type=float, default=0.2,
                   help="pause (s) after each step, so that work one method leaves behind does not land on the "
                        "next method's time")
    p.add_argument("--deploy", action="store_true", help="measure against deploy/local-tinker.yaml on Ray Serve")
    p.add_argument("--ingress", choices=("gateway", "serve"),
                   help="with --deploy: who answers HTTP (default: as deploy/local-tinker.yaml says)")
    p.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        serve(args.serve, args.root)
        return

    import logging

    logging.disable(logging.WARNING)
    from twinkle.common.models import load_tokenizer
    from twinkle.server._uvicorn import free_port

    vocab = len(load_tokenizer(MODEL_ID))
    rows = make_batch(args.batch, args.seq, vocab)
    port = free_port()
    root = tempfile.mkdtemp(prefix="tinker-bench-")
    if args.deploy:
        server = deploy(port, root, edit=None if args.ingress is None else
                        lambda text: re.sub(r"(?m)^ingress: \w+$", f"ingress: {args.ingress}", text))
    else:
        server = subprocess.Popen([sys.executable, __file__, "--serve", str(port), "--root", root],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        if not args.deploy:
            assert server.stdout.readline().strip() == "READY", "the server did not start"
        base_url = f"http://127.0.0.1:{port}"
        # Like for like: a deployed model application keeps its runs durable (``durable_runs``, on by default),
        # so the in-process service it is compared with writes the same state after each step.
        state_dir = os.path.join(root, "service-runs") if args.deploy else None
        methods = {"peft": PeftStep(args.rank, rows), "service": ServiceStep(args.rank, rows, state_dir),
                   "server": SdkStep(base_url, args.rank, rows)}
        for m in methods.values():
            timed(m.step, args.warmup)
        methods["server"].spans.clear()
        times: dict[str, list[float]] = {k: [] for k in methods}
        for _ in range(args.steps):
            for name, m in methods.items():
                times[name] += timed(m.step, 1)
                time.sleep(args.settle)
        cpu = cpu_per_step(methods["server"].step, min(10, args.steps)) if args.deploy else {}
        polls = retrieve_latency(base_url, args.polls)
        spans = methods["server"].spans
        methods["server"].close()
        methods["service"].close()
    finally:
        if args.deploy:
            server.send_signal(signal.SIGTERM)
        else:
            server.stdin.close()
        server.wait(timeout=120)

    med = {k: statistics.median(v) for k, v in times.items()}
    paired = {k: statistics.median(a - b for a, b in zip(times[k], times["peft"])) for k in ("service", "server")}
    gateway = statistics.median(a - b for a, b in zip(times["server"], times["service"]))
    db = os.path.join(root, "state.sqlite" if args.deploy else os.path.join("ckpt", "twinkle-state.sqlite"))
    split = _server_split(db, spans)
    where = (f"deployed on Ray Serve (deploy/local-tinker.yaml, ingress: {args.ingress or 'as written'})"
             if args.deploy else "in a separate process")
    print(f"supervised step, {args.batch}x{args.seq} tokens, LoRA rank {args.rank}, tiny-qwen2 on "
          f"{os.cpu_count()} CPU(s); {args.steps} steps each, interleaved step by step ({args.settle:g} s pause after "
          f"each); server {where}; "
          f"in-process service {'with durable run state, as deployed' if state_dir else 'in memory, as served'}")
    for k in methods:
        q = statistics.quantiles(times[k], n=10)
        print(f"  {k:8s} median {med[k]:8.1f} ms   (p10 {q[0]:.1f}, p90 {q[-1]:.1f})")
    print(f"  server - peft   (paired median): {paired['server']:+7.1f} ms/step")
    print(f"  service - peft  (paired median): {paired['service']:+7.1f} ms/step   (the Model service)")
    print(f"  server - service (paired median): {gateway:+6.1f} ms/step   (gateway + HTTP + SDK, plus any difference "
          "in how fast the serving process computes the same step; goal <= 30)")
    print(f"  server step split by the server's timestamps (medians): SDK+HTTP to recorded {split[0]:.1f} ms, "
          f"Model service {split[1]:.1f} ms (in-process service: {med['service']:.1f} ms), finished to client "
          f"{split[2]:.1f} ms -> outside the service {split[0] + split[2]:.1f} ms/step")
    if cpu:
        print(f"  CPU per server step ({os.cpu_count()} cores), by process:")
        for name, ms in sorted(cpu.items(), key=lambda kv: -kv[1]):
            if ms >= 1:
                print(f"    {ms:7.1f} ms  {name}")
    q = statistics.quantiles(polls, n=100)
    print(f"retrieve_future of a finished request: p50 {statistics.median(polls):.2f} ms, p90 {q[89]:.2f} ms, "
          f"p99 {q[98]:.2f} ms ({len(polls)} polls, keep-alive)")
    print(json.dumps({"median_ms": med, "paired_overhead_ms": paired, "gateway_ms": gateway,
                      "outside_service_ms": split[0] + split[2], "retrieve_p50_ms": statistics.median(polls),
                      "cpu_ms_per_server_step": cpu}))


def _server_split(db_path: str, spans: list[tuple[float, float]]) -> tuple[float, float, float]:
    """Per server step: (client start -> forward_backward recorded, recorded -> optim_step finished,
    finished -> client done), from the futures table; medians in ms."""
    import sqlite3

    conn = sqlite3.connect(db_path)
    rows = conn.execute("SELECT kind, created, finished FROM futures WHERE owner != '' AND kind IN "
                        "('forward_backward', 'optim_step') AND model_id LIKE '%:train:%' ORDER BY created").fetchall()
    conn.close()
    fbs = [r for r in rows if r[0] == "forward_backward"]
    opts = [r for r in rows if r[0] == "optim_step"]
    parts = []
    for t0, t1 in spans:
        fb = min((r for r in fbs if r[1] >= t0), key=lambda r: r[1], default=None)
        op = min((r for r in opts if r[1] >= t0), key=lambda r: r[1], default=None)
        if fb is None or op is None or op[2] is None or op[2] > t1:
            continue
        parts.append(((fb[1] - t0) * 1000, (op[2] - fb[1]) * 1000, (t1 - op[2]) * 1000))
    if not parts:
        return (float("nan"),) * 3
    return tuple(statistics.median(col) for col in zip(*parts))  # type: ignore[return-value]


if __name__ == "__main__":
    main()
