"""Two replicas of the model and of the sampler application: runs spread over both model replicas, and a killed
replica's runs move to the other; sampling goes on through a sampler replica's death.

``deploy/local-tinker.yaml`` with ``num_replicas: 2`` on the model and sampler applications, the official SDK. Several
keys' runs train; each run's replica (its lease, ``<checkpoint_dir>/.runs/<app>/.leases/<run>``) is read
from disk. One replica is SIGKILLed: every run trains on, and every run's losses equal a reference run's on
the same data from the same seed, so no step was lost or applied twice wherever the run went.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from _cluster import REPO, base_env, free_port
from test_fault_injection import CALL_TIMEOUT_S, Stack, _batch, _descendants, _step

tinker = pytest.importorskip("tinker")

pytestmark = pytest.mark.acceptance

APP = "models-tiny-qwen2"
SAMPLER = "sampler-tiny-qwen2"
KEYS = ("tml-replicas-alice", "tml-replicas-bob", "tml-replicas-carol")
RUNS_PER_KEY = 2


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("replicas")
    port = free_port()
    text = (REPO / "deploy" / "local-tinker.yaml").read_text().replace("port: 8000", f"port: {port}")
    for deployment in ("ModelManagement", "SamplerManagement"):
        text = text.replace(f"      - name: {deployment}\n", f"      - name: {deployment}\n        num_replicas: 2\n", 1)
    cfg = root / "replicas.yaml"
    cfg.write_text(text)
    stack = Stack(f"http://127.0.0.1:{port}", cfg, base_env(TWINKLE_CHECKPOINT_DIR=str(root / "ckpt")), root)
    try:
        stack.launch()
        yield stack
    finally:
        stack.stop()


def _replica_pids(stack: Stack, app: str = APP) -> dict[int, str]:
    """pid -> command line of an application's live replica processes."""
    found = {}
    for pid in _descendants(stack.proc.pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if f"ServeReplica:{app}:" in cmd:
            found[pid] = cmd
    return found


def _holders(stack: Stack, run_ids: list[str]) -> dict[str, str]:
    leases = stack.root / "ckpt" / ".runs" / APP / ".leases"
    return {run_id: (leases / run_id).read_text() for run_id in run_ids}


def _spread(stack: Stack, runs: list, more, run_id, limit: int = 24) -> list:
    """``runs``, and more (``more(i)``) until both replicas hold one of them: a new run goes where rendezvous
    hashing of its random id says, so six runs all land on one of two replicas 1 time in 32."""
    while len(set(_holders(stack, [run_id(r) for r in runs]).values())) < 2:
        assert len(runs) < limit, f"{limit} runs and all of them on one replica: the routing does not spread"
        runs.append(more(len(runs)))
    return runs


def _wait_for_two_replicas(stack: Stack, app: str = APP, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while len(_replica_pids(stack, app)) < 2:
        assert time.monotonic() < deadline, f"Serve did not bring {app} back to two replicas"
        time.sleep(1)


def test_runs_spread_over_two_replicas_and_survive_one_being_killed(stack):
    _wait_for_two_replicas(stack)
    clients = [tinker.ServiceClient(base_url=stack.base, api_key=key) for key in KEYS]
    try:
        reference = clients[0].create_lora_training_client(base_model="tiny-qwen2", rank=4, seed=5).result()
        expected = [_step(reference, _batch(i, rows=8)) for i in range(4)]

        runs = [sc.create_lora_training_client(base_model="tiny-qwen2", rank=4, seed=5)
                for sc in clients for _ in range(RUNS_PER_KEY)]
        runs = [r.result(timeout=CALL_TIMEOUT_S) for r in runs]
        runs = _spread(stack, runs, lambda i: clients[i % len(clients)].create_lora_training_client(
            base_model="tiny-qwen2", rank=4, seed=5).result(timeout=CALL_TIMEOUT_S), lambda tc: tc.model_id)
        losses: dict[int, list[float]] = {i: [] for i in range(len(runs))}
        for step in range(2):
            for i, tc in enumerate(runs):
                losses[i].append(_step(tc, _batch(step, rows=8)))

        ids = [tc.model_id for tc in runs]
        before = _holders(stack, ids)
        assert len(set(before.values())) == 2, f"the runs did not spread over both replicas: {before}"

        victim_pid, victim_cmd = next(iter(_replica_pids(stack).items()))
        os.kill(victim_pid, signal.SIGKILL)
        for step in (2, 3):
            for i, tc in enumerate(runs):
                losses[i].append(_step(tc, _batch(step, rows=8)))

        for i, got in losses.items():
            assert got == pytest.approx(expected, abs=1e-5), (i, got, expected)
        after = _holders(stack, ids)
        moved = [run_id for run_id in ids if after[run_id] != before[run_id]]
        assert moved, "no run changed replica although one replica was killed"
        assert len(set(after.values()) - set(before.values())) <= 1
        print(f"{len(ids)} runs of {len(KEYS)} keys over 2 replicas "
              f"({sorted(list(before.values()).count(h) for h in set(before.values()))}); "
              f"{len(moved)} moved after a kill, every loss equals the reference")
    finally:
        for sc in clients:
            sc.close("success").result()


def test_sampling_goes_on_when_a_sampler_replica_is_killed(stack):
    from tinker import types

    _wait_for_two_replicas(stack, SAMPLER)
    sc = tinker.ServiceClient(base_url=stack.base, api_key=KEYS[0])
    try:
        tc = sc.create_lora_training_client(base_model="tiny-qwen2", rank=4, seed=5).result()
        _step(tc, _batch(0, rows=8))
        sampler = tc.save_weights_and_get_sampling_client("replicas").result(timeout=CALL_TIMEOUT_S)
        prompt = types.ModelInput.from_ints([11, 12, 13, 14])
        params = types.SamplingParams(max_tokens=6, temperature=0.0)

        def greedy() -> list[list[int]]:
            return [sampler.sample(prompt, num_samples=1, sampling_params=params).result(timeout=CALL_TIMEOUT_S)
                    .sequences[0].tokens for _ in range(4)]

        first = greedy()
        assert all(tokens == first[0] for tokens in first)  # whichever replica answered, the same adapter
        os.kill(next(iter(_replica_pids(stack, SAMPLER))), signal.SIGKILL)
        assert greedy() == first
    finally:
        sc.close("success").result()
