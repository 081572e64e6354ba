"""Two replicas of the model application behind the native Twinkle protocol: the native routes of whichever
replica Serve's proxy picks send a run's call on to the run's replica, and a killed replica's runs move to the
other with every loss equal to a reference run's.

Its own module so that the Tinker stack of ``test_replicas.py`` is stopped before this one starts.
"""

from __future__ import annotations

import os
import signal

import pytest

from _cluster import REPO, base_env, free_port
from test_fault_injection import Stack
from test_replicas import KEYS, _holders, _replica_pids, _spread, _wait_for_two_replicas

pytestmark = pytest.mark.acceptance


@pytest.fixture(scope="module")
def native_stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("replicas-native")
    port = free_port()
    text = (REPO / "deploy" / "local.yaml").read_text().replace("port: 8000", f"port: {port}")
    text = text.replace("      - name: ModelManagement\n", "      - name: ModelManagement\n        num_replicas: 2\n", 1)
    cfg = root / "replicas.yaml"
    cfg.write_text(text)
    stack = Stack(f"http://127.0.0.1:{port}", cfg, base_env(TWINKLE_CHECKPOINT_DIR=str(root / "ckpt")), root,
                  health=("/server/healthz", "/models/tiny-qwen2/healthz"))
    try:
        stack.launch()
        yield stack
    finally:
        stack.stop()


def test_native_runs_spread_and_survive_a_killed_replica(native_stack):
    """The native routes of whichever replica the proxy picks send a run's call on to the run's replica."""
    from twinkle_client import Datum, TwinkleClient

    stack = native_stack
    _wait_for_two_replicas(stack)
    data = [Datum.from_tokens(list(range(20 + i, 60 + i))) for i in range(4)]
    clients = [TwinkleClient(stack.base, api_key=key) for key in KEYS[:2]]
    try:
        reference = clients[0].create_training_run(rank=4, seed=3)
        expected = []
        for _ in range(4):
            expected.append(reference.forward_backward(data).loss)
            reference.optim_step(learning_rate=1e-2)
        runs = [c.create_training_run(rank=4, seed=3) for c in clients for _ in range(3)]
        runs = _spread(stack, runs, lambda i: clients[i % 2].create_training_run(rank=4, seed=3), lambda r: r.run_id)
        losses: dict[int, list[float]] = {i: [] for i in range(len(runs))}

        def step(i: int) -> None:
            losses[i].append(runs[i].forward_backward(data).loss)
            runs[i].optim_step(learning_rate=1e-2)

        for _ in range(2):
            for i in range(len(runs)):
                step(i)
        ids = [run.run_id for run in runs]
        before = _holders(stack, ids)
        assert len(set(before.values())) == 2, f"the runs did not spread over both replicas: {before}"
        os.kill(next(iter(_replica_pids(stack))), signal.SIGKILL)
        for _ in range(2):
            for i in range(len(runs)):
                step(i)
        for i, got in losses.items():
            assert got == pytest.approx(expected, abs=1e-5), (i, got, expected)
        assert any(_holders(stack, ids)[r] != before[r] for r in ids)
    finally:
        for c in clients:
            c.close()
