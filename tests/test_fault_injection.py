"""Runs survive the death of their model replica: SIGKILL the real Serve replica process under the official SDK.

``deploy/local-tinker.yaml`` on Ray Serve; a reference run and a run whose replica is killed train on the same
data from the same seed. After each kill the killed run's in-flight calls end with their result or an error
(a user's loop then redoes the step), the same ``model_id`` trains on, and its losses equal the reference
run's step for step — so no step was lost or applied twice.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from _cluster import REPO, base_env, free_port, terminate, wait_http, wait_launched

tinker = pytest.importorskip("tinker")
from tinker import types  # noqa: E402

pytestmark = pytest.mark.acceptance

ADAM = types.AdamParams(learning_rate=1e-2)
CALL_TIMEOUT_S = 90  # the bound is 60 s for an in-flight call; the SDK's own retries add to it


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("fault-injection")
    port = free_port()
    text = (REPO / "deploy" / "local-tinker.yaml").read_text().replace("port: 8000", f"port: {port}")
    cfg = root / "local-tinker.yaml"
    cfg.write_text(text)
    env = base_env(TWINKLE_CHECKPOINT_DIR=str(root / "ckpt"), TWINKLE_SUPERVISE_INTERVAL_S="1",
                   TWINKLE_SUPERVISE_GRACE_S="5")
    stack = Stack(f"http://127.0.0.1:{port}", cfg, env, root)
    try:
        stack.launch()
        yield stack
    finally:
        stack.stop()


class Stack:
    """One deployed stack; ``launch()`` again after ``stop()`` restarts it on the same port and storage."""

    def __init__(self, base: str, cfg, env: dict, root,
                 health: tuple[str, ...] = ("/api/v1/healthz",)) -> None:
        self.base, self.cfg, self.env, self.root, self.health = base, cfg, env, root, health
        self.proc: subprocess.Popen | None = None
        self.launches = 0

    def launch(self) -> None:
        self.launches += 1
        log = open(self.root / f"server-{self.launches}.log", "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "twinkle.server", "--config", str(self.cfg)],
                                     env=self.env, cwd=self.root, stdout=log, stderr=subprocess.STDOUT)
        for path in self.health:
            wait_http(f"{self.base}{path}", 300, self.proc)
        wait_launched(self.root / f"server-{self.launches}.log", 300, self.proc)

    def stop(self) -> int | None:
        return None if self.proc is None else terminate(self.proc, timeout_s=90)

    def log(self) -> str:
        return (self.root / f"server-{self.launches}.log").read_text()

    def log_tail(self, lines: int = 200) -> str:
        return "\n".join(self.log().splitlines()[-lines:])


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _process_named(launcher: subprocess.Popen, marker: str) -> int | None:
    for pid in sorted(_descendants(launcher.pid)):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            return pid
    return None


def _model_replica_pid(launcher: subprocess.Popen) -> int:
    """The live Serve replica process of the model application (a descendant of this stack's launcher)."""
    pid = _process_named(launcher, "ServeReplica:models-tiny-qwen2")
    assert pid is not None, "no model replica process found"
    return pid


def _kill_replica(launcher: subprocess.Popen) -> int:
    pid = _model_replica_pid(launcher)
    os.kill(pid, signal.SIGKILL)
    return pid


def _batch(step: int, rows: int = 32, length: int = 96) -> list[types.Datum]:
    data = []
    for r in range(rows):
        toks = [(step * 7919 + r * 131 + i * 17) % 1900 + 50 for i in range(length + 1)]
        data.append(types.Datum(model_input=types.ModelInput.from_ints(toks[:-1]),
                                loss_fn_inputs={"target_tokens": toks[1:], "weights": [1.0] * length}))
    return data


def _finish(fb, op) -> float:
    loss = fb.result(timeout=CALL_TIMEOUT_S).metrics["loss:sum"]
    op.result(timeout=CALL_TIMEOUT_S)
    return loss


def _step(tc, data) -> float:
    """A user's training step: forward_backward and optim_step pipelined."""
    return _finish(tc.forward_backward(data, "cross_entropy"), tc.optim_step(ADAM))


def _redo_on_error(tc, data, calls) -> tuple[float, str | None]:
    """Finish a step whose calls were under a kill: its result, or (what a user's loop does) the step redone."""
    try:
        return calls(), None
    except Exception as e:  # noqa: BLE001 - an error is an allowed ending; the user redoes the step
        return _step(tc, data), f"{type(e).__name__}: {e}"


def _wait_busy(base: str, timeout_s: float = 30) -> None:
    """Until the model replica reports an operation running (the kill then lands inside it)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        # An open-mode server's local user is its admin: the admin route shows the model's queue.
        services = httpx.get(f"{base}/api/v1/admin/services", headers={"X-API-Key": "tml-fault-alice"},
                             timeout=5).json()["services"]
        if any((s.get("health") or {}).get("busy_for_s") for s in services if s["kind"] == "model"):
            return
        time.sleep(0.005)
    raise AssertionError("the model replica never became busy")


def test_killed_model_replicas_lose_no_acknowledged_step(stack):
    base, launcher = stack.base, stack.proc
    sc = tinker.ServiceClient(base_url=base, api_key="tml-fault-alice")
    try:
        reference = sc.create_lora_training_client(base_model="tiny-qwen2", rank=4, seed=5).result()
        expected = [_step(reference, _batch(i)) for i in range(5)]

        tc = sc.create_lora_training_client(base_model="tiny-qwen2", rank=4, seed=5).result()
        losses = [_step(tc, _batch(0))]

        # 1. between steps: the next step just works, on a new replica
        first = _kill_replica(launcher)
        killed_at = time.monotonic()
        losses.append(_step(tc, _batch(1)))
        recovery_s = time.monotonic() - killed_at
        assert _model_replica_pid(launcher) != first

        # 2. during a forward_backward (its optim_step queued behind it): both are sent again
        fb, op = tc.forward_backward(_batch(2), "cross_entropy"), tc.optim_step(ADAM)
        _wait_busy(base)
        _kill_replica(launcher)
        loss, error = _redo_on_error(tc, _batch(2), lambda: _finish(fb, op))
        losses.append(loss)

        # 3. after a forward_backward answered, before its optim_step: the gradients died with the replica,
        #    so the optim_step must fail (never step on nothing) and the redone step matches
        fb = tc.forward_backward(_batch(3), "cross_entropy")
        fb.result(timeout=CALL_TIMEOUT_S)
        _kill_replica(launcher)
        with pytest.raises(Exception, match="lost when the model replica restarted"):
            tc.optim_step(ADAM).result(timeout=CALL_TIMEOUT_S)
        losses.append(_step(tc, _batch(3)))

        # 4. a checkpoint saved just before a kill loads into a new run, and the old run goes on too
        path = tc.save_state("before-kill").result(timeout=CALL_TIMEOUT_S).path
        _kill_replica(launcher)
        resumed = sc.create_training_client_from_state_with_optimizer(path)
        assert _step(resumed, _batch(4)) == pytest.approx(expected[4], abs=1e-5)
        losses.append(_step(tc, _batch(4)))

        assert losses == pytest.approx(expected, abs=1e-5), (losses, expected, error)
        print(f"replica killed between steps: next step done after {recovery_s:.1f} s; "
              f"kill during forward_backward: {error or 'both calls answered'}")

        more = [_step(reference, _batch(i)) for i in (5, 6, 7)]

        # 5. the central replica killed while a step is in flight: its restarted process follows the
        #    pending requests to their outcome at the Model service, the SDK's polls get them
        fb, op = tc.forward_backward(_batch(5), "cross_entropy"), tc.optim_step(ADAM)
        _wait_busy(base)
        central = _process_named(launcher, "ServeReplica:server")
        assert central is not None
        os.kill(central, signal.SIGKILL)
        loss5, central_error = _redo_on_error(tc, _batch(5), lambda: _finish(fb, op))

        # 6. the whole launcher stopped and started again: the same model_id trains on
        assert stack.stop() == 0
        stack.launch()
        after = [loss5] + [_step(tc, _batch(i)) for i in (6, 7)]
        assert after == pytest.approx(more, abs=1e-5), (after, more, central_error)
        print(f"central replica killed during a step: {central_error or 'both calls answered'}")
    finally:
        sc.close("success").result()


def test_the_launcher_exits_non_zero_when_its_deployment_is_lost(stack):
    """Runs last: it takes the stack down. With Ray's control store (GCS) killed, the Serve applications
    cannot be seen any more; the launcher must not sit alive over a dead stack."""
    launcher = stack.proc
    gcs = _process_named(launcher, "gcs_server")
    assert gcs is not None, "no gcs_server process under the launcher"
    os.kill(gcs, signal.SIGKILL)
    try:
        code = launcher.wait(timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("the launcher kept running over a lost deployment")
    assert code != 0
    log = stack.log()
    assert "the deployment was lost" in log, log[-3000:]
